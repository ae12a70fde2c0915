"""The trainer: ground-truth recovery, resume, folding, sweeps, live source and bad input."""

from __future__ import annotations

import hashlib
import json
import signal
from dataclasses import replace
from itertools import islice
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sae_train.atomic import previous
from sae_train.data import TextConfig
from sae_train.errors import UserError
from sae_train.lm import LanguageModel, ModelConfig
from sae_train.sae import SAEConfig, create_sae, load_sae
from sae_train.sae import checkpoint as ckpt
from sae_train.sae.checkpoint import LEGACY_RUN_STATE_FILE, RUN_STATE_FILE, TRAINING_WEIGHTS_FILE
from sae_train.store import ActivationStore, ShuffledBatches, StoreWriter
from sae_train.train import Preempted, StepInfo, TrainConfig, build_source, run
from sae_train.train.dist import Dist
from sae_train.train.sources import _finite
from tests.store_util import overwrite_rows
from tests.synthetic import recovered_fraction, true_directions, write_store

SITE = "synthetic"


@pytest.fixture(scope="module")
def synthetic(synthetic_store):
    return true_directions(64, 32), synthetic_store(65_536)


def cfg(store: Path, out: Path, **kw) -> TrainConfig:
    base = dict(
        store=str(store),
        out_dir=str(out),
        n_tokens=65_536,
        batch_size=512,
        dtype="float32",
        progress=False,
        log_every=16,
        sae=SAEConfig(architecture="topk", k=4, expansion_factor=4),
    )
    return TrainConfig(**(base | kw))


# As many latents as true features (64): every latent has a feature to find, so none may die.
RECOVERY = {
    "topk": SAEConfig(architecture="topk", k=4, expansion_factor=2),
    "batchtopk": SAEConfig(architecture="batchtopk", k=4, expansion_factor=2),
    "relu-l1": SAEConfig(architecture="relu", l1_coefficient=0.05, expansion_factor=2),
    "relu-l1_decnorm": SAEConfig(architecture="relu", sparsity="l1_decnorm", l1_coefficient=0.05, expansion_factor=2),
    "jumprelu": SAEConfig(architecture="jumprelu", l0_coefficient=0.01, expansion_factor=2),
}


@pytest.mark.parametrize("name", RECOVERY)
def test_recovers_ground_truth_directions(synthetic, tmp_path, name):
    dirs, store = synthetic
    summary = run(cfg(store, tmp_path, sae=RECOVERY[name], n_tokens=196_608))
    sae = load_sae(summary.saes[SITE]["checkpoint"])
    assert recovered_fraction(sae.W_dec, dirs, 0.9) >= 0.9
    assert summary.saes[SITE]["metrics"]["dead_fraction"] < 0.1


def _sigterm_at(step: int):
    def callback(info: StepInfo) -> None:
        if info.step == step:
            signal.raise_signal(signal.SIGTERM)

    return callback


@pytest.mark.parametrize("arch", ["topk", "relu", "jumprelu"])
def test_resume_after_sigterm_equals_uninterrupted(synthetic, tmp_path, arch):
    _, store = synthetic
    sae = SAEConfig(architecture=arch, k=4, expansion_factor=4, l1_coefficient=0.05, l0_coefficient=0.01)
    whole = run(cfg(store, tmp_path / "whole", sae=sae, n_tokens=32_768))
    with pytest.raises(Preempted) as stop:
        run(cfg(store, tmp_path / "split", sae=sae, n_tokens=32_768), callbacks=[_sigterm_at(30)])
    assert stop.value.exit_code == 128 + signal.SIGTERM
    # Signals travel with the next step's statistics (step 31), which the host reads one step
    # later (no device sync in a step): every rank stops after step 32.
    assert json.loads((tmp_path / "split" / RUN_STATE_FILE).read_text())["step"] == 32
    resumed = run(cfg(store, tmp_path / "split", sae=sae, n_tokens=32_768))
    assert resumed.steps == whole.steps == 64
    a = load_file(str(Path(whole.saes[SITE]["checkpoint"]) / TRAINING_WEIGHTS_FILE))
    b = load_file(str(Path(resumed.saes[SITE]["checkpoint"]) / TRAINING_WEIGHTS_FILE))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _same_training_weights(a_dir: str, b_dir: str) -> None:
    a = load_file(str(Path(a_dir) / TRAINING_WEIGHTS_FILE))
    b = load_file(str(Path(b_dir) / TRAINING_WEIGHTS_FILE))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_run_written_under_the_old_run_state_name_resumes(synthetic, tmp_path):
    _, store = synthetic
    whole = run(cfg(store, tmp_path / "whole", n_tokens=16_384))
    with pytest.raises(Preempted):
        run(cfg(store, tmp_path / "split", n_tokens=16_384), callbacks=[_sigterm_at(10)])
    (tmp_path / "split" / RUN_STATE_FILE).rename(tmp_path / "split" / LEGACY_RUN_STATE_FILE)
    resumed = run(cfg(store, tmp_path / "split", n_tokens=16_384))
    assert (
        resumed.new_steps == whole.steps - 12
    )  # the signal at step 10 stops the run after step 12 (read one step late)
    _same_training_weights(whole.saes[SITE]["checkpoint"], resumed.saes[SITE]["checkpoint"])
    assert (tmp_path / "split" / RUN_STATE_FILE).is_file()
    assert not (tmp_path / "split" / LEGACY_RUN_STATE_FILE).exists()  # the commit replaced it


