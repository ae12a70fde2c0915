"""The eval stage on tiny models: splicing, the shared-prefix fast path against full forwards,
sweeps, outputs, the held-out split, bad input and the periodic-eval callback."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from sae_train import cache
from sae_train.atomic import temporary
from sae_train.data import DataConfig, TextConfig, TokenSpec, iter_documents
from sae_train.data.packing import keep_mask
from sae_train.errors import UserError
from sae_train.eval import EvalConfig, PeriodicEval, SiteEvaluator, layer_forwards, run
from sae_train.eval.stage import data_config
from sae_train.eval.tokens import held_out_windows
from sae_train.lm import LanguageModel, ModelConfig
from sae_train.sae import ARCHITECTURES, SAEConfig, create_sae, load_sae, load_sae_cfg, save_sae
from sae_train.sae.checkpoint import load_checkpoints, recorded
from sae_train.train import TrainConfig
from sae_train.train import run as train
from tests.tiny import write_corpus

TEXT = TextConfig(context_size=32)

SITE_ARCHS = sorted(a for a, cls in ARCHITECTURES.items() if not cls.cross_layer)
"""The architectures reading one site (cross-layer transcoders: tests/test_clt.py)."""


def load(path: Path) -> LanguageModel:
    return LanguageModel.load(ModelConfig(name=str(path), dtype="float32", device="cpu"))


@pytest.fixture(scope="module")
def lm(tiny_model_dir) -> LanguageModel:
    return load(tiny_model_dir("llama"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> DataConfig:
    """30 text files of pseudo-code; a file-level split holds out about a third of them."""
    return DataConfig(source="files", path=str(write_corpus(tmp_path_factory.mktemp("corpus"))), eval_fraction=0.35)


def save_checkpoint(
    directory: Path,
    lm: LanguageModel,
    data: DataConfig,
    site: str,
    arch: str = "topk",
    seed: int = 0,
    d_in: int | None = None,
    text: TextConfig = TEXT,
) -> Path:
    """A folded SAE with non-trivial weights and the metadata the trainer records."""
    d_in = d_in or lm.site_width(lm.site(site))
    sae = create_sae(SAEConfig(architecture=arch, k=4, d_sae=2 * d_in, seed=seed).resolved(d_in))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
        if arch in ("jumprelu", "batchtopk", "matryoshka"):
            sae.threshold.fill_(0.05)
    sae.constrain_()
    scale = 0.5
    source = {"source": "live", "model": lm.identity, "data": data.describe(), "text": asdict(text)}
    save_sae(
        sae.fold(scale),
        directory,
        {"site": site, "tag": directory.name, "normalization_scale": scale, "tokens_trained": 1000, "source": source},
    )
    return directory


def batch(lm: LanguageModel, corpus: DataConfig, n: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """n held-out windows and their counted positions."""
    ids = held_out_windows(lm.tokenizer, replace(corpus, split="eval"), TEXT, n * TEXT.context_size)
    return ids, keep_mask(ids, TokenSpec.from_tokenizer(lm.tokenizer, TEXT))


class IdentitySAE(torch.nn.Module):
    """Stand-in with the inference interface whose reconstruction is its input."""

    def __init__(self, d: int):
        super().__init__()
        self.cfg = SimpleNamespace(d_in=d, d_out=d, d_sae=d)
        self.W_dec = torch.nn.Parameter(torch.eye(d))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f

    def reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, x


# ---------------------------------------------------------------------------------- splicing


def test_identity_splice_gives_exactly_the_clean_ce_and_zero_kl(lm, corpus):
    ids, counted = batch(lm, corpus)
    site = lm.site("blocks.1.hook_resid_post")
    evaluator = SiteEvaluator(site, {"identity": IdentitySAE(32)})
    evaluator.add_batch(lm, ids, counted)
    m = evaluator.results(0.1)["identity"]
    assert m["ce_sae"] == m["ce_clean"]
    assert m["kl"] == 0.0
    assert m["fvu"] == 0.0 and m["ce_recovered"] == 1.0
    assert m["n_predictions"] == int(counted[:, 1:].sum()) > 0


def test_zero_splice_equals_a_manual_zero_ablation(lm, corpus):
    ids, counted = batch(lm, corpus)
    site = lm.site("blocks.1.hook_mlp_out")
    evaluator = SiteEvaluator(site, {}, ablations=("zero",))
    evaluator.add_batch(lm, ids, counted)

    def zero_counted(_module, _args, output):
        return torch.where(counted[..., None], torch.zeros_like(output), output)

    handle = lm.model.get_submodule(site.module).register_forward_hook(zero_counted)
    try:
        with torch.no_grad():
            logits = lm.model(ids).logits
    finally:
        handle.remove()
    scored = counted[:, 1:]
    manual = F.cross_entropy(logits[:, :-1][scored], ids[:, 1:][scored])
    assert evaluator.reference["zero"].mean_ce == pytest.approx(manual.item(), rel=1e-6)
    assert evaluator.reference["zero"].mean_kl > 0  # the ablation changed the predictions


def naive_numbers(lm, site, saes, ids, counted) -> dict[str, tuple[float, float]]:
    """(CE, KL) per condition from one full forward each, with lm.splice."""
    scored = counted[:, 1:]
    targets = ids[:, 1:][scored]
    with torch.no_grad():
        clean = torch.log_softmax(lm.model(ids).logits[:, :-1][scored].float(), -1)
        x = lm.capture([site], ids)[site.name]
        values = {name: sae.decode(sae.encode(x[counted].float())) for name, sae in saes.items()}
        values |= {"zero": torch.zeros(x.shape[-1]), "mean": x[counted].float().mean(0)}
        numbers = {}
        for name, value in values.items():

            def fn(a, value=value):
                out = a.clone()
                out[counted] = value.to(a.dtype)
                return out

            with lm.splice(site, fn):
                logp = torch.log_softmax(lm.model(ids).logits[:, :-1][scored].float(), -1)
            ce = F.cross_entropy(logp, targets).item()
            kl = F.kl_div(logp, clean, log_target=True, reduction="sum").item() / len(targets)
            numbers[name] = (ce, kl)
    numbers["clean"] = (F.cross_entropy(clean, targets).item(), 0.0)
    return numbers


@pytest.mark.parametrize(
    "site_name",
    ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_post", "blocks.2.hook_attn_out", "blocks.1.mlp.hook_post"],
)
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_shared_prefix_numbers_equal_full_forward_numbers(tiny_model_dir, corpus, tmp_path, family, site_name):
    lm = load(tiny_model_dir(family))
    site = lm.site(site_name)
    saes = {
        arch: load_sae(save_checkpoint(tmp_path / arch, lm, corpus, site_name, arch, seed=i))
        for i, arch in enumerate(("relu", "topk"))
    }
    ids, counted = batch(lm, corpus)
    evaluator = SiteEvaluator(site, saes)
    layer_calls = []
    hooks = [layer.mlp.register_forward_hook(lambda *_: layer_calls.append(1)) for layer in lm.layers]
    try:
        evaluator.add_batch(lm, ids, counted)
    finally:
        for h in hooks:
            h.remove()
    assert len(layer_calls) == layer_forwards(lm.n_layers, site.resume_layer, evaluator.n_conditions)["shared"]

    naive = naive_numbers(lm, site, saes, ids, counted)
    got = {name: (s.mean_ce, s.mean_kl) for name, s in {**evaluator.reference, **evaluator.spliced}.items()}
    assert got.keys() == naive.keys()
    for name, (ce, kl) in naive.items():
        assert got[name][0] == pytest.approx(ce, rel=1e-6), name
        assert got[name][1] == pytest.approx(kl, rel=1e-5, abs=1e-9), name


# ---------------------------------------------------------------------------------- the stage


def test_eval_split_shares_no_document_with_the_checkpoints_training_split(lm, corpus, tmp_path):
    save_checkpoint(tmp_path / "sae", lm, corpus, "blocks.1.hook_resid_post")
    held_out = data_config(recorded(load_checkpoints(str(tmp_path / "sae")), "data"))
    assert held_out.split == "eval" and held_out.path == corpus.path
    train, evaluated = set(iter_documents(corpus)), set(iter_documents(held_out))
    assert train and evaluated and not train & evaluated
    # An explicit data= override is read on its eval split too, whatever its split says.
    assert data_config(None, corpus).split == "eval"


def eval_config(checkpoint: Path, out: Path, **kw) -> EvalConfig:
    kw = {"n_tokens": 10 * TEXT.context_size, "batch_size": 4, "progress": False, **kw}
    return EvalConfig(checkpoint=str(checkpoint), model=ModelConfig(name="", device="cpu"), out_dir=str(out), **kw)


def test_sweep_at_two_sites_in_one_call(lm, corpus, tmp_path):
    run_dir = tmp_path / "run"
    resid, mlp = "blocks.1.hook_resid_post", "blocks.0.hook_mlp_out"
    for i, arch in enumerate(SITE_ARCHS):
        save_checkpoint(run_dir / resid / f"arch={arch}", lm, corpus, resid, arch, seed=i)
    save_checkpoint(run_dir / mlp, lm, corpus, mlp, "topk", seed=9)
    save_checkpoint(temporary(run_dir / mlp), lm, corpus, mlp, "topk", seed=10)  # a trainer's half-done save
    out = tmp_path / "eval"

    summary = run(eval_config(run_dir, out))  # the model comes from the checkpoints' record

    names = [mlp] + [f"{resid}/arch={a}" for a in SITE_ARCHS]  # sorted by path
    assert list(summary.saes) == names
    report = json.loads((out / "eval.json").read_text())
    assert list(report["saes"]) == names
    assert report["data"]["split"] == "eval" and report["model"]["name"] == lm.identity["name"]
    assert report["config"]["checkpoint"] == str(run_dir)
    tokens = report["tokens"]
    assert tokens["run"] == 10 * 32 and 0 < tokens["counted"] < tokens["run"]  # BOS/EOS never count
    for name, info in report["saes"].items():
        m = info["metrics"]
        for key in (
            "mse",
            "fvu",
            "explained_variance",
            "l0",
            "dead_fraction",
            "dense_fraction",
            "ce_clean",
            "ce_sae",
            "ce_zero",
            "ce_mean",
            "ce_recovered",
            "kl",
        ):
            assert isinstance(m[key], float), (name, key)
        assert m["n_tokens"] == tokens["counted"] and m["n_predictions"] == tokens["predictions"]
        assert sum(info["density"]["counts"]) + info["density"]["n_dead"] == info["d_sae"]
        assert info["checkpoint_cfg"]["site"] == info["site"]
    # The clean and ablated runs are shared by the SAEs of a site.
    at_resid = [report["saes"][n]["metrics"] for n in names[1:]]
    assert len({m["ce_clean"] for m in at_resid}) == 1 and len({m["ce_zero"] for m in at_resid}) == 1
    cost = report["cost"]
    n = len(SITE_ARCHS) + 3  # clean, zero and mean ablation + one splice per SAE
    assert cost[resid] == {"n_layers": 3, "resume_layer": 2, "conditions": n, **layer_forwards(3, 2, n)}
    assert cost[mlp]["conditions"] == 4 and cost[mlp]["shared"] == 3 + 3 * 3

    md = (out / "eval.md").read_text()
    assert "## Definitions" in md and all(f"| {n} |" in md for n in names)
    assert (out / "density.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = summary.table()
    assert "CE recovered" in table and "layer-forwards" in table and names[0] in table

    # One SAE evaluated alone gets the numbers it got in the sweep.
    alone = run(eval_config(run_dir / mlp, tmp_path / "alone"), lm=lm)
    assert alone.saes[mlp]["metrics"] == summary.saes[mlp]["metrics"]


@pytest.mark.parametrize("exclude", [True, False])
def test_eval_counts_exactly_the_positions_training_uses(lm, corpus, tmp_path, exclude):
    """Cache the eval windows: the store keeps one row per position eval counts, for both settings."""
    text, site, n_tokens = (
        TextConfig(context_size=32, exclude_special_tokens=exclude),
        "blocks.1.hook_resid_post",
        6 * 32,
    )
    stored = cache.run(
        cache.CacheConfig(
            model=ModelConfig(name=lm.identity["name"], dtype="float32", device="cpu"),
            data=replace(corpus, split="eval"),
            text=text,
            sites=[site],
            n_tokens=n_tokens,
            tokens_per_shard=n_tokens,
            store_dtype="float32",
            out_dir=str(tmp_path / "acts"),
            progress=False,
        ),
        lm,
    )
    save_checkpoint(tmp_path / "sae", lm, corpus, site, text=text)
    summary = run(eval_config(tmp_path / "sae", tmp_path / "out", n_tokens=n_tokens, downstream=False), lm=lm)
    counted = summary.payload["tokens"]["counted"]
    assert counted == stored.n_tokens
    assert (counted == n_tokens) != exclude  # special tokens left out only when excluded


def test_live_runs_that_differ_in_lr_evaluate_together(lm, corpus, tmp_path):
    """A multirun folder of live runs (one per lr) is one sweep to eval: the runs record the same
    text settings, and only text settings."""
    site, text = "blocks.1.hook_resid_post", TextConfig(context_size=32)
    for lr in (1e-3, 3e-3):
        train(
            TrainConfig(
                source="live",
                model=ModelConfig(name=lm.identity["name"], dtype="float32", device="cpu"),
                data=corpus,
                text=text,
                sites=[site],
                live_buffer_tokens=512,
                n_tokens=1024,
                batch_size=256,
                lr=lr,
                init_tokens=512,
                dtype="float32",
                progress=False,
                out_dir=str(tmp_path / "multirun" / f"lr={lr}"),
                sae=SAEConfig(architecture="topk", k=4, expansion_factor=2),
            ),
            lm=lm,
        )
    for lr in (1e-3, 3e-3):
        assert load_sae_cfg(tmp_path / "multirun" / f"lr={lr}" / site)["source"]["text"] == asdict(text)
    summary = run(eval_config(tmp_path / "multirun", tmp_path / "out", downstream=False), lm=lm)
    assert sorted(summary.saes) == [f"lr=0.001/{site}", f"lr=0.003/{site}"]
    assert summary.payload["text"] == asdict(text)


def test_reconstruction_only(lm, corpus, tmp_path):
    save_checkpoint(tmp_path / "sae", lm, corpus, "blocks.1.hook_resid_post")
    summary = run(eval_config(tmp_path / "sae", tmp_path / "out", downstream=False), lm=lm)
    metrics = summary.saes["sae"]["metrics"]
    assert "fvu" in metrics and "ce_sae" not in metrics
    assert "CE" not in summary.table() and summary.payload["cost"] == {}


def test_bad_input_is_a_clear_error(lm, corpus, tmp_path, tiny_model_dir):
    good = save_checkpoint(tmp_path / "good", lm, corpus, "blocks.1.hook_resid_post")
    out = tmp_path / "out"

    with pytest.raises(UserError, match="does not exist"):
        run(eval_config(tmp_path / "missing", out), lm=lm)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no SAE checkpoint"):
        run(eval_config(tmp_path / "empty", out), lm=lm)

    corrupt = save_checkpoint(tmp_path / "corrupt", lm, corpus, "blocks.1.hook_resid_post")
    (corrupt / "cfg.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        run(eval_config(corrupt, out), lm=lm)
    (corrupt / "cfg.json").write_text((good / "cfg.json").read_text())
    (corrupt / "sae.safetensors").write_bytes(b"garbage")
    with pytest.raises(UserError, match="corrupt"):
        run(eval_config(corrupt, out), lm=lm)

    # A site the model lacks: the error names it and lists the valid ones.
    save_checkpoint(tmp_path / "far", lm, corpus, "blocks.7.hook_resid_post", d_in=32)
    with pytest.raises(UserError, match=r"blocks\.7\.hook_resid_post.*has 3 layers.*Valid sites"):
        run(eval_config(tmp_path / "far", out), lm=lm)

    save_checkpoint(tmp_path / "narrow", lm, corpus, "blocks.1.hook_resid_post", d_in=16)
    with pytest.raises(UserError, match=r"d_in=16.*blocks\.1\.hook_resid_post.*width 32"):
        run(eval_config(tmp_path / "narrow", out), lm=lm)

    sweep = tmp_path / "mixed"
    save_checkpoint(sweep / "a", lm, corpus, "blocks.1.hook_resid_post")
    save_checkpoint(sweep / "b", load(tiny_model_dir("gpt2")), corpus, "blocks.1.hook_resid_post")
    with pytest.raises(UserError, match="different models"):
        run(eval_config(sweep, out), lm=lm)

    tiny_docs = tmp_path / "tiny_docs"
    tiny_docs.mkdir()
    for i in range(6):
        (tiny_docs / f"{i}.txt").write_text("hi")
    sparse = DataConfig(source="files", path=str(tiny_docs), eval_fraction=0.5)
    with pytest.raises(UserError, match="eval split .* holds no text"):
        run(eval_config(good, out, data=sparse), lm=lm)
    assert not out.exists()  # nothing written by a failed call


def test_periodic_eval_matches_the_stage(lm, corpus, tmp_path):
    sites = ("blocks.1.hook_resid_post", "blocks.0.hook_mlp_out")
    for i, site in enumerate(sites):
        save_checkpoint(tmp_path / "run" / site, lm, corpus, site, "relu", seed=i)
    summary = run(eval_config(tmp_path / "run", tmp_path / "out"), lm=lm)

    periodic = PeriodicEval.from_data(lm, corpus, TEXT, n_tokens=10 * TEXT.context_size, batch_size=4)
    saes = {site: (site, load_sae(tmp_path / "run" / site)) for site in sites}
    first, second = periodic(saes), periodic(saes)
    assert first == second  # fixed windows: comparable from call to call
    for site in sites:
        m = summary.saes[site]["metrics"]
        assert first[site] == pytest.approx(
            {"eval/fvu": m["fvu"], "eval/ce_recovered": m["ce_recovered"], "eval/kl": m["kl"], "eval/l0": m["l0"]},
            rel=1e-9,
        )
    with pytest.raises(ValueError, match="folded"):
        training_model = create_sae(SAEConfig(architecture="relu").resolved(32))
        periodic({"x": (sites[0], training_model)})
