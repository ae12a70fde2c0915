"""Steering (sae_train/steer): the interventions' math, their positions under the KV cache, the
stage's output, and its errors, on a tiny random Llama (tests/tiny.py)."""

from __future__ import annotations

import gzip
import json
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

from sae_train.data import TextConfig
from sae_train.errors import UserError
from sae_train.lm import LanguageModel, ModelConfig
from sae_train.sae import SAEConfig, create_sae, save_sae
from sae_train.sae.checkpoint import Checkpoint
from sae_train.steer import SteerConfig, act_max, load, run, steering

SITE = "blocks.1.hook_resid_post"
LAST = "blocks.2.hook_resid_post"  # the last layer's output: the final norm and unembedding follow
SOURCE, TARGET = "blocks.1.mlp.hook_in", "blocks.1.hook_mlp_out"
D_SAE = 64
OFF = 5  # a latent whose encoder bias keeps it off on every token
PROMPT = "def value(self):\n    return"


@pytest.fixture(scope="module")
def lm(tiny_model_dir) -> LanguageModel:
    return LanguageModel.load(ModelConfig(name=str(tiny_model_dir("llama")), dtype="float32", device="cpu"))


def save_checkpoint(
    directory: Path, lm: LanguageModel, site: str = SITE, *, target: str = "", arch: str = "topk"
) -> Path:
    """A folded SAE (or transcoder reading `site`, writing `target`) with random weights, latent OFF
    never firing, and the metadata the trainer records."""
    d_in = lm.site_width(lm.site(site))
    d_out = lm.site_width(lm.site(target)) if target else 0
    sae = create_sae(SAEConfig(architecture=arch, k=8, d_sae=D_SAE, target=target).resolved(d_in, d_out))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
        sae.b_enc[OFF] = -1e4
    sae.constrain_()
    source = {"model": lm.identity, "text": asdict(TextConfig(context_size=32))}
    save_sae(sae.fold(1.0, 1.0), directory, {"site": site, "tag": directory.name, "source": source})
    return directory


@pytest.fixture(scope="module")
def sae_dir(lm, tmp_path_factory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / SITE, lm)


@torch.no_grad()
def encode(ckpt: Checkpoint, x: torch.Tensor) -> torch.Tensor:
    return ckpt.sae.encode(x)


def prompt_ids(lm: LanguageModel) -> torch.Tensor:
    return torch.tensor([[lm.tokenizer.bos_token_id, *lm.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]]])