def test_run_saved_with_top_level_text_settings_resumes(synthetic, tmp_path):
    """Runs saved before TextConfig kept context_size & co. at the top of their config: they
    resume (the settings compare as today's `text` block), to the same weights."""
    _, store = synthetic
    whole = run(cfg(store, tmp_path / "whole", n_tokens=16_384))
    with pytest.raises(Preempted):
        run(cfg(store, tmp_path / "split", n_tokens=16_384), callbacks=[_sigterm_at(10)])
    state_file = tmp_path / "split" / RUN_STATE_FILE
    state = json.loads(state_file.read_text())
    state["config"] |= state["config"].pop("text")
    state_file.write_text(json.dumps(state))
    resumed = run(cfg(store, tmp_path / "split", n_tokens=16_384))
    assert resumed.new_steps == whole.steps - 12
    _same_training_weights(whole.saes[SITE]["checkpoint"], resumed.saes[SITE]["checkpoint"])


def test_crash_between_swap_and_commit_resumes_from_the_previous_copy(synthetic, tmp_path, monkeypatch):
    """The second save swaps the SAE directory in, then dies before committing the run state:
    the committed copy is the kept previous one, and resuming from it matches an uninterrupted run."""
    _, store = synthetic
    whole = run(cfg(store, tmp_path / "whole", n_tokens=16_384))
    real, commits = ckpt.write_json_atomic, []

    def dies_at_second_commit(target: Path, data: dict) -> None:
        if target.name == RUN_STATE_FILE:
            commits.append(data["step"])
            if len(commits) == 2:
                raise OSError("killed")
        real(target, data)

    monkeypatch.setattr(ckpt, "write_json_atomic", dies_at_second_commit)
    with pytest.raises(UserError, match="checkpoint of step 16.*killed"):  # a failed write stops the run
        run(cfg(store, tmp_path / "split", n_tokens=16_384, checkpoint_every_tokens=4096))
    monkeypatch.undo()
    sae_dir = tmp_path / "split" / SITE
    assert json.loads((tmp_path / "split" / RUN_STATE_FILE).read_text())["step"] == commits[0] == 8
    assert json.loads((previous(sae_dir) / "trainer_state.json").read_text())["step"] == 8
    assert json.loads((sae_dir / "trainer_state.json").read_text())["step"] == 16
    resumed = run(cfg(store, tmp_path / "split", n_tokens=16_384))
    assert resumed.new_steps == whole.steps - 8 and not previous(sae_dir).exists()
    _same_training_weights(whole.saes[SITE]["checkpoint"], resumed.saes[SITE]["checkpoint"])


def test_damaged_training_weights_on_resume_name_the_file(synthetic, tmp_path):
    _, store = synthetic
    with pytest.raises(Preempted):
        run(cfg(store, tmp_path, n_tokens=16_384), callbacks=[_sigterm_at(4)])
    path = tmp_path / SITE / TRAINING_WEIGHTS_FILE
    weights = load_file(str(path))
    weights["W_enc"] = weights["W_enc"][:, :-1].contiguous()
    save_file(weights, str(path))
    with pytest.raises(UserError, match=f"Training checkpoint {tmp_path / SITE} has W_enc of shape"):
        run(cfg(store, tmp_path, n_tokens=16_384))


