"""Transcoder sets (every layer's MLP transcoder from one pass: site patterns blocks.*.KIND and
sae.target=blocks.{layer}.KIND) and their export to circuit-tracer: the folded tensors against
circuit-tracer's math, bad input, and circuit-tracer itself (the `make interop` venv) loading a
set trained on a tiny random Llama and computing an attribution graph."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sae_train import cache, export, train
from sae_train import eval as eval_stage
from sae_train.cache import CacheConfig
from sae_train.circuit_tracer import (
    THRESHOLD,
    save_model,
    transcoder_reference,
    transcoder_tensors,
)
from sae_train.data import DataConfig, TextConfig, TokenSpec
from sae_train.data.packing import keep_mask
from sae_train.errors import UserError
from sae_train.eval import EvalConfig
from sae_train.eval.tokens import held_out_windows
from sae_train.export import ExportConfig
from sae_train.lm import LanguageModel, ModelConfig
from sae_train.lm.sites import expand_sites, layer_target, model_site_names
from sae_train.sae import SAEConfig, load_sae
from sae_train.store import ActivationStore, StoreWriter
from sae_train.train import TrainConfig
from tests.test_transcoder import _rewrite_target_rows, transcoder
from tests.tiny import live_train_cfg, write_corpus

REPO = Path(__file__).resolve().parents[1]
INTEROP = Path(os.environ.get("SAE_TRAIN_INTEROP", REPO / ".venv-interop"))
"""circuit-tracer's own venv (`make interop`); SAE_TRAIN_INTEROP points elsewhere."""
INTEROP_PYTHON = INTEROP / "bin" / "python"
needs_interop = pytest.mark.skipif(
    not INTEROP_PYTHON.is_file(),
    reason=f"no circuit-tracer venv at {INTEROP}: run `make interop` (or set SAE_TRAIN_INTEROP to one)",
)
SET = dict(sites=["blocks.*.mlp.hook_in"], target="blocks.{layer}.hook_mlp_out")
N_LAYERS = 3  # tests/tiny.py's models


# ------------------------------------------------------------------------------------ site patterns


def test_site_patterns_expand_to_every_layer_and_pair_targets():
    model = model_site_names(N_LAYERS)
    assert expand_sites(["blocks.*.mlp.hook_in", "blocks.1.hook_resid_post"], model, where="m") == [
        "blocks.0.mlp.hook_in",
        "blocks.1.mlp.hook_in",
        "blocks.2.mlp.hook_in",
        "blocks.1.hook_resid_post",
    ]
    store = ["blocks.3.mlp.hook_in", "blocks.10.mlp.hook_in", "blocks.3.hook_mlp_out"]
    assert expand_sites(["blocks.*.mlp.hook_in"], store, where="s") == ["blocks.3.mlp.hook_in", "blocks.10.mlp.hook_in"]
    with pytest.raises(UserError, match="matches no site of store X"):
        expand_sites(["blocks.*.hook_resid_post"], store, where="store X")
    with pytest.raises(UserError, match="not of the form blocks"):
        expand_sites(["blocks.*.nonsense"], store, where="s")
    assert layer_target("blocks.{layer}.hook_mlp_out", "blocks.10.mlp.hook_in") == "blocks.10.hook_mlp_out"
    assert layer_target("blocks.5.hook_mlp_out", "blocks.10.mlp.hook_in") == "blocks.5.hook_mlp_out"
    with pytest.raises(UserError, match="has no layer"):
        layer_target("blocks.{layer}.hook_mlp_out", "model.layers.1.mlp")
    with pytest.raises(UserError, match="includes sae.target"):  # before any work
        TrainConfig(source="live", sites=["blocks.*.hook_mlp_out"], sae=SAEConfig(target=SET["target"]))
    cfg = TrainConfig(
        source="live", sites=["blocks.*.mlp.hook_in", "blocks.1.hook_mlp_out"], sae=SAEConfig(target=SET["target"])
    )
    with pytest.raises(UserError, match="blocks.1.hook_mlp_out its own target"):
        cfg.site_pairs(model, where="m")


