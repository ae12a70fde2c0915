"""The steer stage: `sae-train steer checkpoint=... prompt="..." features="{123: 8.0}" mode=add`.

Continues the prompt twice from the same seed, once plainly and once with the features steered
(every dictionary at once), prints the two side by side and writes both to out_dir/steer.json.
effect=true adds, per feature, the next-token logits that ablating it moves most.
"""

from __future__ import annotations

import shutil
import textwrap
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from itertools import zip_longest
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig

from sae_train.atomic import write_json_atomic
from sae_train.data import TextConfig, TokenSpec
from sae_train.lm import LanguageModel
from sae_train.lm.model import model_config
from sae_train.provenance import provenance
from sae_train.sae.checkpoint import Checkpoint, recorded
from sae_train.steer.checkpoints import act_max, load_all, select
from sae_train.steer.config import SteerConfig
from sae_train.steer.intervene import feature_values, steering

STEER_FILE = "steer.json"


@dataclass
class SteerSummary:
    """What one steer call produced; `payload` is steer.json."""

    out_dir: str
    payload: dict[str, Any]

    def table(self) -> str:
        p = self.payload
        lines = [f"prompt       {p['prompt']['text']!r}"]
        for i in p["interventions"]:
            units = f" x act_max {i['act_max']:.3g} = {i['raw_value']:.4g}" if i["units"] == "act_max" else ""
            lines.append(
                f"steer        {i['checkpoint']} latent {i['latent']}: {p['config']['mode']} {i['value']:g}{units} "
                f"at {i['steered_site']}, {p['config']['positions']} positions"
            )
        width = max(20, (shutil.get_terminal_size((120, 20)).columns - 3) // 2)
        columns = [_wrap(p[side]["text"], width) for side in ("default", "steered")]
        lines += ["", f"{'default':{width}s} | steered", f"{'-' * width}-+-{'-' * width}"]
        lines += [f"{a:{width}s} | {b}" for a, b in zip_longest(*columns, fillvalue="")]
        for e in p.get("effect", []):
            lines += [
                "",
                f"ablating {e['checkpoint']} latent {e['latent']} (activation {e['activation_last']:.3g} at the last "
                f"prompt token, max {e['activation_max']:.3g}): next-token logits",
            ]
            if not e["lowered"] and not e["raised"]:
                lines.append("  no logit moves: the latent is off at every prompt token")
            for direction in ("lowered", "raised"):
                if e[direction]:
                    moved = ", ".join(f"{t['token']!r} {t['delta']:+.2f}" for t in e[direction])
                    lines.append(f"  {direction:8s} {moved}")
        lines += ["", f"wrote        {Path(self.out_dir) / STEER_FILE}"]
        return "\n".join(lines)


def _wrap(text: str, width: int) -> list[str]:
    return [row for line in text.expandtabs(4).split("\n") for row in (textwrap.wrap(line, width) or [""])]


def _check_sites(c: Checkpoint, lm: LanguageModel) -> tuple[str, str]:
    """(site read, site steered) of `c` in lm, after checking their widths."""
    cfg = c.sae.cfg
    lm.checked_site(c.site, "d_in", cfg.d_in, f"Checkpoint {c.path}")
    if not cfg.is_transcoder:
        return c.site, c.site
    lm.checked_site(cfg.target, "d_out", cfg.d_out, f"Checkpoint {c.path}")
    return c.site, cfg.target


def _prompt_ids(lm: LanguageModel, prompt: str, text: dict[str, Any] | None) -> torch.Tensor:
    """[1, n] token ids of the prompt, BOS first where training prepended it."""
    ids = lm.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    bos = TokenSpec.from_tokenizer(lm.tokenizer, TextConfig(prepend_bos=(text or {}).get("prepend_bos", True))).bos
    prepend = (text or {}).get("prepend_bos", True) and bos is not None
    return torch.tensor([[bos, *ids] if prepend else ids], device=lm.device)


def _generate(lm: LanguageModel, input_ids: torch.Tensor, cfg: SteerConfig) -> list[int]:
    """The continuation's token ids: greedy, or sampled from the full distribution at
    cfg.temperature after seeding torch with cfg.seed (so both runs draw the same numbers)."""
    tokenizer = lm.tokenizer
    sample = cfg.temperature > 0
    generation = GenerationConfig(
        max_new_tokens=cfg.max_new_tokens,
        do_sample=sample,
        **({"temperature": cfg.temperature, "top_k": 0, "top_p": 1.0} if sample else {}),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    model: Any = lm.model  # a transformers PreTrainedModel: it has generate
    torch.manual_seed(cfg.seed)
    with torch.no_grad():
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), generation_config=generation)
    return out[0, input_ids.shape[1] :].tolist()