def test_finished_run_is_reused(synthetic, tmp_path):
    _, store = synthetic
    first = run(cfg(store, tmp_path, n_tokens=8192))
    before = (Path(first.saes[SITE]["checkpoint"]) / "sae.safetensors").read_bytes()
    again = run(cfg(store, tmp_path, n_tokens=8192))
    assert again.steps == first.steps and again.seconds < first.seconds
    assert (Path(first.saes[SITE]["checkpoint"]) / "sae.safetensors").read_bytes() == before


def test_changed_config_on_resume_is_refused(synthetic, tmp_path):
    _, store = synthetic
    run(cfg(store, tmp_path, n_tokens=8192))
    with pytest.raises(UserError, match="different config.*batch_size"):
        run(cfg(store, tmp_path, n_tokens=8192, batch_size=256))


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "matryoshka", "relu", "jumprelu"])
def test_checkpoint_acts_on_raw_activations(synthetic, tmp_path, arch):
    """The shipped SAE on raw x equals the training SAE on normalised x, rescaled (1e-5)."""
    _, store = synthetic
    summary = run(cfg(store, tmp_path, sae=SAEConfig(architecture=arch, k=4, expansion_factor=4), n_tokens=8192))
    directory = Path(summary.saes[SITE]["checkpoint"])
    shipped = load_sae(directory)
    meta = json.loads((directory / "cfg.json").read_text())
    training = create_sae(SAEConfig.from_dict(json.loads((directory / "trainer_state.json").read_text())["sae"]))
    weights = load_file(str(directory / TRAINING_WEIGHTS_FILE))
    weights.pop("since_fired")
    training.load_state_dict(weights)
    training.eval()
    x = torch.randn(256, 32) * 3 + 1
    scale = meta["normalization_scale"]
    with torch.no_grad():
        expect = training.decode(training.encode(x * scale)) / scale
        got = shipped.decode(shipped.encode(x))
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shipped.W_dec.norm(dim=1), torch.ones(shipped.cfg.d_sae), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad_step", [12, 15])
def test_non_finite_loss_stops_and_keeps_the_checkpoint(synthetic, tmp_path, bad_step):
    """Losses are read one step late; at 15 the step just before a checkpoint (after 16) is
    the bad one, and the save itself must notice."""
    _, store = synthetic

    def poison(info: StepInfo) -> None:
        if info.step == bad_step:
            with torch.no_grad():
                info.runs[0].sae.W_enc[0, 0] = float("nan")

    config = cfg(store, tmp_path, n_tokens=16_384, checkpoint_every_tokens=4096, log_every=100)
    with pytest.raises(UserError, match=f"Non-finite loss.*step {bad_step}"):
        run(config, callbacks=[poison])
    state = json.loads((tmp_path / RUN_STATE_FILE).read_text())
    assert state["step"] == 8
    weights = load_file(str(tmp_path / SITE / TRAINING_WEIGHTS_FILE))
    assert all(torch.isfinite(v.float()).all() for v in weights.values())


def _four_shards(root: Path) -> Path:
    return write_store(root, true_directions(64, 32), 8192, tokens_per_shard=2048)


def test_non_finite_rows_in_the_init_sample_are_named(tmp_path):
    store = _four_shards(tmp_path / "store")
    overwrite_rows(store / "shard-r000-000002.safetensors", SITE, range(100, 101), float("nan"))
    with pytest.raises(UserError) as err:
        run(cfg(store, tmp_path / "out", n_tokens=4096))  # the init sample (32k tokens) reads every row
    message = str(err.value)
    assert "shard-r000-000002.safetensors rows 100 (of 2048)" in message
    assert "sha256 differs" in message and "rerun the same `sae-train cache` command" in message