def test_a_set_is_cached_in_one_pass_and_trained_from_the_store(tiny_model_dir, tmp_path):
    acts, out = tmp_path / "acts", tmp_path / "tc"
    cache.run(
        CacheConfig(
            model=ModelConfig(name=str(tiny_model_dir("llama")), dtype="float32", device="cpu"),
            sites=["blocks.*.mlp.hook_in", "blocks.*.hook_mlp_out"],
            text=TextConfig(context_size=32),
            n_tokens=2048,
            store_dtype="float32",
            out_dir=str(acts),
            progress=False,
        )
    )
    store = ActivationStore(acts)
    assert len(store.sites) == 2 * N_LAYERS and store.n_shards == 1  # one pass, one shard (automatic size)
    summary = train.run(  # sites=[]: every site of the store that is no target
        TrainConfig(
            store=str(acts),
            sae=SAEConfig(architecture="batchtopk", k=4, expansion_factor=2, target=SET["target"]),
            n_tokens=1024,
            batch_size=256,
            dtype="float32",
            progress=False,
            out_dir=str(out),
        )
    )
    assert sorted(summary.saes) == [f"blocks.{i}.mlp.hook_in" for i in range(N_LAYERS)]
    for i in range(N_LAYERS):
        sae = load_sae(out / f"blocks.{i}.mlp.hook_in")
        assert sae.cfg.target == f"blocks.{i}.hook_mlp_out"


# ------------------------------------------------------------------------------------ the tensors


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("arch", ["relu", "jumprelu", "batchtopk", "matryoshka"])
def test_exported_tensors_under_circuit_tracers_math_reproduce_ours(arch, skip):
    sae = transcoder(arch, skip).fold(0.3, 2.0)
    tensors = transcoder_tensors(sae)
    assert tensors["W_enc"].shape == (sae.cfg.d_sae, sae.cfg.d_in)  # [d_t, d_model]: SAELens's transposed
    assert (THRESHOLD in tensors) == (arch != "relu")
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(64, sae.cfg.d_in, generator=gen) / 0.3
    f_ref, y_ref = transcoder_reference(tensors, x)
    with torch.no_grad():
        f, y = sae.reconstruct(x)
    assert (f > 0).any()
    torch.testing.assert_close(f_ref, f, rtol=1e-5, atol=1e-5 * float(f.abs().max()))
    torch.testing.assert_close(y_ref, y, rtol=1e-5, atol=1e-5 * float(y.abs().max()))


# ------------------------------------------------------------------------------------ a trained set


def train_set(
    model_dir: Path,
    corpus: Path,
    out: Path,
    *,
    arch: str = "batchtopk",
    skip: bool = True,
    sites: list[str] = SET["sites"],
    target: str = SET["target"],
    n_tokens: int = 2048,
    **sae,
) -> Path:
    """Live-trained dictionaries of a tiny model: by default a BatchTopK skip-transcoder set."""
    cfg = SAEConfig(**({"architecture": arch, "k": 4, "expansion_factor": 4, "skip": skip} | sae), target=target)
    train.run(live_train_cfg(model_dir, corpus, out, sites, cfg, n_tokens=n_tokens, live_buffer_tokens=2048))
    return out


@pytest.fixture(scope="module")
def trained_set(tiny_model_dir, tmp_path_factory):
    """(model dir, corpus, a BatchTopK skip-transcoder set over every layer of a tiny Llama)."""
    root = tmp_path_factory.mktemp("tcset")
    model_dir, corpus = tiny_model_dir("llama"), write_corpus(root / "corpus")
    return model_dir, corpus, train_set(model_dir, corpus, root / "tc")


def ct_export(checkpoint: Path, out: Path) -> Path:
    export.run(ExportConfig(checkpoint=str(checkpoint), out_dir=str(out), format="circuit_tracer"))
    return out