@torch.no_grad()
def _effect(lm: LanguageModel, input_ids: torch.Tensor, c: Checkpoint, latent: int, top: int) -> dict[str, Any]:
    """The next-token logits (after the prompt) that ablating `latent` at every prompt position
    moves most, each way; and the latent's activation on the prompt."""
    read = lm.site(c.site)
    activation = c.sae.to(lm.device).encode(lm.capture([read], input_ids)[read.name][0])[:, latent]
    clean = lm.model(input_ids).logits[0, -1].float()
    with steering(lm.model, c, [latent], mode="ablate", positions="all"):
        ablated = lm.model(input_ids).logits[0, -1].float()
    delta = ablated - clean
    p_clean, p_ablated = clean.softmax(-1), ablated.softmax(-1)

    def tokens(ids: torch.Tensor) -> list[dict[str, Any]]:
        return [
            {
                "token_id": int(t),
                "token": lm.tokenizer.decode([int(t)]),
                "logit_clean": float(clean[t]),
                "logit_ablated": float(ablated[t]),
                "delta": float(delta[t]),
                "prob_clean": float(p_clean[t]),
                "prob_ablated": float(p_ablated[t]),
            }
            for t in ids
        ]

    top = min(top, delta.numel())
    lowered, raised = delta.topk(top, largest=False).indices, delta.topk(top).indices
    return {
        "checkpoint": c.name,
        "latent": latent,
        "activation_last": float(activation[-1]),
        "activation_max": float(activation.max()),
        "lowered": tokens(lowered[delta[lowered] < 0]),
        "raised": tokens(raised[delta[raised] > 0]),
    }


def run(cfg: SteerConfig, lm: LanguageModel | None = None) -> SteerSummary:
    """Steer the checkpoint(s) at cfg.checkpoint; writes steer.json to cfg.out_dir and returns it
    (the CLI prints `summary.table()`). Pass `lm` to reuse a loaded model."""
    checkpoints = load_all(cfg.checkpoint)
    chosen = select(checkpoints, cfg.features)
    plans = []  # (checkpoint, features in raw units) per dictionary steered
    interventions: list[dict[str, Any]] = []
    for c, features in chosen:
        latents, values = feature_values(c, features, cfg.mode)
        scale = act_max(cfg.inspect_dir, c, latents) if cfg.inspect_dir and cfg.mode != "ablate" else {}
        raw = {latent: value * scale.get(latent, 1.0) for latent, value in zip(latents, values)}
        plans.append((c, raw if cfg.mode != "ablate" else latents))
        for latent, value in zip(latents, values):
            interventions.append(
                {"checkpoint": c.name, "path": str(c.path), "latent": latent, "value": value, "raw_value": raw[latent]}
                | ({"units": "act_max", "act_max": scale[latent]} if scale else {"units": "raw"})
            )

    lm = lm or LanguageModel.load(model_config(recorded(checkpoints, "model"), cfg.model))
    sites = {c.name: _check_sites(c, lm) for c, _ in chosen}
    for entry in interventions:
        entry["site"], entry["steered_site"] = sites[entry["checkpoint"]]
    input_ids = _prompt_ids(lm, cfg.prompt, recorded(checkpoints, "text"))

    default = _generate(lm, input_ids, cfg)
    with ExitStack() as stack:
        for c, features in plans:
            stack.enter_context(steering(lm.model, c, features, mode=cfg.mode, positions=cfg.positions))  # type: ignore[arg-type]
        steered = _generate(lm, input_ids, cfg)

    decode = lm.tokenizer.decode
    payload: dict[str, Any] = {
        "config": asdict(cfg),
        "provenance": provenance(),
        "model": lm.identity,
        "prompt": {"text": cfg.prompt, "token_ids": input_ids[0].tolist()},
        "interventions": interventions,
        "default": {"token_ids": default, "text": decode(default)},
        "steered": {"token_ids": steered, "text": decode(steered)},
    }
    if cfg.effect:
        payload["effect"] = [
            _effect(lm, input_ids, c, latent, cfg.effect_top)
            for c, features in chosen
            for latent in feature_values(c, features, cfg.mode)[0]
        ]
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / STEER_FILE, payload)
    return SteerSummary(out_dir=cfg.out_dir, payload=payload)