def next_logits(lm: LanguageModel, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return lm.model(input_ids).logits


def greedy(lm: LanguageModel, input_ids: torch.Tensor, n: int = 8) -> list[int]:
    out = lm.model.generate(
        input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=n, do_sample=False, pad_token_id=0
    )
    return out[0, input_ids.shape[1] :].tolist()


def steer_cfg(checkpoint: Path, tmp_path: Path, **overrides: object) -> SteerConfig:
    base: dict[str, object] = dict(
        checkpoint=str(checkpoint), prompt=PROMPT, features={3: 0.0}, max_new_tokens=12, out_dir=str(tmp_path / "out")
    )
    return SteerConfig(**(base | overrides))  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------- interventions


def test_latent_off_on_the_prompt_ablated_or_clamped_to_zero_leaves_logits_exactly_unchanged(lm, sae_dir):
    ckpt = load(sae_dir)
    ids = prompt_ids(lm)
    x = lm.capture([lm.site(SITE)], ids)[SITE][0]
    assert float(encode(ckpt, x)[:, OFF].abs().max()) == 0.0
    clean = next_logits(lm, ids)
    for mode, features in (("ablate", [OFF]), ("clamp", {OFF: 0.0})):
        with steering(lm.model, ckpt, features, mode=mode):
            assert torch.equal(next_logits(lm, ids), clean), mode
    # A latent that fires: ablating it changes the logits (the test can fail), and by exactly its
    # decoder contribution at the site, the SAE's error term kept.
    f = encode(ckpt, x)
    firing = int(f[-1].argmax())
    with steering(lm.model, ckpt, [firing], mode="ablate"):
        assert not torch.equal(next_logits(lm, ids), clean)
        steered_site = lm.capture([lm.site(SITE)], ids)[SITE][0]
    torch.testing.assert_close(steered_site - x, -f[:, firing, None] * ckpt.sae.W_dec[firing], rtol=1e-5, atol=1e-5)


def test_clamp_sets_the_latent_and_add_moves_along_the_decoder_row(lm, sae_dir):
    ckpt = load(sae_dir)
    ids = prompt_ids(lm)
    x = lm.capture([lm.site(SITE)], ids)[SITE][0]
    f = encode(ckpt, x)
    W = ckpt.sae.W_dec
    with steering(lm.model, ckpt, {2: 3.0, 7: 1.5}, mode="clamp"):
        clamped = lm.capture([lm.site(SITE)], ids)[SITE][0]
    expected = x + (3.0 - f[:, 2:3]) * W[2] + (1.5 - f[:, 7:8]) * W[7]
    torch.testing.assert_close(clamped, expected, rtol=1e-5, atol=1e-5)
    with steering(lm.model, ckpt, {2: 3.0, 7: -1.5}, mode="add"):
        added = lm.capture([lm.site(SITE)], ids)[SITE][0]
    torch.testing.assert_close(added, x + 3.0 * W[2] - 1.5 * W[7], rtol=1e-5, atol=1e-5)


def test_add_along_a_direction_built_from_the_unembedding_raises_that_token(lm, tmp_path):
    ckpt = load(save_checkpoint(tmp_path / LAST, lm, LAST))
    ids = prompt_ids(lm)
    clean = next_logits(lm, ids)[0, -1].softmax(-1)
    token = int(clean.argmin())  # the least likely next token
    # Through the final RMSNorm y = g * x / rms(x), a residual direction g * W_U[T] raises T's logit.
    direction = lm.model.model.norm.weight * lm.model.lm_head.weight[token]
    with torch.no_grad():
        ckpt.sae.W_dec[0] = direction / direction.norm()
    with steering(lm.model, ckpt, {0: 20.0}, mode="add"):
        steered = next_logits(lm, ids)[0, -1].softmax(-1)
    assert steered[token] > 10 * clean[token]
    assert int(steered.argmax()) == token


def test_transcoder_steers_the_mlp_output_from_its_input(lm, tmp_path):
    ckpt = load(save_checkpoint(tmp_path / "tc", lm, SOURCE, target=TARGET, arch="relu"))
    ids = prompt_ids(lm)
    acts = lm.capture([lm.site(SOURCE), lm.site(TARGET)], ids)
    f = encode(ckpt, acts[SOURCE][0])
    firing = int(f.sum(0).argmax())
    with steering(lm.model, ckpt, [firing], mode="ablate"):
        ablated = lm.capture([lm.site(TARGET)], ids)[TARGET][0]
    torch.testing.assert_close(
        ablated, acts[TARGET][0] - f[:, firing, None] * ckpt.sae.W_dec[firing], rtol=1e-5, atol=1e-5
    )
    with steering(lm.model, ckpt, {firing: 2.0}, mode="add"):
        added = lm.capture([lm.site(TARGET)], ids)[TARGET][0]
    torch.testing.assert_close(added, acts[TARGET][0] + 2.0 * ckpt.sae.W_dec[firing], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------- positions and generation


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox", "gemma2"])
def test_positions_follow_the_kv_cache_during_generation(family, tiny_model_dir, tmp_path):
    lm = LanguageModel.load(ModelConfig(name=str(tiny_model_dir(family)), dtype="float32", device="cpu"))
    ckpt = load(save_checkpoint(tmp_path / SITE, lm))
    ids = prompt_ids(lm)
    default = greedy(lm, ids)
    runs = {}
    for positions in ("prompt", "generated", "all"):
        with steering(lm.model, ckpt, {1: 30.0, 4: -30.0}, mode="add", positions=positions):
            runs[positions] = greedy(lm, ids)
    # Generated-only steering cannot touch the first token (its logits come from the prompt pass).
    assert runs["generated"][0] == default[0]
    assert runs["prompt"][0] != default[0] and runs["prompt"][0] == runs["all"][0]
    assert runs["generated"] != default and runs["generated"] != runs["prompt"]

    # positions=all with the cache equals steering every position of full, uncached forwards.
    with steering(lm.model, ckpt, {1: 30.0, 4: -30.0}, mode="add", positions="all"):
        sequence = ids
        for _ in range(len(runs["all"])):
            nxt = lm.model(sequence, use_cache=False).logits[0, -1].argmax()
            sequence = torch.cat([sequence, nxt.view(1, 1)], dim=1)
    assert sequence[0, ids.shape[1] :].tolist() == runs["all"]


def test_strength_zero_reproduces_the_default_generation_token_for_token(lm, sae_dir, tmp_path):
    summary = run(steer_cfg(sae_dir, tmp_path, features={3: 0.0, 9: 0.0}, positions="all"), lm)
    assert summary.payload["steered"]["token_ids"] == summary.payload["default"]["token_ids"]
    assert len(summary.payload["default"]["token_ids"]) == 12


def test_sampling_with_a_seed_is_reproducible(lm, sae_dir, tmp_path):
    first, second = (
        run(steer_cfg(sae_dir, tmp_path / name, features={3: 0.0}, temperature=1.5, seed=7), lm).payload
        for name in ("a", "b")
    )
    assert first["default"] == second["default"] and first["steered"] == second["steered"]
    assert first["steered"] == first["default"]  # strength 0: the same draws give the same tokens
    other = run(steer_cfg(sae_dir, tmp_path / "c", features={3: 0.0}, temperature=1.5, seed=8), lm).payload
    greedy_run = run(steer_cfg(sae_dir, tmp_path / "d", features={3: 0.0}), lm).payload
    assert first["default"] != other["default"] or first["default"] != greedy_run["default"]


# ---------------------------------------------------------------------------------- the stage


def test_steer_json_records_settings_prompt_and_both_continuations(lm, sae_dir, tmp_path):
    cfg = steer_cfg(sae_dir, tmp_path, features="{1: 30.0, 4: -30.0}", positions="generated", effect=True, effect_top=3)
    summary = run(cfg, lm)
    written = json.loads((tmp_path / "out" / "steer.json").read_text())
    assert written == json.loads(json.dumps(summary.payload, sort_keys=True))
    assert written["prompt"]["token_ids"] == prompt_ids(lm)[0].tolist()  # BOS first, as in training
    assert written["config"]["mode"] == "add" and written["config"]["positions"] == "generated"
    for side in ("default", "steered"):
        assert written[side]["text"] == lm.tokenizer.decode(written[side]["token_ids"])
    assert written["steered"]["token_ids"] != written["default"]["token_ids"]
    assert [(i["latent"], i["value"], i["units"], i["site"]) for i in written["interventions"]] == [
        (1, 30.0, "raw", SITE),
        (4, -30.0, "raw", SITE),
    ]
    assert [e["latent"] for e in written["effect"]] == [1, 4]
    assert "default" in summary.table() and "steer.json" in summary.table()


def test_effect_lists_the_logits_ablation_moves_most(lm, sae_dir, tmp_path):
    ckpt = load(sae_dir)
    ids = prompt_ids(lm)
    f = encode(ckpt, lm.capture([lm.site(SITE)], ids)[SITE][0])
    firing = int(f[-1].argmax())
    effect = run(steer_cfg(sae_dir, tmp_path, features=[firing, OFF], mode="ablate", effect=True, effect_top=4), lm)
    on, off = effect.payload["effect"]
    clean = next_logits(lm, ids)[0, -1]
    with steering(lm.model, ckpt, [firing], mode="ablate"):
        delta = next_logits(lm, ids)[0, -1] - clean
    assert [t["token_id"] for t in on["raised"]] == delta.topk(4).indices.tolist()
    assert [t["token_id"] for t in on["lowered"]] == delta.topk(4, largest=False).indices.tolist()
    assert on["activation_last"] == pytest.approx(float(f[-1, firing]))
    assert off["raised"] == off["lowered"] == [] and off["activation_max"] == 0.0


def test_several_checkpoints_at_once_keyed_by_name_or_site(lm, sae_dir, tmp_path):
    run_dir = tmp_path / "run"
    save_checkpoint(run_dir / SITE, lm)
    save_checkpoint(run_dir / "tc", lm, SOURCE, target=TARGET, arch="relu")
    features = {SITE: {1: 30.0}, "tc": {2: 10.0}}
    both = run(steer_cfg(run_dir, tmp_path / "both", features=features, positions="generated"), lm).payload
    only_sae = run(steer_cfg(run_dir, tmp_path / "sae", features={SITE: {1: 30.0}}, positions="generated"), lm).payload
    assert [(i["checkpoint"], i["steered_site"]) for i in both["interventions"]] == [(SITE, SITE), ("tc", TARGET)]
    assert both["steered"]["token_ids"] != only_sae["steered"]["token_ids"]
    with pytest.raises(UserError, match="2 checkpoints are loaded"):
        run(steer_cfg(run_dir, tmp_path / "x", features={1: 3.0}), lm)
    with pytest.raises(UserError, match="matches no checkpoint"):
        run(steer_cfg(run_dir, tmp_path / "x", features={"blocks.0.hook_resid_post": {1: 3.0}}), lm)


def test_values_in_units_of_the_inspected_act_max(lm, sae_dir, tmp_path):
    """inspect's layout: <out_dir>/<checkpoint name>/features/*.jsonl.gz, a record per line."""
    features = tmp_path / "inspect" / SITE / "features"
    features.mkdir(parents=True)
    with gzip.open(features / "latents-0000000-0000063.jsonl.gz", "wt") as f:
        for index in range(D_SAE):
            f.write(json.dumps({"index": index, "act_max": 0.0 if index == 4 else 2.5 + index}) + "\n")
    ckpt = load(sae_dir)
    inspected = str(tmp_path / "inspect")
    assert act_max(inspected, ckpt, [1, 9]) == {1: 3.5, 9: 11.5}
    assert act_max(str(tmp_path / "inspect" / SITE), ckpt, [1]) == {1: 3.5}  # the checkpoint's own folder
    scaled = run(steer_cfg(sae_dir, tmp_path / "a", features={1: 4.0}, inspect_dir=inspected), lm).payload
    raw = run(steer_cfg(sae_dir, tmp_path / "b", features={1: 14.0}), lm).payload
    entry = scaled["interventions"][0]
    assert (entry["value"], entry["units"], entry["act_max"], entry["raw_value"]) == (4.0, "act_max", 3.5, 14.0)
    assert scaled["steered"] == raw["steered"] and scaled["steered"] != scaled["default"]
    with pytest.raises(UserError, match="never fired"):
        act_max(inspected, ckpt, [4])
    with pytest.raises(UserError, match=f"no record of latent {D_SAE}"):
        act_max(inspected, ckpt, [D_SAE])
    with pytest.raises(UserError, match="holds no inspect records"):
        act_max(str(tmp_path), ckpt, [1])


# ---------------------------------------------------------------------------------- bad input


def test_bad_input_is_a_clear_error(lm, sae_dir, tmp_path):
    with pytest.raises(UserError, match=rf"Latent {D_SAE} does not exist .* d_sae={D_SAE}"):
        run(steer_cfg(sae_dir, tmp_path, features={D_SAE: 1.0}), lm)
    with pytest.raises(UserError, match="Latent -1 does not exist"):
        with steering(lm.model, load(sae_dir), [-1], mode="ablate"):
            pass
    narrow = load(save_checkpoint(tmp_path / "narrow", lm, "blocks.1.mlp.hook_post"))  # width 64, not 32
    narrow.meta = narrow.meta | {"site": SITE}
    with pytest.raises(UserError, match="reads width 64 and writes width 64, but the model has widths 32 and 32"):
        with steering(lm.model, narrow, {1: 1.0}):
            next_logits(lm, prompt_ids(lm))
    foreign = save_checkpoint(tmp_path / "deep", lm)
    meta = json.loads((foreign / "cfg.json").read_text())
    (foreign / "cfg.json").write_text(json.dumps(meta | {"site": "blocks.7.hook_resid_post"}))
    with pytest.raises(UserError, match="blocks.7.hook_resid_post', which model .* lacks"):
        run(steer_cfg(foreign, tmp_path), lm)
    for malformed, match in (
        ("{3: 1.0", "not readable"),
        ("{x: 1.0}", "latent 'x' is not an integer"),
        ("{3: big}", "value of latent 3 is 'big'"),
        ("{3: }", "value of latent 3 is None"),
        ("", "name the latents"),
    ):
        with pytest.raises(UserError, match=match):
            steer_cfg(sae_dir, tmp_path, features=malformed)
    with pytest.raises(UserError, match="takes no values"):
        run(steer_cfg(sae_dir, tmp_path, features={3: 2.0}, mode="ablate"), lm)
    with pytest.raises(UserError, match="needs a value per latent"):
        run(steer_cfg(sae_dir, tmp_path, features=[3]), lm)
    with pytest.raises(UserError, match="positions='middle'"):
        steer_cfg(sae_dir, tmp_path, positions="middle")
    with pytest.raises(UserError, match="prompt is empty"):
        replace(steer_cfg(sae_dir, tmp_path), prompt="")


@pytest.mark.parametrize("text", ["def f(x):", 'print("hi")', "it's", "a\\'b", "x = {1: 2}, [3]\n    y", "ends\\", ""])
def test_the_prompt_on_the_command_line_is_the_text_itself(text):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from sae_train.cli import _verbatim

    (arg,) = _verbatim("steer", [f"prompt={text}"])
    assert OverridesParser.create().parse_override(arg).value() == text
    assert _verbatim("eval", [f"prompt={text}"]) == [f"prompt={text}"]  # only steer's free text