def test_the_export_writes_circuit_tracers_layout(trained_set, tmp_path):
    _, _, run = trained_set
    out = ct_export(run, tmp_path / "ct")
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "config.yaml",
        *(f"layer_{i}.safetensors" for i in range(N_LAYERS)),
    ]
    config = (out / "config.yaml").read_text()
    assert "model_kind: transcoder_set" in config and "transcoders:" not in config
    assert "feature_input_hook: mlp.hook_in" in config and "feature_output_hook: mlp.hook_out" in config
    tensors = load_file(str(out / "layer_1.safetensors"))
    assert sorted(tensors) == sorted(["W_enc", "W_dec", "b_enc", "b_dec", "W_skip", THRESHOLD])
    ours = load_sae(run / "blocks.1.mlp.hook_in")
    torch.testing.assert_close(tensors["W_skip"], ours.W_skip.detach().t())
    # A rerun replaces the directory whole: no stale layer file survives.
    (out / "layer_7.safetensors").write_bytes(b"")
    ct_export(run, out)
    assert not (out / "layer_7.safetensors").exists()


def test_bad_sets_are_refused_with_the_fix(trained_set, tiny_model_dir, tmp_path):
    model_dir, corpus, run = trained_set
    partial = tmp_path / "partial"
    shutil.copytree(run, partial)
    shutil.rmtree(partial / "blocks.2.mlp.hook_in")
    with pytest.raises(UserError, match=r"covers layers \[0, 1\].*3 layers.*missing: \[2\].*blocks\.\*\.mlp\.hook_in"):
        ct_export(partial, tmp_path / "out1")

    narrow = train_set(model_dir, corpus, tmp_path / "narrow", expansion_factor=2)
    mixed = tmp_path / "mixed"
    shutil.copytree(run, mixed)
    shutil.rmtree(mixed / "blocks.2.mlp.hook_in")
    shutil.copytree(narrow / "blocks.2.mlp.hook_in", mixed / "blocks.2.mlp.hook_in")
    with pytest.raises(UserError, match=r"differ in width.*layer 2: d_sae 64.*one run"):
        ct_export(mixed, tmp_path / "out2")

    saes = tmp_path / "saes"  # SAEs on the residual stream are no MLP transcoders
    train_set(
        model_dir,
        corpus,
        saes,
        sites=["blocks.*.hook_resid_post"],
        target="",
        skip=False,
        expansion_factor=2,
        n_tokens=512,
    )
    with pytest.raises(UserError, match=r"reads blocks.0.hook_resid_post.*MLP input.*format=saelens"):
        ct_export(saes, tmp_path / "out3")

    topk = train_set(model_dir, corpus, tmp_path / "topk", arch="topk", skip=False)
    with pytest.raises(UserError, match="cannot run a topk dictionary.*batchtopk"):
        ct_export(topk, tmp_path / "out4")

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="holds notes.txt"):
        ct_export(run, foreign)


def test_a_set_whose_target_rows_do_not_line_up_is_refused(tmp_path):
    sites = {f"blocks.{i}.{kind}": 6 for i in range(2) for kind in ("mlp.hook_in", "hook_mlp_out")}
    spec = {"model": {"name": "toy", "revision": "r1", "dtype": "float32"}, "context_size": 16, "seed": 0}
    with StoreWriter(tmp_path / "acts", spec, sites, torch.float32) as w:
        w.write_shard(
            0,
            {site: torch.randn(32, 6) for site in sites},
            torch.zeros(32, dtype=torch.int32),
            torch.arange(32, dtype=torch.int32),
        )
    _rewrite_target_rows(next((tmp_path / "acts").glob("shard-*.safetensors")), 31, "blocks.1.hook_mlp_out")
    with pytest.raises(UserError, match=r"'blocks.1.hook_mlp_out': 31.*do not line up with the source's"):
        train.run(
            TrainConfig(
                store=str(tmp_path / "acts"),
                sites=SET["sites"],
                sae=SAEConfig(target=SET["target"]),
                out_dir=str(tmp_path / "tc"),
                n_tokens=32,
                batch_size=32,
                progress=False,
            )
        )


# ------------------------------------------------------------------------------------ circuit-tracer


