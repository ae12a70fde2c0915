"""The inspect stage: `sae-train inspect checkpoint=... [store=...] n_tokens=... out_dir=...`.

One pass over a store's rows (or the model run live on held-out text) encodes them with every
checkpoint found, in the SAE's own encode (bf16 GEMMs where the device has them), and keeps
per-latent statistics in memory bounded by the dictionaries' widths (stream.py). Then each
decoder row goes through the logit lens, and out_dir receives, per checkpoint, `inspect.json`
and the feature records, plus `index.html`, a browser that works from disk; for transcoders
also circuit-tracer's local feature files (circuit_tracer.py).
"""

from __future__ import annotations

import gzip
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from sae_train.atomic import drop_previous, staging_dir, swap_dir
from sae_train.data import TokenSpec
from sae_train.errors import UserError
from sae_train.eval.checkpoints import group_by_site
from sae_train.eval.stage import data_config, text_config
from sae_train.eval.tokens import held_out_windows
from sae_train.inspect import browser, circuit_tracer
from sae_train.inspect.config import InspectConfig
from sae_train.inspect.records import LogitTokens, RecordBuilder, logit_tokens, token_strings
from sae_train.inspect.rows import Rows, check_store, live_rows, store_rows
from sae_train.inspect.stream import LatentStats
from sae_train.lm import LanguageModel
from sae_train.lm.model import model_config, resolve_dtype
from sae_train.lm.unembed import logit_lens
from sae_train.provenance import provenance
from sae_train.sae.checkpoint import Checkpoint, load_checkpoints, recorded
from sae_train.store import ActivationStore

log = logging.getLogger(__name__)
SHARD_LATENTS = 1024
"""Records per features/*.jsonl.gz file."""


@dataclass
class InspectSummary:
    out_dir: str
    n_tokens: int
    seconds: float
    """The streaming pass (reading and encoding), not model loading or writing."""
    saes: dict[str, dict[str, Any]] = field(default_factory=dict)
    circuit_tracer_scan: str = ""
    """For transcoders: the `scan` under which circuit-tracer's graph viewer finds their feature files."""

    @property
    def browser(self) -> Path:
        return Path(self.out_dir) / browser.INDEX

    def table(self) -> str:
        rate = self.n_tokens / self.seconds if self.seconds > 0 else 0.0
        lines = [f"inspected    {self.n_tokens:,} tokens in {self.seconds:.1f} s ({rate:,.0f} tok/s)"]
        for name, info in self.saes.items():
            lines.append(
                f"{name:<36} d_sae {info['d_sae']:>6}  fired {info['alive']:6.1%}  -> {Path(self.out_dir) / info['dir']}"
            )
        lines.append(f"browser      {self.browser} (open it from disk)")
        if self.circuit_tracer_scan:
            graphs = Path(self.out_dir) / circuit_tracer.GRAPH_DIR
            lines.append(f"circuit-tracer features in {graphs}: scan '{self.circuit_tracer_scan}' (see README)")
        return "\n".join(lines)


def _sources(cfg: InspectConfig, checkpoints: list[Checkpoint]) -> tuple[ActivationStore | None, dict[str, Any] | None]:
    """The store (None: live) and the model it (or else the checkpoints) recorded."""
    recorded_model = recorded(checkpoints, "model")
    if not cfg.store:
        return None, recorded_model
    store = ActivationStore(cfg.store)
    check_store(store, sorted({c.site for c in checkpoints}), cfg.n_tokens)
    stored_model = store.manifest.spec.get("model")
    if stored_model and recorded_model and stored_model.get("name") != recorded_model.get("name"):
        log.warning(
            "the store holds activations of %s; the checkpoints were trained on %s",
            stored_model.get("name"),
            recorded_model.get("name"),
        )
    return store, stored_model or recorded_model


def _rows(
    cfg: InspectConfig, store: ActivationStore | None, checkpoints: list[Checkpoint], lm: LanguageModel
) -> tuple[Rows, dict[str, Any]]:
    """The rows to inspect and where they come from (for inspect.json)."""
    sites = sorted({c.site for c in checkpoints})
    if store is not None:
        return store_rows(store, sites, cfg.n_tokens, cfg.batch_size, lm.device), {"store": str(store.root)}
    data = data_config(None if cfg.data is not None else recorded(checkpoints, "data"), cfg.data)
    text = text_config(recorded(checkpoints, "text"))
    windows = held_out_windows(lm.tokenizer, data, text, cfg.n_tokens)
    tokens = TokenSpec.from_tokenizer(lm.tokenizer, text)
    rows = live_rows(lm, [lm.site(s) for s in sites], windows, tokens, cfg.batch_size)
    return rows, {"live": data.describe(), "text": asdict(text)}


def _stream(
    cfg: InspectConfig, rows: Rows, checkpoints: list[Checkpoint], device: torch.device
) -> tuple[dict[str, LatentStats], float]:
    stats = {
        c.name: LatentStats(
            c.sae.cfg.d_sae,
            top_k=cfg.top_k,
            sample_size=cfg.sample_size,
            histogram_bins=cfg.histogram_bins,
            before=cfg.context_before,
            after=cfg.context_after,
            seed=cfg.seed,
            device=device,
        )
        for c in checkpoints
    }
    started = time.perf_counter()
    with (
        torch.no_grad(),
        tqdm(total=cfg.n_tokens, unit="tok", unit_scale=True, desc="inspect", disable=not cfg.progress) as bar,
    ):
        for acts, chunk in rows:
            for c in checkpoints:
                stats[c.name].update(c.sae.encode(acts[c.site]), chunk)
            bar.update(len(chunk.rows))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return stats, time.perf_counter() - started


