"""Cross-layer transcoders (sae=clt): the training forward and its gradients against a naive loop
over layers, inference, folding onto raw activations and the circuit-tracer export, training from
a store and live, resume, the all-layers splice of the eval, bad input, and circuit-tracer itself
loading our export and computing a graph (when its venv exists)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sae_train import cache, export, pipeline, train
from sae_train import eval as eval_stage
from sae_train.cache import CacheConfig
from sae_train.circuit_tracer import ModelLayout, check_cross_layer, cross_layer_files, cross_layer_reference
from sae_train.data import TextConfig
from sae_train.errors import UserError
from sae_train.eval import EvalConfig
from sae_train.eval.downstream import next_token_log_probs
from sae_train.eval.layers import CrossLayerEvaluator
from sae_train.export import ExportConfig
from sae_train.lm import LanguageModel, ModelConfig
from sae_train.sae import SAEConfig, create_sae, kernels, load_sae, load_sae_cfg, save_sae, sparse
from sae_train.sae.checkpoint import RUN_STATE_FILE, TRAINING_WEIGHTS_FILE
from sae_train.sae.clt import CrossLayerTranscoder
from sae_train.sae.kernels import batch_topk
from sae_train.train import StepInfo, TrainConfig, Trainer, build_source
from sae_train.train.dist import Dist
from tests.syncs import record_sync_ops
from tests.tiny import live_train_cfg, write_corpus

L, D_IN, D_OUT, D_SAE, K = 3, 10, 8, 24, 3
TEMPLATE = "blocks.{layer}.hook_mlp_out"
SOURCES = [f"blocks.{i}.mlp.hook_in" for i in range(L)]
TARGETS = [f"blocks.{i}.hook_mlp_out" for i in range(L)]
REPO = Path(__file__).resolve().parents[1]


def clt(skip: bool = False, seed: int = 0, d_in: int = D_IN, d_out: int = D_OUT) -> CrossLayerTranscoder:
    """A training-state CLT with every parameter and threshold moved off its initial value."""
    cfg = SAEConfig(architecture="clt", target=TEMPLATE, k=K, d_sae=D_SAE, n_layers=L, skip=skip, seed=seed)
    sae = create_sae(cfg.resolved(d_in, d_out))
    assert isinstance(sae, CrossLayerTranscoder)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen))
        sae.threshold.copy_(0.05 + 0.1 * torch.rand(L, D_SAE, generator=gen))
    sae.constrain_()
    return sae


def data(n: int = 40, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, L, D_IN, generator=gen) + 0.3
    y = torch.tanh(x @ torch.randn(D_IN, D_OUT, generator=gen)) + 0.1 * torch.randn(n, L, D_OUT, generator=gen)
    return x, y


def naive_forward(sae: CrossLayerTranscoder, x: torch.Tensor, y: torch.Tensor, dead: torch.Tensor | None):
    """The training forward written as a plain loop over layers with dense latents: BatchTopK per
    layer, every decoder from layer s to each layer j >= s, the summed MSE and AuxK."""
    B = x.shape[0]
    y_hat = [sae.b_dec[j].expand(B, D_OUT) for j in range(L)]
    skip = [x[:, j] @ sae.W_skip[j] if sae.cfg.skip else torch.zeros(B, D_OUT) for j in range(L)]
    target = [y[:, j] - skip[j] for j in range(L)]
    latents, zs = [], []
    for s in range(L):
        z = x[:, s] @ sae.W_enc[s] + sae.b_enc[s]
        flat = torch.relu(z.detach()).flatten()
        keep = torch.zeros_like(flat, dtype=torch.bool).scatter(0, flat.topk(K * B).indices, True).view_as(z)
        latents.append(torch.relu(z) * keep)
        zs.append(z)
    for s in range(L):
        for j in range(s, L):
            y_hat[j] = y_hat[j] + latents[s] @ sae.decoder(s)[:, j - s]
    mse = sum((y_hat[j] - target[j]).pow(2).sum(-1).mean() for j in range(L))
    auxk = torch.zeros(())
    if dead is not None:
        e_hat = [torch.zeros(B, D_OUT) for _ in range(L)]
        for s in range(L):
            mask = dead[s * D_SAE : (s + 1) * D_SAE]
            z = zs[s].masked_fill(~mask, float("-inf"))
            top = z.detach().topk(sae.cfg.aux_k, dim=1).indices
            a = torch.zeros_like(z).scatter(1, top, torch.relu(z.gather(1, top))) * mask
            for j in range(s, L):
                e_hat[j] = e_hat[j] + a @ sae.decoder(s)[:, j - s]
        e = torch.stack([target[j] - y_hat[j] for j in range(L)], 1).detach().flatten(1)
        eh = torch.stack(e_hat, 1).flatten(1)
        auxk = (eh - e).pow(2).sum() / (e - e.mean(0)).pow(2).sum()
    out = torch.stack([y_hat[j] + skip[j] for j in range(L)], dim=1)
    return out, mse + sae.cfg.aux_coefficient * auxk, mse, auxk, latents


@pytest.mark.parametrize("dead", [False, True])
@pytest.mark.parametrize("skip", [False, True])
def test_training_forward_and_gradients_match_a_naive_loop_over_layers(skip, dead):
    sae = clt(skip)
    x, y = data()
    dead_mask = torch.rand(L * D_SAE, generator=torch.Generator().manual_seed(3)) < 0.4 if dead else None
    out = sae(x, target=y, dead_mask=dead_mask)
    out.losses["loss"].backward()
    fast = {n: p.grad.clone() for n, p in sae.named_parameters()}
    sae.zero_grad()
    ref, loss, mse, auxk, latents = naive_forward(sae, x, y, dead_mask)
    loss.backward()
    torch.testing.assert_close(out.x_hat, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.losses["mse"], mse, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.losses["auxk"], auxk, rtol=1e-5, atol=1e-6)
    assert dead is (float(auxk.detach()) > 0)
    for name, p in sae.named_parameters():
        torch.testing.assert_close(fast[name], p.grad, rtol=1e-4, atol=1e-5, msg=name)
    dense = out.latents.to_dense().view(L, x.shape[0], D_SAE)
    for s in range(L):
        torch.testing.assert_close(dense[s], latents[s].detach(), rtol=1e-5, atol=1e-6)
    n_active = sum(int((f != 0).sum()) for f in latents)
    assert float(out.l0) == pytest.approx(n_active / x.shape[0])
    fired = torch.cat([(f != 0).any(0) for f in latents])
    assert torch.equal(out.fired, fired)


@pytest.mark.parametrize("impl", ["auto", "torch"])
def test_auxk_picks_at_most_each_layers_dead_latents(impl, monkeypatch):
    """A pick beyond a layer's dead latents decodes nothing (to every later layer): each layer
    picks min(aux_k, its dead latents) per token and one without dead latents none, with the
    naive loop's result (which picks aux_k everywhere)."""
    picks, topk_rows = [], sparse.topk_rows

    def counted(z, bias, k, colmask=None):
        if colmask is not None:  # AuxK's selection among a layer's dead latents
            picks.append(k)
        return topk_rows(z, bias, k, colmask)

    monkeypatch.setattr(sparse, "topk_rows", counted)
    sae = clt()
    sae.impl = impl
    dead = torch.zeros(L, D_SAE, dtype=torch.bool)
    dead[0, [3, 17]] = True
    dead[2, :10] = True
    x, y = data()
    out = sae(x, target=y, dead_mask=dead.flatten())
    assert picks == [2, sae.cfg.aux_k] and sae.cfg.aux_k < 10  # layers 0 and 2
    ref, loss, *_ = naive_forward(sae, x, y, dead.flatten())
    torch.testing.assert_close(out.x_hat, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.losses["loss"], loss, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not kernels.available(), reason="the C kernels are not built here")
