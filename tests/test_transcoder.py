"""Transcoders (sae.target: read one site, write another; optional skip connection) for every
architecture: the math against a naive dense twin, folding of the two normalisation scales,
the checkpoint, training from a two-site store and live, the spliced eval, the SAELens export
and bad input."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sae_train import cache, export, train
from sae_train import eval as eval_stage
from sae_train.cache import CacheConfig
from sae_train.data import DataConfig, TextConfig
from sae_train.errors import UserError
from sae_train.eval import EvalConfig, PeriodicEval, SiteEvaluator
from sae_train.eval.downstream import next_token_log_probs
from sae_train.export import ExportConfig
from sae_train.hub import load_exported
from sae_train.lm import LanguageModel, ModelConfig
from sae_train.sae import SAE, SAEConfig, create_sae, kernels, load_sae, load_sae_cfg, save_sae
from sae_train.sae.saelens import from_saelens
from sae_train.sae.topk import annealed_k
from sae_train.store import StoreWriter, shardfile
from sae_train.train import TrainConfig
from sae_train.train.dist import Dist
from sae_train.train.resample import resample_dead_
from tests import store_util
from tests.synthetic import true_directions
from tests.synthetic import write_store as synthetic_store
from tests.tiny import write_corpus

ARCHS = ("relu", "topk", "batchtopk", "jumprelu")
SOURCE, TARGET = "blocks.1.mlp.hook_in", "blocks.1.hook_mlp_out"
D_IN, D_OUT, D_SAE = 12, 10, 48


def transcoder(arch: str, skip: bool, *, sparsity: str = "l1", seed: int = 0) -> SAE:
    """A training-state transcoder with every parameter moved off its initial value."""
    cfg = SAEConfig(architecture=arch, target=TARGET, skip=skip, k=5, d_sae=D_SAE, sparsity=sparsity, seed=seed)
    sae = create_sae(cfg.resolved(D_IN, D_OUT))
    sae.impl = "torch"
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen))
        if hasattr(sae, "threshold"):
            sae.threshold.copy_(0.05 + 0.1 * torch.rand(D_SAE, generator=gen))
    sae.constrain_()
    return sae


def data(n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D_IN, generator=gen) + 0.5
    return x, torch.tanh(x @ torch.randn(D_IN, D_OUT, generator=gen)) + 0.1 * torch.randn(n, D_OUT, generator=gen)


def naive_latents(sae: SAE, z: torch.Tensor) -> torch.Tensor:
    """Dense latents of the training forward, written out plainly (gradient through z)."""
    arch, k = sae.cfg.architecture, sae.cfg.k
    if arch == "relu":
        return torch.relu(z)
    if arch == "jumprelu":
        return z * (z > sae.threshold.detach())
    if arch == "topk":
        keep = torch.zeros_like(z, dtype=torch.bool).scatter(1, z.detach().topk(k, dim=1).indices, True)
    else:  # batchtopk: the k * B largest of the batch
        flat = torch.relu(z.detach()).flatten()
        keep = torch.zeros_like(flat, dtype=torch.bool).scatter(0, flat.topk(k * z.shape[0]).indices, True).view_as(z)
    return torch.relu(z) * keep


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("arch", ARCHS)
def test_forward_and_gradients_match_a_naive_dense_transcoder(arch, skip):
    sae = transcoder(arch, skip)
    x, y = data()
    out = sae(x, target=y)
    out.losses["mse"].backward()
    got = {name: p.grad.clone() for name, p in sae.named_parameters() if name != "threshold"}

    params = {name: p.detach().clone().requires_grad_() for name, p in sae.named_parameters() if name != "threshold"}
    z = x @ params["W_enc"] + params["b_enc"]  # no b_dec subtraction: b_dec is an output-space bias
    y_hat = naive_latents(sae, z) @ params["W_dec"] + params["b_dec"]
    if skip:
        y_hat = y_hat + x @ params["W_skip"]
    mse = (y_hat - y).pow(2).sum(-1).mean()
    mse.backward()
    torch.testing.assert_close(out.x_hat, y_hat, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.losses["mse"], mse, rtol=1e-5, atol=1e-6)
    assert set(got) == set(params) and ("W_skip" in got) == skip
    for name, p in params.items():
        torch.testing.assert_close(got[name], p.grad, rtol=1e-4, atol=1e-5, msg=name)
    if skip:
        assert got["W_skip"].abs().sum() > 0  # the skip connection learns


@pytest.mark.skipif(not kernels.available(), reason="the fused CPU kernels are not built here")
@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("arch", (*ARCHS, "matryoshka"))
def test_fused_step_of_transcoders_matches_the_torch_step(arch, skip):
    """Transcoders of every architecture train through the fused kernels (the encoder's centring
    zeroed; the TopK family's decode against the target): same outputs, losses (AuxK included)
    and gradients as the plain-PyTorch step."""
    x, y = data(128)
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[::3] = True
    results = []
    for impl in ("auto", "torch"):
        sae = transcoder(arch, skip)
        sae.impl = impl
        assert sae._fast_path(x) == (impl == "auto")
        if impl == "auto":  # the fused step, not a fallback to the PyTorch one
            sae._forward_torch = None  # type: ignore[method-assign]
        out = sae(x, target=y, dead_mask=dead, sparsity_scale=0.5)
        out.losses["loss"].backward()
        results.append((out, {n: p.grad.clone() for n, p in sae.named_parameters()}))
    (fast, g_fast), (ref, g_ref) = results
    torch.testing.assert_close(fast.x_hat, ref.x_hat, rtol=1e-5, atol=1e-5)
    assert set(fast.losses) == set(ref.losses)
    for name in ref.losses:
        torch.testing.assert_close(fast.losses[name], ref.losses[name], rtol=1e-5, atol=1e-6)
    if arch in ("topk", "batchtopk", "matryoshka"):
        assert ref.losses["auxk"] > 0
        torch.testing.assert_close(fast.stats, ref.stats)
    for name in g_ref:
        torch.testing.assert_close(g_fast[name], g_ref[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_auxk_models_the_target_residual(arch):
    sae = transcoder(arch, skip=True)
    x, y = data()
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[::3] = True
    out = sae(x, target=y, dead_mask=dead)
    ids = dead.nonzero().squeeze(1)
    with torch.no_grad():
        zd = x @ sae.W_enc[:, ids] + sae.b_enc[ids]
        top = zd.topk(min(sae.cfg.aux_k, ids.numel()), dim=1).indices
        f = torch.zeros_like(zd).scatter(1, top, torch.relu(zd.gather(1, top)))
        e = y - out.x_hat
        expect = (f @ sae.W_dec[ids] - e).pow(2).sum() / (e - e.mean(0)).pow(2).sum()
    torch.testing.assert_close(out.losses["auxk"], expect, rtol=1e-4, atol=1e-6)
    assert sae.cfg.aux_k == D_OUT // 2  # AuxK's default scales with the output it models


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("arch,sparsity", [(a, "l1") for a in ARCHS] + [("relu", "l1_decnorm")])
def test_folded_transcoder_acts_on_raw_activations(arch, sparsity, skip, tmp_path):
    """fold(source scale, target scale): on raw inputs the folded weights give the raw-unit
    target that the training model gives in normalised units, to 1e-5; save/load keeps it."""
    sae = transcoder(arch, skip, sparsity=sparsity)
    if sparsity == "l1_decnorm":
        with torch.no_grad():
            sae.W_dec.mul_(torch.linspace(0.2, 3.0, D_SAE)[:, None])
    x_raw, _ = data(128)
    x_raw = 7.0 * x_raw
    s_in, s_out = 0.13, 2.7
    folded = sae.fold(s_in, s_out)
    latents, y_raw = folded.reconstruct(x_raw)
    with torch.no_grad():
        f_train, y_train = sae.reconstruct(x_raw * s_in)
    torch.testing.assert_close(y_raw, y_train / s_out, rtol=1e-5, atol=1e-5)
    assert torch.equal(latents != 0, f_train != 0)
    if folded.unit_norm_decoder or sparsity == "l1_decnorm":
        torch.testing.assert_close(folded.W_dec.norm(dim=1), torch.ones(D_SAE), rtol=1e-5, atol=1e-5)

    save_sae(folded, tmp_path / "t", {"site": SOURCE})
    meta = load_sae_cfg(tmp_path / "t")
    assert (meta["site"], meta["target"], meta["d_in"], meta["d_out"], meta["skip"]) == (
        SOURCE,
        TARGET,
        D_IN,
        D_OUT,
        skip,
    )
    assert (meta["normalization_scale"], meta["target_normalization_scale"]) == (s_in, s_out)
    loaded = load_sae(tmp_path / "t")
    assert loaded.cfg.is_transcoder and loaded.target_normalization_scale == s_out
    assert torch.equal(loaded.reconstruct(x_raw)[1], y_raw)
    shapes = {n: tuple(getattr(loaded, n).shape) for n in loaded.inference_tensors}
    assert shapes["W_enc"] == (D_IN, D_SAE) and shapes["W_dec"] == (D_SAE, D_OUT) and shapes["b_dec"] == (D_OUT,)
    assert shapes.get("W_skip") == ((D_IN, D_OUT) if skip else None)


def test_sae_math_is_unchanged_by_the_transcoder_option():
    """An SAE (no target) still centres its input by b_dec and folds with one scale."""
    sae = create_sae(SAEConfig(architecture="relu", d_sae=16).resolved(8))
    with torch.no_grad():
        sae.b_dec.fill_(0.3)
    x = torch.randn(5, 8)
    torch.testing.assert_close(sae.encode(x), torch.relu((x - 0.3) @ sae.W_enc + sae.b_enc))
    assert sae.cfg.d_out == 8 and not sae.cfg.is_transcoder
    with pytest.raises(ValueError, match="one normalization scale"):
        sae.fold(0.5, 2.0)


def test_bad_configs_are_named():
    with pytest.raises(UserError, match="skip"):
        SAEConfig(skip=True)
    with pytest.raises(UserError, match="d_out"):
        SAEConfig(d_in=8, d_out=6)
    sae = transcoder("topk", False)
    x, y = data(8)
    with pytest.raises(UserError, match=r"one row of site blocks.1.hook_mlp_out"):
        sae(x, target=y[:5])
    with pytest.raises(UserError, match="sweep.target"):
        TrainConfig(store="s", sae=SAEConfig(target=TARGET), sweep={"target": [TARGET]})
    with pytest.raises(UserError, match="includes sae.target"):
        TrainConfig(source="live", sites=[TARGET], sae=SAEConfig(target=TARGET))


# ------------------------------------------------------------------------------- the model side


def load(path: Path) -> LanguageModel:
    return LanguageModel.load(ModelConfig(name=str(path), dtype="float32", device="cpu"))


def folded_transcoder(lm: LanguageModel, skip: bool, seed: int = 0) -> SAE:
    d_in, d_out = (lm.site_width(lm.site(s)) for s in (SOURCE, TARGET))
    cfg = SAEConfig(architecture="relu", target=TARGET, skip=skip, d_sae=64, seed=seed).resolved(d_in, d_out)
    sae = create_sae(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return sae.fold(1.0, 1.0)


def ce_by_hand(lm: LanguageModel, input_ids: torch.Tensor, mlp_out) -> tuple[float, float]:
    """(clean CE, CE with layer 1's MLP output replaced by mlp_out(MLP input)), by module hooks."""
    mlp = lm.layers[1].mlp
    with torch.no_grad():
        clean = lm.model(input_ids).logits
        handle = mlp.register_forward_hook(lambda m, args, out: mlp_out(args[0]))
        try:
            spliced = lm.model(input_ids).logits
        finally:
            handle.remove()
    scored = torch.ones_like(input_ids[:, 1:], dtype=torch.bool)
    targets = input_ids[:, 1:].flatten()

    def ce(logits: torch.Tensor) -> float:
        return float(-next_token_log_probs(logits, scored).gather(1, targets[:, None]).mean())

    return ce(clean), ce(spliced)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_spliced_ce_reads_the_mlp_input_in_the_same_forward(family, tiny_model_dir):
    lm = load(tiny_model_dir(family))
    sae = folded_transcoder(lm, skip=True)
    input_ids = torch.randint(3, lm.model.config.vocab_size, (3, 16), generator=torch.Generator().manual_seed(0))
    counted = torch.ones_like(input_ids, dtype=torch.bool)
    evaluator = SiteEvaluator(lm.site(TARGET), {"t": sae}, source=lm.site(SOURCE))
    evaluator.add_batch(lm, input_ids, counted)
    metrics = evaluator.results(dense_threshold=1.0)["t"]
    clean, spliced = ce_by_hand(lm, input_ids, lambda x: sae.reconstruct(x.flatten(0, 1))[1].view(*x.shape[:2], -1))
    assert metrics["ce_clean"] == pytest.approx(clean, rel=1e-5)
    assert metrics["ce_sae"] == pytest.approx(spliced, rel=1e-5)
    assert metrics["ce_sae"] != pytest.approx(clean, rel=1e-3)

    # the FVU is the target's: 1 - explained variance of the MLP output by the transcoder's output
    acts = lm.capture([lm.site(SOURCE), lm.site(TARGET)], input_ids)
    with torch.no_grad():
        y = acts[TARGET].flatten(0, 1).double()
        y_hat = sae.reconstruct(acts[SOURCE].flatten(0, 1))[1].double()
        fvu = float((y - y_hat).pow(2).sum() / (y - y.mean(0)).pow(2).sum())
    assert metrics["fvu"] == pytest.approx(fvu, rel=1e-6)


def test_reconstruction_only_and_periodic_eval_agree_with_the_full_eval(tiny_model_dir):
    lm = load(tiny_model_dir("llama"))
    sae = folded_transcoder(lm, skip=True)
    input_ids = torch.randint(3, lm.model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(2))
    counted = torch.ones_like(input_ids, dtype=torch.bool)
    full, quick = (
        SiteEvaluator(lm.site(TARGET), {"t": sae}, source=lm.site(SOURCE), downstream=d) for d in (True, False)
    )
    for evaluator in (full, quick):
        evaluator.add_batch(lm, input_ids, counted)
    m_full, m_quick = (e.results(dense_threshold=1.0)["t"] for e in (full, quick))
    assert m_quick["fvu"] == m_full["fvu"] and m_quick["l0"] == m_full["l0"]
    periodic = PeriodicEval(lm, input_ids, TextConfig(context_size=16))({"t": (SOURCE, sae)})["t"]
    assert periodic["eval/fvu"] == pytest.approx(m_full["fvu"], rel=1e-9)
    assert periodic["eval/kl"] == pytest.approx(m_full["kl"], rel=1e-9)


def test_resampling_points_dead_latents_at_badly_transcoded_tokens():
    """A dead latent's decoder row becomes a (centred) target direction and its encoder column an
    input direction, both taken from one token."""
    sae = transcoder("relu", skip=False)
    x, y = data(256)
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[:3] = True
    optimizer = torch.optim.Adam(sae.parameters())
    count = resample_dead_(sae, optimizer, dead, lambda n: {SOURCE: x, TARGET: y}, Dist(), (SOURCE, 1.0), (TARGET, 1.0))
    assert count == 3
    with torch.no_grad():
        for i in range(3):
            dec = sae.W_dec[i] / sae.W_dec[i].norm()
            enc = sae.W_enc[:, i] / sae.W_enc[:, i].norm()
            token = int(((y - sae.b_dec) / (y - sae.b_dec).norm(dim=1, keepdim=True) @ dec).argmax())
            torch.testing.assert_close(
                dec, (y[token] - sae.b_dec) / (y[token] - sae.b_dec).norm(), rtol=1e-5, atol=1e-5
            )
            torch.testing.assert_close(enc, x[token] / x[token].norm(), rtol=1e-5, atol=1e-5)


def test_a_transcoder_equal_to_the_mlp_gives_clean_ce(tiny_model_dir):
    """GPT-2 with a linear MLP (activation removed): the skip transcoder W_skip = W_fc W_proj,
    b_dec = b_fc W_proj + b_proj, no live latents, computes the MLP exactly, so CE is clean."""
    lm = load(tiny_model_dir("gpt2"))
    mlp = lm.layers[1].mlp
    original = mlp.act
    mlp.act = torch.nn.Identity()
    try:
        sae = folded_transcoder(lm, skip=True)
        with torch.no_grad():
            sae.W_skip.copy_(mlp.c_fc.weight @ mlp.c_proj.weight)
            sae.b_dec.copy_(mlp.c_fc.bias @ mlp.c_proj.weight + mlp.c_proj.bias)
            sae.b_enc.fill_(-1e3)  # no latent fires
        input_ids = torch.randint(3, lm.model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
        evaluator = SiteEvaluator(lm.site(TARGET), {"t": sae}, source=lm.site(SOURCE))
        evaluator.add_batch(lm, input_ids, torch.ones_like(input_ids, dtype=torch.bool))
        metrics = evaluator.results(dense_threshold=1.0)["t"]
    finally:
        mlp.act = original
    assert metrics["ce_sae"] == pytest.approx(metrics["ce_clean"], rel=1e-5)
    assert metrics["kl"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["fvu"] < 1e-9 and metrics["l0"] == 0
    assert metrics["ce_recovered"] == pytest.approx(1.0, abs=1e-4)


# ------------------------------------------------------------------------------- end to end


def cache_two_sites(model_dir: Path, out: Path) -> None:
    cache.run(
        CacheConfig(
            model=ModelConfig(name=str(model_dir), dtype="float32", device="cpu"),
            sites=[SOURCE, TARGET],
            text=TextConfig(context_size=32),
            n_tokens=4096,
            tokens_per_shard=1024,
            batch_size=128,
            store_dtype="float32",
            out_dir=str(out),
            progress=False,
        )
    )


@pytest.mark.parametrize("impl", ["auto", "torch"])
@pytest.mark.parametrize("arch", ["topk", "batchtopk", "matryoshka", "clt"])
def test_k_anneals_from_2k_to_k_over_the_first_part_of_a_transcoders_run(arch, impl):
    """`SAE.progress` (the trainer sets it) drives the training selection's size on both paths;
    inference keeps k."""
    k, B, L = 5, 32, 3
    cfg = SAEConfig(architecture=arch, target=TARGET, k=k, d_sae=D_SAE, n_layers=L if arch == "clt" else 0)
    cfg = dataclasses.replace(cfg.resolved(D_IN, D_OUT), k_anneal=0.2)  # BatchTopK's and a CLT's default: 0
    assert [annealed_k(cfg, p) for p in (0.0, 0.05, 0.1, 0.2, 0.9)] == [10, 9, 8, 5, 5]
    assert annealed_k(dataclasses.replace(cfg, k_anneal=0.0), 0.0) == k
    assert annealed_k(dataclasses.replace(cfg, k=40), 0.0) == D_SAE  # never more than the latents
    sae = create_sae(cfg)
    sae.impl = impl
    x, y = data(B)
    if arch == "clt":
        x, y = x[:, None].expand(B, L, D_IN), y[:, None].expand(B, L, D_OUT)
    rows = B * (L if arch == "clt" else 1)
    for progress, expected in ((0.0, 2 * k), (0.1, 8), (0.5, k)):
        sae.progress = progress
        assert sae(x, target=y).latents.indices.numel() == rows * expected
    if arch == "topk":
        assert (sae.encode(x) > 0).sum(1).eq(k).all()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_trains_from_a_two_site_store_evaluates_and_exports(family, tiny_model_dir, tmp_path):
    cache_two_sites(tiny_model_dir(family), tmp_path / "acts")
    summary = train.run(
        TrainConfig(
            store=str(tmp_path / "acts"),
            out_dir=str(tmp_path / "tc"),
            n_tokens=16384,
            batch_size=256,
            dtype="float32",
            progress=False,
            sae=SAEConfig(architecture="topk", k=8, expansion_factor=4, target=TARGET, skip=True),
        )
    )
    assert list(summary.saes) == [SOURCE]  # the target is no training site
    logged = [json.loads(line) for line in (tmp_path / "tc" / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["fvu"] < 0.5 * logged[0]["fvu"] and logged[-1]["fvu"] < 0.5
    assert logged[0]["l0"] > 1.2 * 8 >= logged[-1]["l0"]  # k annealed over the first fifth (sae.k_anneal)

    ckpt = Path(summary.saes[SOURCE]["checkpoint"])
    sae = load_sae(ckpt)
    meta = load_sae_cfg(ckpt)
    assert sae.cfg.is_transcoder and meta["site"] == SOURCE and meta["target"] == TARGET
    assert meta["normalization_scale"] != meta["target_normalization_scale"]

    evaluation = eval_stage.run(
        EvalConfig(
            checkpoint=str(tmp_path / "tc"),
            out_dir=str(tmp_path / "eval"),
            model=ModelConfig(name="", device="cpu"),
            n_tokens=512,
            batch_size=4,
            progress=False,
        )
    )
    entry = evaluation.payload["saes"][SOURCE]
    assert entry["target"] == TARGET and entry["d_out"] == sae.cfg.d_out
    m = entry["metrics"]
    assert m["fvu"] < 0.8 and m["ce_clean"] <= m["ce_zero"] + 1.0 and m["kl"] >= 0
    assert f"{SOURCE}->{TARGET}" in evaluation.payload["cost"]


def test_trains_live_on_both_sites(tiny_model_dir, tmp_path):
    model = ModelConfig(name=str(tiny_model_dir("llama")), dtype="float32", device="cpu")
    data = DataConfig(source="files", path=str(write_corpus(tmp_path / "corpus")))
    summary = train.run(
        TrainConfig(
            source="live",
            model=model,
            data=data,
            text=TextConfig(context_size=32),
            sites=[SOURCE],
            n_tokens=2048,
            batch_size=256,
            dtype="float32",
            progress=False,
            live_buffer_tokens=1024,
            out_dir=str(tmp_path / "tc"),
            sae=SAEConfig(architecture="relu", expansion_factor=2, target=TARGET),
        )
    )
    sae = load_sae(summary.saes[SOURCE]["checkpoint"])
    assert sae.cfg.target == TARGET and summary.saes[SOURCE]["metrics"]["fvu"] < 1.5


def test_a_run_written_before_the_transcoder_fields_resumes(tmp_path):
    """A run_state.json whose SAE config lacks target/d_out/skip (written by an older version)
    resumes: the missing fields compare as their defaults."""
    store = synthetic_store(tmp_path / "store", true_directions(16, 8), 2048)
    config = TrainConfig(
        store=str(store),
        out_dir=str(tmp_path / "sae"),
        n_tokens=1024,
        batch_size=256,
        progress=False,
        sae=SAEConfig(architecture="topk", k=2, expansion_factor=2),
    )
    first = train.run(config)
    state_file = tmp_path / "sae" / "run_state.json"
    state = json.loads(state_file.read_text())
    for key in ("target", "d_out", "skip"):
        del state["config"]["sae"][key]
    state_file.write_text(json.dumps(state))
    again = train.run(config)
    assert again.new_steps == 0 and again.steps == first.steps


def test_target_missing_from_the_store_is_named(tiny_model_dir, tmp_path):
    cache.run(
        CacheConfig(
            model=ModelConfig(name=str(tiny_model_dir("llama")), dtype="float32", device="cpu"),
            sites=[SOURCE],
            text=TextConfig(context_size=32),
            n_tokens=1024,
            tokens_per_shard=1024,
            batch_size=128,
            store_dtype="float32",
            out_dir=str(tmp_path / "acts"),
            progress=False,
        )
    )
    for sites in ([], [SOURCE]):
        with pytest.raises(
            UserError, match=rf"sae.target={TARGET} is not in activation store.*sites=\[{SOURCE},{TARGET}\]"
        ):
            train.run(
                TrainConfig(
                    store=str(tmp_path / "acts"),
                    sites=sites,
                    out_dir=str(tmp_path / "tc"),
                    n_tokens=256,
                    batch_size=256,
                    progress=False,
                    sae=SAEConfig(target=TARGET),
                )
            )


def test_target_rows_not_lining_up_with_the_source_are_refused(tmp_path):
    """A store whose shard holds fewer target rows than source rows (not written by sae-train
    cache, which writes every site of a token together) is refused before training."""
    spec = {"model": {"name": "toy", "revision": "r1", "dtype": "float32"}, "context_size": 16, "seed": 0}
    with StoreWriter(tmp_path / "acts", spec, {SOURCE: 6, TARGET: 4}, torch.float32) as w:
        w.write_shard(
            0,
            {SOURCE: torch.randn(32, 6), TARGET: torch.randn(32, 4)},
            torch.zeros(32, dtype=torch.int32),
            torch.arange(32, dtype=torch.int32),
        )
    shard = next((tmp_path / "acts").glob("shard-*.safetensors"))
    _rewrite_target_rows(shard, 31)
    with pytest.raises(UserError, match=r"do not line up with the source's.*cache sites=\["):
        train.run(
            TrainConfig(
                store=str(tmp_path / "acts"),
                out_dir=str(tmp_path / "tc"),
                n_tokens=32,
                batch_size=32,
                progress=False,
                sae=SAEConfig(target=TARGET),
            )
        )


def _rewrite_target_rows(shard: Path, rows: int, site: str = TARGET) -> None:
    """Rewrite a shard (and its size in the manifest) with only `rows` rows of `site`."""
    tensors = shardfile.open_tensors(shard, shardfile.read_header(shard))
    tensors = {k: v.clone() for k, v in tensors.items()}
    tensors[site] = tensors[site][:rows]
    shard.write_bytes(b"".join(bytes(part) for part in shardfile.encode(tensors)))
    manifest_file = shard.parent / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    for entry in manifest["shards"]:
        if entry["file"] == shard.name:
            entry["n_bytes"] = shard.stat().st_size
    manifest_file.write_text(json.dumps(manifest))


def test_non_finite_target_rows_are_named(tmp_path):
    source, target = list(store_util.SITES)
    store_util.write_store(tmp_path / "acts", 2, torch.float32)
    store_util.overwrite_rows(next((tmp_path / "acts").glob("shard-*.safetensors")), target, range(2, 4), float("nan"))
    with pytest.raises(UserError, match=rf"Activations of site {target} in store .* not finite"):
        train.run(
            TrainConfig(
                store=str(tmp_path / "acts"),
                sites=[source],
                out_dir=str(tmp_path / "tc"),
                n_tokens=16,
                batch_size=8,
                progress=False,
                sae=SAEConfig(target=target, k=2),
            )
        )


def test_saelens_loads_the_export_and_reconstructs_as_ours(tiny_model_dir, tmp_path):
    sae_lens = pytest.importorskip("sae_lens")
    lm = load(tiny_model_dir("llama"))
    x = lm.capture([lm.site(SOURCE)], torch.randint(3, 300, (2, 16)))[SOURCE].flatten(0, 1)
    for arch, skip, name in [
        ("relu", False, "transcoder"),
        ("relu", True, "skip_transcoder"),
        ("jumprelu", False, "jumprelu_transcoder"),
        ("batchtopk", True, "jumprelu_skip_transcoder"),
    ]:
        d_in, d_out = (lm.site_width(lm.site(s)) for s in (SOURCE, TARGET))
        sae = create_sae(SAEConfig(architecture=arch, target=TARGET, skip=skip, d_sae=64, k=4).resolved(d_in, d_out))
        with torch.no_grad():
            for p in sae.parameters():
                p.add_(0.3 * torch.randn(p.shape))
            if hasattr(sae, "threshold"):
                sae.threshold.fill_(0.02)
        sae.constrain_()
        ckpt = tmp_path / arch / str(skip) / "ckpt"
        meta = {"site": SOURCE, "source": {"model": lm.identity}}
        save_sae(sae.fold(0.4, 1.7), ckpt, meta)
        out = tmp_path / arch / str(skip) / "export"
        export.run(ExportConfig(checkpoint=str(ckpt), out_dir=str(out)))
        folder = next(p.parent for p in out.rglob("sae_weights.safetensors"))
        cfg = json.loads((folder / "cfg.json").read_text())
        assert cfg["architecture"] == name and cfg["d_out"] == d_out
        assert cfg["metadata"]["hook_name"] == SOURCE and cfg["metadata"]["hook_name_out"] == TARGET
        assert "`metadata.hook_name_out`" in (out / "README.md").read_text()  # the model card says what it computes
        theirs = sae_lens.SAE.load_from_disk(str(folder), device="cpu")
        ours = load_sae(ckpt)
        f, y_hat = ours.reconstruct(x)
        with torch.no_grad():
            torch.testing.assert_close(theirs.encode(x), f, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(theirs(x), y_hat, rtol=1e-5, atol=1e-5)
        back = load_exported(folder)  # our reader: the same transcoder, exactly
        assert back.cfg == ours.cfg and torch.equal(back.reconstruct(x)[1], y_hat)
        del cfg["metadata"]["sae_train"]  # as a transcoder trained elsewhere: same outputs
        foreign = from_saelens(cfg, load_file(folder / "sae_weights.safetensors"))
        assert foreign.cfg.target == TARGET
        torch.testing.assert_close(foreign.reconstruct(x)[1], y_hat, rtol=1e-5, atol=1e-5)


def test_a_topk_transcoder_is_not_exported_to_saelens(tmp_path):
    sae = transcoder("topk", skip=False)
    save_sae(sae.fold(1.0, 1.0), tmp_path / "ckpt", {"site": SOURCE})
    with pytest.raises(UserError, match="SAELens has no topk transcoder.*batchtopk"):
        export.run(ExportConfig(checkpoint=str(tmp_path / "ckpt"), out_dir=str(tmp_path / "export")))


def _mlp_like(n: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """An MLP input with a large mean (3x the spread) and an output computed from it."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, D_IN, generator=gen) + 3 * torch.randn(D_IN, generator=gen)
    return x, torch.tanh(x @ torch.randn(D_IN, D_OUT, generator=gen))


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_init_centres_a_transcoders_pre_activations(arch):
    """A transcoder does not subtract b_dec from its input, so init_from_data sets b_enc =
    -mean(x) @ W_enc (sparsify's fix): every latent's pre-activation is centred on the sample and
    nearly every latent is selected in the first batch (uncentred, the mean decides which
    latents can ever fire). The decoder starts at zero, so the first gradient fits the decoder
    and leaves the encoder where init put it."""
    x, y = _mlp_like()
    sae = create_sae(SAEConfig(architecture=arch, target=TARGET, k=4, d_sae=D_SAE).resolved(D_IN, D_OUT))
    sae.impl = "torch"
    sae.init_from_data(x, y)
    z = sae._preact(x)
    assert z.mean(0).abs().max() < 1e-4 * z.std(0).min()
    fired = (sae(x, target=y).latents.to_dense() > 0).any(0)
    assert fired.float().mean() > 0.9
    assert not sae.unit_norm_decoder and torch.equal(sae.W_dec, torch.zeros_like(sae.W_dec))
    sae(x, target=y).losses["loss"].backward()
    assert sae.W_dec.grad.abs().sum() > 0
    assert not sae.W_enc.grad.any() and not sae.b_enc.grad.any()


def test_a_topk_transcoders_rows_share_one_norm_so_its_fold_keeps_the_ranking():
    """Per-token top-k survives only a uniform rescaling: after each step a TopK transcoder's
    rows take their mean norm (rows still at zero stay there), BatchTopK's stay free; folding
    (zero rows scaled like the others) then reproduces the training forward."""
    x, y = _mlp_like(512)
    for arch in ("topk", "batchtopk"):
        sae = create_sae(SAEConfig(architecture=arch, target=TARGET, k=4, d_sae=D_SAE).resolved(D_IN, D_OUT))
        with torch.no_grad():
            sae.W_dec[1:].copy_(torch.randn(D_SAE - 1, D_OUT, generator=torch.Generator().manual_seed(1)))
            sae.W_enc.add_(0.3 * torch.randn(D_IN, D_SAE, generator=torch.Generator().manual_seed(2)))
        free = sae.W_dec.norm(dim=1)
        sae.constrain_()
        norms = sae.W_dec.norm(dim=1)
        if arch == "batchtopk":
            assert torch.equal(norms, free)
            continue
        assert norms[0] == 0 and torch.allclose(norms[1:], free[1:].mean().expand(D_SAE - 1))
        sae.impl = "torch"
        out = sae(x * 2.0, target=y * 0.5)
        folded = sae.fold(2.0, 0.5)
        _, y_hat = folded.reconstruct(x)
        torch.testing.assert_close(y_hat, out.x_hat.detach() / 0.5, rtol=1e-4, atol=1e-4)


def test_a_unit_norm_transcoders_decoder_starts_along_what_its_latents_fire_on():
    """ReLU (L1) rows stay unit-norm: each starts along the centred target weighted by its
    latent's ReLU'd pre-activation, and the encoder takes the least-squares scale."""
    x, y = _mlp_like()
    sae = create_sae(SAEConfig(architecture="relu", target=TARGET, d_sae=D_SAE).resolved(D_IN, D_OUT))
    sae.impl = "torch"
    sae.init_from_data(x, y)
    z = sae._preact(x)
    aligned = torch.relu(z).t() @ (y - sae.b_dec)
    assert torch.nn.functional.cosine_similarity(sae.W_dec, aligned, dim=1).min() > 1 - 1e-5
    r = sae(x, target=y).x_hat.detach() - sae.b_dec.detach()
    assert float((r * (y - sae.b_dec.detach())).sum() / (r * r).sum()) == pytest.approx(1.0, rel=1e-3)