def test_non_finite_rows_met_in_training_are_named(tmp_path):
    store = _four_shards(tmp_path / "store")
    sampled = ShuffledBatches(ActivationStore(store), [SITE], 1024, seed=1).origin(0, 1024)  # the init sample's rows
    shard3 = {int(r) for shard, rows in sampled if shard == 3 for r in rows}
    first = next(r for r in range(2048) if not shard3 & {r, r + 1, r + 2})
    overwrite_rows(store / "shard-r000-000003.safetensors", SITE, range(first, first + 3), float("inf"))
    # As if the writer had stored them: the manifest's checksum matches the bytes.
    manifest = json.loads((store / "manifest.json").read_text())
    manifest["shards"][3]["sha256"] = hashlib.sha256((store / "shard-r000-000003.safetensors").read_bytes()).hexdigest()
    (store / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError) as err:
        run(cfg(store, tmp_path / "out", n_tokens=8192, init_tokens=1024))
    message = str(err.value)
    assert f"shard-r000-000003.safetensors rows {first}-{first + 2} (of 2048)" in message
    assert "model.dtype=float32" in message
    assert not (tmp_path / "out" / RUN_STATE_FILE).exists()


def test_one_pass_sweep_over_sites_and_k(tmp_path):
    dirs = true_directions(16, 8)
    gen = torch.Generator().manual_seed(0)
    from tests.synthetic import sample

    with StoreWriter(tmp_path / "store", {"two": 1}, {"a": 8, "b": 8}, torch.float32) as writer:
        x = sample(4096, dirs, 0.1, 0.01, gen)
        writer.write_shard(
            0, {"a": x, "b": -x}, torch.arange(4096, dtype=torch.int32), torch.zeros(4096, dtype=torch.int32)
        )
        writer.close()
    summary = run(
        TrainConfig(
            store=str(tmp_path / "store"),
            out_dir=str(tmp_path / "out"),
            n_tokens=4096,
            batch_size=512,
            sae=SAEConfig(architecture="topk"),
            sweep={"k": [2, 4]},
            progress=False,
        )
    )
    assert sorted(summary.saes) == ["a/k=2", "a/k=4", "b/k=2", "b/k=4"]
    for tag, info in summary.saes.items():
        shipped = load_sae(info["checkpoint"])
        assert shipped.cfg.k == int(tag[-1])
        assert json.loads((Path(info["checkpoint"]) / "cfg.json").read_text())["site"] == tag[0]


def live_cfg(model_dir: Path, out: Path) -> TrainConfig:
    return TrainConfig(
        source="live",
        model=ModelConfig(name=str(model_dir), dtype="float32", device="cpu"),
        sites=["blocks.1.hook_resid_post"],
        text=TextConfig(context_size=32),
        live_buffer_tokens=1024,
        n_tokens=4096,
        batch_size=256,
        out_dir=str(out),
        progress=False,
        dtype="float32",
        sae=SAEConfig(architecture="topk", k=4, expansion_factor=2),
    )


def test_live_source_trains_and_resumes(tiny_model_dir, tmp_path):
    def live(out: Path) -> TrainConfig:
        return live_cfg(tiny_model_dir("llama"), out)

    whole = run(live(tmp_path / "whole"))
    with pytest.raises(Preempted):
        run(live(tmp_path / "split"), callbacks=[_sigterm_at(7)])
    resumed = run(live(tmp_path / "split"))
    site = "blocks.1.hook_resid_post"
    a = load_file(str(Path(whole.saes[site]["checkpoint"]) / TRAINING_WEIGHTS_FILE))
    b = load_file(str(Path(resumed.saes[site]["checkpoint"]) / TRAINING_WEIGHTS_FILE))
    for key in a:
        assert torch.equal(a[key], b[key]), key
    provenance = json.loads((Path(whole.saes[site]["checkpoint"]) / "cfg.json").read_text())["source"]
    assert provenance["source"] == "live" and provenance["data"]["split"] == "train"


@pytest.mark.parametrize("batch_size", [256, 1536])  # a block (992 kept rows) holds several batches, or part of one
def test_live_batches_cut_the_blocks_one_after_the_other(tiny_model_dir, tmp_path, batch_size):
    """The live stream is its shuffled blocks concatenated and cut into batches (a batch may span
    blocks), from any position: what a resume relies on."""
    cfg = replace(live_cfg(tiny_model_dir("llama"), tmp_path), batch_size=batch_size, n_tokens=8192)
    source = build_source(cfg, Dist(rank=0, world_size=1, device=torch.device("cpu")))
    site = "blocks.1.hook_resid_post"
    blocks = [rows[site] for rows in islice(source._blocks(0, 0, 1), 10)]
    assert 0 < len(blocks[0]) < 1024  # BOS rows left out: the blocks do not divide into batches
    stream = torch.cat(blocks)
    for position in (0, 3 * batch_size, 700):
        batches = source.batches(position)
        for i in range(3):
            start = position + i * batch_size
            assert torch.equal(next(batches)[site], stream[start : start + batch_size]), (position, i)
            assert source.position == start + batch_size