def _write_records(directory: Path, records: list[dict]) -> None:
    features = directory / "features"
    features.mkdir(parents=True)
    for start in range(0, len(records), SHARD_LATENTS):
        part = records[start : start + SHARD_LATENTS]
        path = features / f"latents-{start:07d}-{start + len(part) - 1:07d}.jsonl.gz"
        with gzip.open(path, "wt", encoding="utf-8", compresslevel=5) as f:
            for record in part:
                f.write(json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n")


def _check_out_dir(out: Path) -> None:
    """out_dir is replaced whole: it must be new, empty or an earlier inspect output."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / browser.LISTING).is_file())):
        raise UserError(
            f"out_dir={out} exists and is not the output of an earlier `sae-train inspect` (no {browser.LISTING}); "
            "inspect replaces its out_dir whole, so it will not write there. Choose a new directory, e.g. "
            f"out_dir={out / 'inspect'}."
        )


def _records(cfg: InspectConfig, c: Checkpoint, stats: LatentStats, lm: LanguageModel) -> tuple[list[dict], dict]:
    """One checkpoint's feature records, and how its logit lens was computed."""
    sae_cfg = c.sae.cfg
    written = sae_cfg.target if sae_cfg.is_transcoder else c.site
    lens = logit_lens(lm, written) if cfg.n_logits else None
    logits: LogitTokens | None = logit_tokens(lens, c.sae.W_dec.detach(), cfg.n_logits) if lens else None
    used = [stats.top.tokens.flatten().cpu().numpy(), stats.sample.tokens.flatten().cpu().numpy()]
    if logits is not None:
        used += [logits.top_ids.flatten(), logits.bottom_ids.flatten()]
    strings = token_strings(lm.tokenizer, np.concatenate([u.astype(np.int64) for u in used]))
    builder = RecordBuilder(
        stats, strings, logits, n_quantiles=cfg.n_quantiles, quantile_examples=cfg.quantile_examples
    )
    how = {
        "site": written,
        "method": lens.method if lens else None,
        "note": None if lens else f"site {written} has no linear path to the logits: top/bottom logits are empty",
    }
    return list(builder), how


def run(cfg: InspectConfig, lm: LanguageModel | None = None) -> InspectSummary:
    """Inspect the checkpoint(s) at cfg.checkpoint; writes cfg.out_dir (replacing it whole) and
    returns a summary (the CLI prints `summary.table()`). Pass `lm` to reuse a loaded model."""
    out = Path(cfg.out_dir)
    _check_out_dir(out)
    checkpoints = load_checkpoints(cfg.checkpoint)
    store, recorded_model = _sources(cfg, checkpoints)
    lm = lm or LanguageModel.load(model_config(recorded_model, cfg.model))
    group_by_site(checkpoints, lm)  # every site read and written must exist in the model, at the SAE's width
    compute = resolve_dtype(cfg.dtype, lm.device)
    for c in checkpoints:
        c.sae = c.sae.to(lm.device)
        c.sae.compute_dtype = compute
    rows, source = _rows(cfg, store, checkpoints, lm)
    stats, seconds = _stream(cfg, rows, checkpoints, lm.device)
    n_tokens = next(iter(stats.values())).n_tokens

    staging = staging_dir(out)
    summary = InspectSummary(out_dir=str(out), n_tokens=n_tokens, seconds=seconds)
    transcoders: dict[int, list[dict]] = {}
    for c in checkpoints:
        records, lens = _records(cfg, c, stats[c.name], lm)
        sae_cfg = c.sae.cfg
        meta = {
            "sae": c.name,
            "checkpoint": str(c.path),
            "site": c.site,
            **({"target": sae_cfg.target} if sae_cfg.is_transcoder else {}),
            "architecture": sae_cfg.architecture,
            "d_in": sae_cfg.d_in,
            "d_sae": sae_cfg.d_sae,
            "n_tokens": n_tokens,
            "source": source,
            "model": lm.identity,
            "logit_lens": lens,
            "seconds": seconds,
            "config": asdict(cfg),
            "provenance": provenance(),
        }
        directory = staging / c.name
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "inspect.json").write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
        _write_records(directory, records)
        browser.write_sae(staging, c.name, meta, records)
        alive = sum(1 for r in records if r["n_firings"]) / max(len(records), 1)
        summary.saes[c.name] = {"d_sae": sae_cfg.d_sae, "alive": alive, "dir": c.name, "site": c.site}
        layer = lm.site(c.site).layer
        if sae_cfg.is_transcoder and layer is not None:
            if layer in transcoders:
                log.warning("several transcoders read layer %d: circuit-tracer feature pages hold one per layer", layer)
            transcoders.setdefault(layer, records)
    browser.write_index(staging, summary.saes)
    if transcoders:
        summary.circuit_tracer_scan = circuit_tracer.write_features(
            transcoders, staging / circuit_tracer.GRAPH_DIR, Path(cfg.checkpoint).resolve().name
        )
    swap_dir(out)
    drop_previous(out)
    return summary