def test_the_fused_step_trains_as_the_pytorch_one(monkeypatch):
    """On CPU each layer's BatchTopK selection runs in the C kernel (which lists the positive
    entries only), and the decodes and every gradient in the sparse C products: the same
    selection, L0, fired latents and smallest kept values as the PyTorch step, and its
    reconstruction, losses and gradients up to rounding."""
    calls, transposes = [], []
    monkeypatch.setattr(kernels, "batch_topk", lambda *a: calls.append(1) or batch_topk(*a))
    csr_transpose = kernels.csr_transpose
    monkeypatch.setattr(kernels, "csr_transpose", lambda *a: transposes.append(1) or csr_transpose(*a))
    x, y = data(64)
    dead = torch.rand(L * D_SAE, generator=torch.Generator().manual_seed(3)) < 0.4
    results = []
    for impl in ("auto", "torch"):
        sae = clt(skip=True)
        sae.impl = impl
        with torch.no_grad():
            sae.b_enc[0] -= 4.0  # layer 0: fewer positive pre-activations than k per token
        out = sae(x, target=y, dead_mask=dead)
        out.losses["loss"].backward()
        results.append((out, {n: p.grad.clone() for n, p in sae.named_parameters()}))
    assert len(calls) == L  # one kernel selection per layer, on the "auto" pass only
    assert len(transposes) == 4 * L  # per layer: the main and AuxK decodes' and the encoder's two blocks
    (fast, g_fast), (ref, g_ref) = results
    torch.testing.assert_close(fast.x_hat, ref.x_hat, rtol=1e-5, atol=1e-6)
    for name in ref.losses:
        torch.testing.assert_close(fast.losses[name], ref.losses[name], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(fast.stats["min_kept"], ref.stats["min_kept"], rtol=0, atol=0)
    assert float(fast.l0) == float(ref.l0) and torch.equal(fast.fired, ref.fired)
    assert fast.latents.values.numel() < ref.latents.values.numel()  # the non-positive entries left out
    torch.testing.assert_close(fast.latents.to_dense(), ref.latents.to_dense(), rtol=0, atol=0)
    for name in g_ref:
        torch.testing.assert_close(g_fast[name], g_ref[name], rtol=1e-5, atol=1e-6, msg=name)


def test_inference_is_jumprelu_per_layer_and_decodes_to_every_later_layer():
    sae = clt()
    x, _ = data()
    latents, y = sae.reconstruct(x)
    for s in range(L):
        z = x[:, s] @ sae.W_enc[s] + sae.b_enc[s]
        torch.testing.assert_close(latents[:, s], z * (z > sae.threshold[s]), rtol=1e-5, atol=1e-6)
    for j in range(L):
        expected = sae.b_dec[j] + sum(latents[:, s] @ sae.decoder(s)[:, j - s] for s in range(j + 1))
        torch.testing.assert_close(y[:, j], expected, rtol=1e-5, atol=1e-5)


def test_init_centres_every_layer_and_the_first_step_fits_only_the_decoders():
    """Each layer's pre-activations are centred on the init sample (MLP inputs have a large
    mean) and the decoders start at zero, free: the first gradient fits the decoders and leaves
    the encoders where init put them (pushed from step 1 by unit-norm decoders, a fifth of an
    8-layer SmolLM2 CLT's latents died)."""
    cfg = SAEConfig(architecture="clt", target=TEMPLATE, k=K, d_sae=D_SAE, n_layers=L)
    sae = create_sae(cfg.resolved(D_IN, D_OUT))
    x, y = data(400)
    x = x + 3 * torch.randn(L, D_IN, generator=torch.Generator().manual_seed(5))
    sae.init_from_data(x, y)
    z = torch.einsum("bld,lds->bls", x, sae.W_enc) + sae.b_enc
    assert z.mean(0).abs().max() < 1e-4 * z.std(0).min()
    assert all(not sae.decoder(s).any() for s in range(L)) and not sae.unit_norm_decoder
    sae(x, target=y).losses["loss"].backward()
    assert all(sae.decoder(s).grad.abs().sum() > 0 for s in range(L))
    assert not sae.W_enc.grad.any() and not sae.b_enc.grad.any()
    with torch.no_grad():  # no norm constraint: a decoder keeps the norm the optimizer gives it
        sae.decoder(0).fill_(0.25)
    sae.constrain_()
    assert torch.all(sae.decoder(0) == 0.25)


def test_thresholds_track_each_layers_smallest_kept_activation():
    sae = clt()
    sae.threshold.zero_()
    x, y = data()
    out = sae(x, target=y)
    kept = out.latents.values.view(L, -1)  # BatchTopK: k * B entries per layer
    sae.after_step(out)
    for s in range(L):
        assert torch.all(sae.threshold[s] == kept[s][kept[s] > 0].min())


def test_fold_acts_on_raw_activations_and_the_export_is_exact(tmp_path):
    """The folded CLT (checkpoint round trip) and circuit-tracer's math on the exported files both
    reproduce the training model on raw activations to 1e-5."""
    sae = clt()
    x_norm, _ = data(64)
    scale = torch.tensor([0.5, 2.0, 0.25])
    target_scale = torch.tensor([3.0, 0.2, 1.5])
    latents, y_norm = sae.reconstruct(x_norm)
    x_raw, y_raw = x_norm / scale[None, :, None], y_norm / target_scale[None, :, None]
    folded = sae.fold(scale.tolist(), target_scale.tolist())
    save_sae(folded, tmp_path / "ckpt", {"site": SOURCES[0], "sites": SOURCES, "targets": TARGETS})
    loaded = load_sae(tmp_path / "ckpt")
    assert loaded.normalization_scale == scale.tolist()
    for model in (folded, loaded):
        f, y = model.reconstruct(x_raw)
        torch.testing.assert_close(y, y_raw, rtol=1e-5, atol=1e-5)
        assert torch.equal(f != 0, latents != 0)  # the same latents fire
        for s in range(L):  # unit-norm decoders on raw activations
            torch.testing.assert_close(model.decoder(s).flatten(1).norm(dim=1), torch.ones(D_SAE))
    assert isinstance(loaded, CrossLayerTranscoder)
    files = cross_layer_files(loaded)
    assert sorted(files) == sorted(f"W_{p}_{i}.safetensors" for p in ("enc", "dec") for i in range(L))
    assert {k: tuple(v.shape) for k, v in files["W_enc_1.safetensors"].items()} == {
        "W_enc_1": (D_SAE, D_IN),
        "b_enc_1": (D_SAE,),
        "b_dec_1": (D_OUT,),
        "threshold_1": (D_SAE,),
    }
    assert files["W_dec_1.safetensors"]["W_dec_1"].shape == (D_SAE, L - 1, D_OUT)
    _, y_ct = cross_layer_reference(files, x_raw)
    torch.testing.assert_close(y_ct, y_raw, rtol=1e-5, atol=1e-5)


def test_what_circuit_tracer_cannot_load_is_refused_before_writing():
    layout = ModelLayout(name="m", n_layers=L, output_hook="mlp.hook_out")
    meta = {"sites": SOURCES, "targets": TARGETS}
    check_cross_layer(Path("ckpt"), meta, clt().fold([1.0] * L, [1.0] * L), layout)
    with pytest.raises(UserError, match="never reads.*sae.skip=false"):
        check_cross_layer(Path("ckpt"), meta, clt(skip=True).fold([1.0] * L, [1.0] * L), layout)
    with pytest.raises(UserError, match="every layer 0..3 of model m"):
        check_cross_layer(Path("ckpt"), meta, clt().fold([1.0] * L, [1.0] * L), ModelLayout("m", L + 1, "mlp.hook_out"))


# ---------------------------------------------------------------------------------- eval


def test_the_replacement_model_replaces_every_mlp_output_at_once(tiny_model_dir):
    """The eval's spliced CE is the replacement model's (each layer's MLP output from the CLT
    applied to the MLP inputs of that same pass), written here with plain module hooks; its FVU
    per layer is the CLT's on the clean pass."""
    lm = LanguageModel.load(ModelConfig(name=str(tiny_model_dir("llama")), dtype="float32", device="cpu"))
    sae = clt(skip=True, d_in=lm.d_model, d_out=lm.d_model).fold([1.0] * L, [1.0] * L)
    input_ids = torch.randint(3, lm.model.config.vocab_size, (3, 16), generator=torch.Generator().manual_seed(0))
    pairs = [(lm.site(s), lm.site(t)) for s, t in zip(SOURCES, TARGETS)]
    evaluator = CrossLayerEvaluator(pairs, "clt", sae)
    evaluator.add_batch(lm, input_ids, torch.ones_like(input_ids, dtype=torch.bool))
    metrics = evaluator.results(dense_threshold=1.0)["clt"]

    latents: list[torch.Tensor] = []

    def replace(layer: int):
        def hook(module, args, out):
            x = args[0].flatten(0, 1)
            latents.append(sae.encode_layer(x, layer))
            return sae.decode_layer(latents, layer, x).view_as(out)

        return hook

    scored = torch.ones_like(input_ids[:, 1:], dtype=torch.bool)
    targets = input_ids[:, 1:].flatten()

    def ce(logits: torch.Tensor) -> float:
        return float(-next_token_log_probs(logits, scored).gather(1, targets[:, None]).mean())

    with torch.no_grad():
        clean = ce(lm.model(input_ids).logits)
        handles = [lm.layers[i].mlp.register_forward_hook(replace(i)) for i in range(L)]
        try:
            spliced = ce(lm.model(input_ids).logits)
        finally:
            for handle in handles:
                handle.remove()
        acts = lm.capture([site for pair in pairs for site in pair], input_ids)
        x = torch.stack([acts[s].flatten(0, 1) for s in SOURCES], 1)
        y = torch.stack([acts[t].flatten(0, 1) for t in TARGETS], 1).double()
        y_hat = sae.reconstruct(x)[1].double()
    assert metrics["ce_clean"] == pytest.approx(clean, rel=1e-5)
    assert metrics["ce_sae"] == pytest.approx(spliced, rel=1e-5)
    assert metrics["ce_sae"] != pytest.approx(clean, rel=1e-3) and metrics["ce_sae"] != metrics["ce_zero"]
    for i in range(L):
        fvu = float((y[:, i] - y_hat[:, i]).pow(2).sum() / (y[:, i] - y[:, i].mean(0)).pow(2).sum())
        assert metrics[f"fvu_{i}"] == pytest.approx(fvu, rel=1e-6)
    assert metrics["fvu"] == pytest.approx(float((y - y_hat).pow(2).sum() / (y - y.mean(0)).pow(2).sum()), rel=1e-6)


def test_a_clt_that_writes_nothing_is_the_zero_ablation(tiny_model_dir):
    """No latent fires and b_dec = 0: every MLP output replaced by zero at once, exactly the
    all-layers zero ablation."""
    lm = LanguageModel.load(ModelConfig(name=str(tiny_model_dir("llama")), dtype="float32", device="cpu"))
    sae = clt(d_in=lm.d_model, d_out=lm.d_model).fold([1.0] * L, [1.0] * L)
    with torch.no_grad():
        sae.threshold.fill_(float("inf"))
        sae.b_dec.zero_()
    input_ids = torch.randint(3, lm.model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    evaluator = CrossLayerEvaluator([(lm.site(s), lm.site(t)) for s, t in zip(SOURCES, TARGETS)], "clt", sae)
    evaluator.add_batch(lm, input_ids, torch.ones_like(input_ids, dtype=torch.bool))
    m = evaluator.results(dense_threshold=1.0)["clt"]
    assert m["ce_sae"] == m["ce_zero"] != m["ce_clean"] and m["ce_recovered"] == 0.0 and m["l0"] == 0


# ---------------------------------------------------------------------------------- training runs


def cache_layers(model_dir: Path, out: Path, sites: list[str]) -> Path:
    cache.run(
        CacheConfig(
            model=ModelConfig(name=str(model_dir), dtype="float32", device="cpu"),
            sites=sites,
            text=TextConfig(context_size=32),
            n_tokens=4096,
            tokens_per_shard=1024,
            batch_size=128,
            store_dtype="float32",
            out_dir=str(out),
            progress=False,
        )
    )
    return out


@pytest.fixture(scope="module")
def clt_store(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny Llama's MLP inputs and outputs at its 3 layers, cached in one pass."""
    return cache_layers(tiny_model_dir("llama"), tmp_path_factory.mktemp("clt") / "acts", [*SOURCES, *TARGETS])


def train_cfg(store: Path, out: Path, **overrides) -> TrainConfig:
    base = dict(
        store=str(store),
        sites=["blocks.*.mlp.hook_in"],
        out_dir=str(out),
        n_tokens=8192,
        batch_size=256,
        dtype="float32",
        progress=False,
        sae=SAEConfig(architecture="clt", k=4, expansion_factor=4, target=TEMPLATE),
    )
    return TrainConfig(**(base | overrides))


def test_trains_one_clt_over_every_layer_of_a_store_and_exports_it(clt_store, tmp_path):
    summary = train.run(train_cfg(clt_store, tmp_path / "run"))
    assert list(summary.saes) == ["clt"]
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["fvu"] < 0.6 * logged[0]["fvu"]
    ckpt = Path(summary.saes["clt"]["checkpoint"])
    meta = load_sae_cfg(ckpt)
    assert meta["sites"] == SOURCES and meta["targets"] == TARGETS and meta["n_layers"] == L
    assert len(meta["normalization_scale"]) == len(meta["target_normalization_scale"]) == L
    # the init sample is the whole (small) store: sources to unit mean norm, targets to unit variance
    rows = {
        n: torch.cat([load_file(f)[n].double() for f in sorted(clt_store.glob("*.safetensors"))])
        for n in SOURCES + TARGETS
    }
    mean_norms = [float(rows[n].norm(dim=1).mean()) for n in SOURCES]
    spreads = [float((rows[n] - rows[n].mean(0)).pow(2).sum(1).mean().sqrt()) for n in TARGETS]
    assert meta["normalization_scale"] == pytest.approx([1 / m for m in mean_norms], rel=1e-5)
    assert meta["target_normalization_scale"] == pytest.approx([1 / v for v in spreads], rel=1e-5)
    sae = load_sae(ckpt)
    assert isinstance(sae, CrossLayerTranscoder) and sae.cfg.d_sae == 4 * sae.cfg.d_in
    evaluation = eval_stage.run(
        EvalConfig(
            checkpoint=str(tmp_path / "run"),
            out_dir=str(tmp_path / "eval"),
            model=ModelConfig(name="", device="cpu"),
            n_tokens=512,
            batch_size=4,
            progress=False,
        )
    )
    m = evaluation.payload["saes"]["clt"]["metrics"]
    assert m["fvu"] < 0.8 and all(m[f"fvu_{i}"] < 1 for i in range(L))
    assert 0 < m["kl"] < m["kl_zero"]  # closer to the model than removing every MLP (CE barely moves on it)
    with pytest.raises(UserError, match="SAELens has no layout for.*format=circuit_tracer"):
        export.run(ExportConfig(checkpoint=str(tmp_path / "run"), out_dir=str(tmp_path / "saelens")))
    out = tmp_path / "export"
    ct = ExportConfig(
        checkpoint=str(tmp_path / "run"), out_dir=str(out), format="circuit_tracer", eval_dir=str(tmp_path / "eval")
    )
    result = export.run(ct)
    layer_files = sorted(f"W_{p}_{i}.safetensors" for p in ("enc", "dec") for i in range(L))
    assert result.files == sorted(["README.md", "config.yaml", *layer_files])
    config = (out / "config.yaml").read_text()
    assert "model_kind: cross_layer_transcoder" in config and "feature_input_hook: mlp.hook_in" in config
    assert [row["metrics"]["fvu"] for row in result.layers] == [m[f"fvu_{i}"] for i in range(L)]
    assert "Cross-layer transcoder" in (out / "README.md").read_text()
    assert export.run(ct).files == result.files  # an export replaces its own directory
    files = {name: load_file(out / name) for name in layer_files}
    x = torch.randn(16, L, sae.cfg.d_in) / torch.tensor(meta["normalization_scale"])[None, :, None]
    torch.testing.assert_close(cross_layer_reference(files, x)[1], sae.reconstruct(x)[1])


def test_periodic_eval_during_training_evaluates_the_replacement_model(clt_store, tmp_path):
    pipeline.train_stage(train_cfg(clt_store, tmp_path / "run", eval_every_tokens=4096, eval_tokens=256))
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [row for row in logged if "eval/fvu" in row]
    assert [row["step"] for row in evals] == [16, 32] and all(row["sae"] == "clt" for row in evals)
    assert 0 < evals[-1]["eval/fvu"] < 1 and evals[-1]["eval/kl"] > 0


def _sigterm_at(step: int):
    def callback(info: StepInfo) -> None:
        if info.step == step:
            signal.raise_signal(signal.SIGTERM)

    return callback


def test_resume_after_sigterm_equals_uninterrupted(clt_store, tmp_path):
    whole = train.run(train_cfg(clt_store, tmp_path / "whole"))
    with pytest.raises(train.Preempted):
        train.run(train_cfg(clt_store, tmp_path / "split"), callbacks=[_sigterm_at(10)])
    assert json.loads((tmp_path / "split" / RUN_STATE_FILE).read_text())["step"] == 12
    resumed = train.run(train_cfg(clt_store, tmp_path / "split"))
    assert resumed.new_steps == whole.steps - 12
    a = load_file(str(tmp_path / "whole" / "clt" / TRAINING_WEIGHTS_FILE))
    b = load_file(str(tmp_path / "split" / "clt" / TRAINING_WEIGHTS_FILE))
    assert a.keys() == b.keys() and "threshold" in a and a["since_fired"].shape == (L * a["b_enc"].shape[1],)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _torchrun(store: Path, out: Path, ranks: int, *extra: str) -> None:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    args = [f"store={store}", f"out_dir={out}", "sae=clt", "sites=[blocks.*.mlp.hook_in]", "sae.k=4", *extra]
    args += ["sae.expansion_factor=4", "n_tokens=4096", "batch_size=256", "dtype=float32", "progress=false"]
    env = os.environ | {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([*launcher, "-m", "sae_train.cli", "train", *args], env=env, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_two_ranks_equal_one_process(clt_store, tmp_path):
    """torchrun (gloo): the per-layer BatchTopK selection is global across ranks, so two ranks
    train what one process trains."""
    _torchrun(clt_store, tmp_path / "one", 1)
    _torchrun(clt_store, tmp_path / "two", 2)
    one, two = (load_file(str(tmp_path / run / "clt" / TRAINING_WEIGHTS_FILE)) for run in ("one", "two"))
    for key in one:
        torch.testing.assert_close(two[key].float(), one[key].float(), rtol=1e-4, atol=1e-5, msg=key)


def test_clts_spread_over_ranks_equal_one_process(clt_store, tmp_path):
    """parallel.saes=true: a sweep's two CLTs, one per rank, each fed every layer's rows by the
    router, end as one process trains them."""
    sweep = "+sweep.k=[2,4]"
    _torchrun(clt_store, tmp_path / "one", 1, sweep)
    _torchrun(clt_store, tmp_path / "spread", 2, sweep, "parallel.saes=true")
    for tag in ("clt/k=2", "clt/k=4"):
        one, spread = (load_file(str(tmp_path / run / tag / TRAINING_WEIGHTS_FILE)) for run in ("one", "spread"))
        for key in one:
            torch.testing.assert_close(spread[key].float(), one[key].float(), rtol=1e-4, atol=1e-5, msg=f"{tag} {key}")


def test_warmed_up_step_records_no_sync_op(clt_store, tmp_path, monkeypatch):
    """As tests/test_train_syncs.py for the other architectures: a CLT step (with AuxK) makes
    the host wait for the device nowhere."""
    monkeypatch.setenv("SAE_TRAIN_KERNELS", "torch")
    cfg = train_cfg(clt_store, tmp_path / "run", n_tokens=65_536, dead_after_tokens=256, checkpoint_every_tokens=0)
    dist = Dist(device=torch.device("cpu"))
    trainer = Trainer(cfg, build_source(cfg, dist), dist)
    batches = trainer.source.batches(0)
    for _ in range(4):
        trainer.train_step(next(batches), 0)
    batch = next(batches)
    batches.close()
    with record_sync_ops() as ops:
        trainer.train_step(batch, 0)
    assert ops == []
    assert trainer.runs[0].dead_mask(cfg.dead_after_tokens).any()  # AuxK ran


def test_trains_live_over_every_layer(tiny_model_dir, tmp_path):
    sae = SAEConfig(architecture="clt", k=4, expansion_factor=2, target=TEMPLATE)
    corpus = write_corpus(tmp_path / "corpus")
    summary = train.run(
        live_train_cfg(tiny_model_dir("llama"), corpus, tmp_path / "live", ["blocks.*.mlp.hook_in"], sae)
    )
    meta = load_sae_cfg(summary.saes["clt"]["checkpoint"])
    assert meta["sites"] == SOURCES and meta["targets"] == TARGETS


def test_a_layer_target_template_gives_per_site_transcoders_their_own_layers_target(clt_store, tmp_path):
    cfg = train_cfg(clt_store, tmp_path / "run", sae=SAEConfig(architecture="batchtopk", k=4, target=TEMPLATE))
    summary = train.run(cfg)
    assert list(summary.saes) == SOURCES
    assert [load_sae_cfg(summary.saes[s]["checkpoint"])["target"] for s in SOURCES] == TARGETS


def test_a_store_without_the_mlp_input_site_is_named(tiny_model_dir, tmp_path):
    store = cache_layers(tiny_model_dir("llama"), tmp_path / "acts", ["blocks.0.hook_resid_post", *TARGETS])
    with pytest.raises(UserError, match=r"Site pattern 'blocks.\*.mlp.hook_in' matches no site of activation store"):
        train.run(train_cfg(store, tmp_path / "run"))


def test_bad_clt_configs_are_named():
    with pytest.raises(UserError, match="sae.target=blocks.{layer}.hook_mlp_out"):
        SAEConfig(architecture="clt")
    with pytest.raises(UserError, match="expected \\[n_tokens, 3, 10\\]"):
        clt()(torch.randn(4, 2, D_IN), target=torch.randn(4, L, D_OUT))


# ---------------------------------------------------------------------------------- circuit-tracer

INTEROP = Path(os.environ.get("SAE_TRAIN_INTEROP", REPO / ".venv-interop"))
INTEROP_PYTHON = INTEROP / "bin" / "python"

CIRCUIT_TRACER_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from safetensors.torch import load_file
    from circuit_tracer import ReplacementModel, attribute
    from circuit_tracer.utils.hf_utils import load_transcoder_from_hub

    export_dir, model_dir, probe = sys.argv[1:]
    transcoders, config = load_transcoder_from_hub(export_dir, device=torch.device("cpu"), dtype=torch.float32)
    assert type(transcoders).__name__ == "CrossLayerTranscoder", type(transcoders)
    tensors = load_file(probe)
    x = tensors["x"].transpose(0, 1)  # circuit-tracer's [L, n_pos, d]
    y = transcoders.forward(x).transpose(0, 1)
    print("max_diff", float((y - tensors["y"]).abs().max()), "scale", float(tensors["y"].abs().max()))
    model = ReplacementModel.from_pretrained_and_transcoders(
        model_dir, transcoders, backend="nnsight", device=torch.device("cpu"), dtype=torch.float32
    )
    graph = attribute("def value(self): return self.value", model, max_n_logits=3, batch_size=64)
    print("active_features", int(graph.active_features.shape[0]))
    """
)


def for_circuit_tracer(model_dir: Path, out: Path) -> Path:
    """A copy of a tiny model directory that circuit-tracer's transformers (<= 4.57) loads: ours
    (5.x) records the tokenizer class as TokenizersBackend, which 4.57 calls PreTrainedTokenizerFast."""
    shutil.copytree(model_dir, out)
    config = out / "tokenizer_config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"tokenizer_class": "PreTrainedTokenizerFast"}))
    return out


@pytest.mark.skipif(
    not INTEROP_PYTHON.exists(),
    reason=f"circuit-tracer's venv ({INTEROP}; `make interop`, or set SAE_TRAIN_INTEROP) is absent",
)
def test_circuit_tracer_loads_our_clt_and_computes_a_graph(clt_store, tiny_model_dir, tmp_path):
    summary = train.run(train_cfg(clt_store, tmp_path / "run"))
    export.run(
        ExportConfig(checkpoint=str(tmp_path / "run"), out_dir=str(tmp_path / "export"), format="circuit_tracer")
    )
    sae = load_sae(summary.saes["clt"]["checkpoint"])
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, L, sae.cfg.d_in, generator=gen) / torch.tensor(sae.normalization_scale)[None, :, None]
    save_file({"x": x.contiguous(), "y": sae.reconstruct(x)[1].contiguous()}, str(tmp_path / "probe.safetensors"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": ""}
    done = subprocess.run(
        [
            str(INTEROP_PYTHON),
            "-c",
            CIRCUIT_TRACER_SCRIPT,
            str((tmp_path / "export").resolve()),
            str(for_circuit_tracer(tiny_model_dir("llama"), tmp_path / "model").resolve()),
            str(tmp_path / "probe.safetensors"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    numbers = dict(line.split(" ", 1) for line in done.stdout.splitlines() if line.startswith(("max_diff", "active")))
    diff, scale = (float(v) for v in numbers["max_diff"].split(" scale "))
    assert diff <= 1e-5 * scale
    assert int(numbers["active_features"]) > 0