def test_the_live_finiteness_check_is_exact():
    """Live blocks are checked through their sum; a finite block whose sum overflows passes."""
    big = torch.full((64, 8), 3e38, dtype=torch.bfloat16)
    assert not torch.isfinite(big.sum()) and _finite(big)
    for bad in (float("nan"), float("inf"), float("-inf")):
        assert not _finite(big.index_fill(0, torch.tensor([5]), bad))
    assert _finite(torch.randn(64, 8, dtype=torch.bfloat16))


def test_non_finite_live_activations_are_named(tiny_model_dir, tmp_path, monkeypatch):
    capture_rows = LanguageModel.capture_rows

    def overflowing(self, sites, windows, batch_size):
        return {
            k: v.index_fill(0, torch.tensor([5]), float("inf"))
            for k, v in capture_rows(self, sites, windows, batch_size).items()
        }

    monkeypatch.setattr(LanguageModel, "capture_rows", overflowing)
    with pytest.raises(
        UserError,
        match=r"produced non-finite activations .* site blocks\.1\.hook_resid_post on block 0 .*model\.dtype=float32",
    ):
        run(live_cfg(tiny_model_dir("llama"), tmp_path))


def test_bad_input(synthetic, tmp_path):
    _, store = synthetic
    with pytest.raises(UserError, match="d_in=16.*d_in=32"):
        run(cfg(store, tmp_path / "a", sae=SAEConfig(architecture="topk", k=4, d_in=16)))
    with pytest.raises(UserError, match="k"):
        run(cfg(store, tmp_path / "b", sae=SAEConfig(architecture="topk", k=1000, expansion_factor=4)))
    with pytest.raises(UserError, match="architecture"):
        SAEConfig(architecture="gated")
    empty = tmp_path / "empty"
    with StoreWriter(empty, {"x": 1}, {SITE: 32}, torch.float32) as writer:
        writer.close()
    with pytest.raises(UserError, match="no tokens"):
        run(cfg(empty, tmp_path / "c"))
    with pytest.raises(UserError, match="no site"):
        run(cfg(store, tmp_path / "d", sites=["blocks.0.hook_resid_post"]))
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        run(cfg(store, tmp_path / "file"))


def test_wandb_offline_logs_metrics_and_resume_keeps_the_run(synthetic, tmp_path):
    from sae_train.train import WandbConfig
    from tests.wandb_records import history, run_ids

    _, store = synthetic
    config = cfg(store, tmp_path, n_tokens=16_384, log_every=4, wandb=WandbConfig(enabled=True, mode="offline"))
    with pytest.raises(Preempted):
        run(config, callbacks=[_sigterm_at(9)])  # stops after step 11 (signals are read one step late)
    run(config)
    assert len(run_ids(tmp_path / "wandb")) == 1
    rows = history(tmp_path / "wandb")
    logged_steps = [row["_step"] for row in rows]
    assert logged_steps == [4, 8, 11, 12, 16, 20, 24, 28, 32]
    assert all(0 < row[f"{SITE}/fvu"] < 2 and 0 < row[f"{SITE}/l0"] <= 4 for row in rows)


# ----------------------------------------------------------------------------- the optimizer step


def _twin_saes(arch: str, compute: torch.dtype, seed: int = 1234):
    """Two identical SAEs, each with its own fused-kernel Adam, and a stream of gradients."""
    architecture, _, variant = arch.partition("-")  # relu-decnorm: ReLU with free decoder norms
    sae_cfg = SAEConfig(
        architecture=architecture,
        k=4,
        expansion_factor=4,
        l1_coefficient=0.05,
        l0_coefficient=0.01,
        sparsity="l1_decnorm" if variant == "decnorm" else "l1",
    ).resolved(24)
    saes = [create_sae(sae_cfg, compute_dtype=compute) for _ in range(2)]
    opts = [torch.optim.Adam(s.parameters(), lr=3e-2, betas=(0.9, 0.999), eps=1e-8, fused=True) for s in saes]
    gen = torch.Generator().manual_seed(seed)

    def grads(scale: float) -> dict[str, torch.Tensor]:
        return {n: scale * torch.randn(p.shape, generator=gen) for n, p in saes[0].named_parameters()}

    return saes, opts, grads