@needs_interop
def test_circuit_tracer_loads_the_set_reproduces_it_and_attributes(trained_set, tiny_model_dir, tmp_path):
    """circuit-tracer 0.5.0 in its own venv, as a user runs it (nnsight backend, absolute local
    paths, offline): its transcoder activations at the model's MLP inputs and its transcoders'
    outputs equal ours, and it computes an attribution graph with active features."""
    model_dir, _, run = trained_set
    hf_dir = save_model(ModelConfig(name=str(model_dir)), tmp_path / "model")
    ct_dir = ct_export(run, tmp_path / "ct").resolve()
    lm = LanguageModel.load(ModelConfig(name=str(model_dir), dtype="float32", device="cpu"))
    input_ids = lm.tokenizer("def alpha(beta): return gamma + delta", return_tensors="pt").input_ids
    sites = [lm.site(f"blocks.{i}.mlp.hook_in") for i in range(N_LAYERS)]
    captured = lm.capture(sites, input_ids)
    xs = {f"x_{i}": captured[s.name][0].float().contiguous() for i, s in enumerate(sites)}
    save_file({"input_ids": input_ids, **xs}, str(tmp_path / "inputs.safetensors"))

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    result = subprocess.run(
        [str(INTEROP_PYTHON), str(REPO / "tests" / "ct_graph.py"), str(hf_dir.resolve()), str(ct_dir)]
        + [str(tmp_path / "inputs.safetensors"), str(tmp_path / "ct-out")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    outputs = load_file(str(tmp_path / "ct-out" / "outputs.safetensors"))
    graph = json.loads((tmp_path / "ct-out" / "graph.json").read_text())
    active = 0
    for i in range(N_LAYERS):
        with torch.no_grad():
            latents, y = load_sae(run / f"blocks.{i}.mlp.hook_in").reconstruct(xs[f"x_{i}"])
        acts = outputs["acts"][i]
        active += int((latents[1:] > 0).sum())
        torch.testing.assert_close(acts[1:], latents[1:], rtol=1e-4, atol=1e-4 * float(latents.abs().max()))
        assert not acts[0].any()  # circuit-tracer zeroes position 0
        torch.testing.assert_close(outputs[f"out_{i}"], y, rtol=1e-4, atol=1e-4 * float(y.abs().max()))
    assert active > 0
    assert graph["n_layers"] == N_LAYERS and graph["d_transcoder"] == 4 * 32
    assert graph["active_features"] > 0 and 0 not in graph["positions"]


def test_eval_reports_ce_with_every_transcoder_spliced_at_once(trained_set, tmp_path):
    """The replacement model's CE against a naive twin: a forward hook on each layer's MLP
    returning the transcoder of its own input at the counted positions."""
    model_dir, corpus, run = trained_set
    summary = eval_stage.run(
        EvalConfig(
            checkpoint=str(run),
            n_tokens=256,
            batch_size=4,
            data=DataConfig(source="files", path=str(corpus)),
            out_dir=str(tmp_path / "eval"),
            progress=False,
        )
    )
    replaced = summary.payload["replacement"]
    assert replaced["saes"] == [f"blocks.{i}.mlp.hook_in" for i in range(N_LAYERS)]
    assert "all 3 transcoders spliced at once" in summary.table()

    lm = LanguageModel.load(ModelConfig(name=str(model_dir), dtype="float32", device="cpu"))
    text = TextConfig(context_size=32)
    windows = held_out_windows(lm.tokenizer, DataConfig(source="files", path=str(corpus), split="eval"), text, 256)
    counted = keep_mask(windows, TokenSpec.from_tokenizer(lm.tokenizer, text))
    saes = [load_sae(run / f"blocks.{i}.mlp.hook_in") for i in range(N_LAYERS)]

    def replace_with(sae):
        def hook(_module, args, output):
            out = output.clone()
            out[counted] = sae.reconstruct(args[0][counted])[1]
            return out

        return hook

    handles = [lm.layers[i].mlp.register_forward_hook(replace_with(sae)) for i, sae in enumerate(saes)]
    try:
        with torch.no_grad():
            logits = lm.model(input_ids=windows).logits
    finally:
        for handle in handles:
            handle.remove()
    scored = counted[:, 1:]
    ce = torch.nn.functional.cross_entropy(logits[:, :-1][scored].double(), windows[:, 1:][scored])
    assert replaced["n_predictions"] == int(scored.sum())
    assert replaced["ce_replaced"] == pytest.approx(float(ce), rel=1e-5)
    # the splice changed the model (on a random tiny model the replacement may even lower CE)
    assert replaced["kl"] > 0 and replaced["ce_replaced"] != pytest.approx(replaced["ce_clean"], rel=1e-7)