@pytest.mark.parametrize("arch", ["topk", "relu-decnorm", "jumprelu"])
@pytest.mark.parametrize("grad_clip", [0.0, 1.0])
def test_fused_update_matches_reference_update(arch, grad_clip, monkeypatch):
    """The two-pass optimizer step against project_grads_ + clip_grad_norm_ + Adam + constrain_,
    with clipping off, inactive (small gradients) and active (large ones)."""
    from sae_train.train.update import fused_supported, fused_update, reference_update

    monkeypatch.setenv("SAE_TRAIN_KERNELS", "c")  # the fused step is a C kernel: test it whatever the suite's mode

    (ref, fused), (opt_ref, opt_fused), grads = _twin_saes(arch, torch.bfloat16)
    for step, scale in enumerate([1e-3, 10.0, 1e-2, 3.0]):
        g = grads(scale)
        for sae in (ref, fused):
            for name, p in sae.named_parameters():
                p.grad = g[name].clone()
        assert fused_supported(fused, opt_fused)
        reference_update(ref, opt_ref, grad_clip)
        fused_update(fused, opt_fused, grad_clip)
        for (name, a), b in zip(ref.named_parameters(), fused.parameters()):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), (name, step)
            for key in ("exp_avg", "exp_avg_sq"):
                sa, sb = opt_ref.state[a][key], opt_fused.state[b][key]
                assert torch.allclose(sa, sb, rtol=1e-5, atol=1e-6 * float(sa.abs().max())), (name, key, step)
            assert torch.equal(opt_ref.state[a]["step"], opt_fused.state[b]["step"])
        # the bf16 copies for the next forward are the parameters, cast
        for name in ("W_enc", "W_dec"):
            assert torch.equal(fused.gemm_weight(name), getattr(fused, name).detach().to(torch.bfloat16))
    assert opt_fused.state_dict()["state"].keys() == opt_ref.state_dict()["state"].keys()


def test_gemm_weight_copies_retire_when_the_weights_change():
    from sae_train.train.update import fused_update

    (sae, _), (opt, _), grads = _twin_saes("topk", torch.bfloat16)
    for name, p in sae.named_parameters():
        p.grad = grads(0.1)[name]
    fused_update(sae, opt, 1.0)
    copy = sae.gemm_weight("W_enc")
    assert sae.gemm_weight("W_enc") is copy  # the optimizer's copy serves the forward
    with torch.no_grad():
        sae.W_enc.mul_(2.0)  # any in-place change bumps the version counter
    assert sae.gemm_weight("W_enc") is not copy
    assert torch.equal(sae.gemm_weight("W_enc"), sae.W_enc.detach().to(torch.bfloat16))
    assert not copy.equal(sae.gemm_weight("W_enc"))
    sae.load_state_dict(sae.state_dict())  # copy_ in place, too
    assert sae.gemm_weight("W_dec").data_ptr() != copy.data_ptr()
    folded = sae.fold(2.0)  # deep copies never carry the cache
    assert not folded._gemm_copies


def test_training_with_the_reference_update_agrees(synthetic, tmp_path, monkeypatch):
    """End to end: a run with the plain optimizer step lands where the fused one does."""
    import sae_train.train.trainer as trainer
    from sae_train.train.update import reference_update

    _, store = synthetic
    sae = SAEConfig(architecture="topk", k=4, expansion_factor=4)
    fused = run(cfg(store, tmp_path / "fused", sae=sae, n_tokens=16_384, dtype="bfloat16"))
    monkeypatch.setattr(trainer, "update", reference_update)
    plain = run(cfg(store, tmp_path / "plain", sae=sae, n_tokens=16_384, dtype="bfloat16"))
    a = load_file(str(Path(fused.saes[SITE]["checkpoint"]) / TRAINING_WEIGHTS_FILE))
    b = load_file(str(Path(plain.saes[SITE]["checkpoint"]) / TRAINING_WEIGHTS_FILE))
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), rtol=1e-3, atol=1e-4), key
    assert fused.saes[SITE]["metrics"]["fvu"] == pytest.approx(plain.saes[SITE]["metrics"]["fvu"], rel=1e-3)
