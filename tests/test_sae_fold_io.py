"""Folding the normalisation and decoder norms into an inference copy, and checkpoint io."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from sae_train.errors import UserError
from sae_train.sae import ARCHITECTURES, SAEConfig, create_sae, load_sae, load_sae_cfg, save_sae

SCALE = 0.37  # x_raw * SCALE = x_normalised


def trained_like(arch: str, **cfg):
    """An SAE with non-trivial parameters (as after some training steps)."""
    if arch == "relu_decnorm":
        arch, cfg = "relu", {**cfg, "sparsity": "l1_decnorm"}
    sae = create_sae(SAEConfig(architecture=arch, k=5, **cfg).resolved(16))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
        if not sae.unit_norm_decoder:  # free decoder norms: folding must move them into the encoder
            sae.W_dec.mul_(torch.rand(sae.cfg.d_sae, 1, generator=g) + 0.5)
        if arch == "jumprelu":
            sae.threshold.copy_(0.05 * torch.rand(sae.cfg.d_sae, generator=g))
        if arch in ("batchtopk", "matryoshka"):
            sae.threshold.fill_(0.04)
    sae.constrain_()
    return sae


def raw_data(n=64):
    return torch.randn(n, 16, generator=torch.Generator().manual_seed(1)) * 3 + 1


ARCHS = sorted(a for a, cls in ARCHITECTURES.items() if not cls.cross_layer) + ["relu_decnorm"]  # CLTs: test_clt.py


@pytest.mark.parametrize("arch", ARCHS)
def test_fold_reproduces_the_training_model_on_raw_activations(arch):
    sae = trained_like(arch)
    folded = sae.fold(SCALE)
    x_raw = raw_data()
    with torch.no_grad():
        x_hat = folded.decode(folded.encode(x_raw))
        if arch in ("batchtopk", "matryoshka"):  # training forward selects over the batch; compare inference
            expect = sae.decode(sae.encode(x_raw * SCALE)) / SCALE
        else:
            expect = sae(x_raw * SCALE).x_hat / SCALE
        assert torch.allclose(x_hat, expect, atol=1e-5, rtol=1e-5)
        norms = sae.W_dec.norm(dim=1)
        assert torch.allclose(folded.encode(x_raw), sae.encode(x_raw * SCALE) * norms / SCALE, atol=1e-5)
        assert torch.allclose(folded.W_dec.norm(dim=1), torch.ones(sae.cfg.d_sae), atol=1e-6)
    assert folded.folded and folded.normalization_scale == SCALE and not sae.folded
    with pytest.raises(ValueError, match="already folded"):
        folded.fold(SCALE)


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_roundtrip_is_exact(arch, tmp_path):
    folded = trained_like(arch).fold(SCALE)
    save_sae(folded, tmp_path / "site", {"site": "blocks.3.hook_resid_post", "tokens_trained": 1000})
    loaded = load_sae(tmp_path / "site")
    assert type(loaded) is type(folded) and loaded.cfg == folded.cfg
    assert loaded.folded and loaded.normalization_scale == SCALE
    for name, t in folded.state_dict().items():
        if name != "threshold_updates":
            assert torch.equal(loaded.state_dict()[name], t), name
    x = raw_data()
    with torch.no_grad():
        assert torch.equal(loaded.decode(loaded.encode(x)), folded.decode(folded.encode(x)))
    meta = load_sae_cfg(tmp_path / "site")
    assert meta["site"] == "blocks.3.hook_resid_post" and meta["normalization_scale"] == SCALE
    text = (tmp_path / "site" / "cfg.json").read_text()
    assert list(json.loads(text)) == sorted(json.loads(text))
    names = set(load_file(tmp_path / "site" / "sae.safetensors"))
    expected = {"W_enc", "W_dec", "b_enc", "b_dec"} | (
        {"threshold"} if arch in ("jumprelu", "batchtopk", "matryoshka") else set()
    )
    assert names == expected
    assert sorted(p.name for p in (tmp_path / "site").iterdir()) == ["cfg.json", "sae.safetensors"]


def test_save_refuses_an_unfolded_model_and_clashing_metadata(tmp_path):
    sae = trained_like("topk")
    with pytest.raises(ValueError, match="fold"):
        save_sae(sae, tmp_path / "a", {})
    with pytest.raises(ValueError, match="redefine"):
        save_sae(sae.fold(SCALE), tmp_path / "a", {"k": 3})
    with pytest.raises(ValueError, match="disagrees"):
        save_sae(sae.fold(SCALE), tmp_path / "a", {"normalization_scale": 1.0})


@pytest.fixture
def checkpoint(tmp_path):
    save_sae(trained_like("jumprelu").fold(SCALE), tmp_path / "ckpt", {})
    return tmp_path / "ckpt"


def test_missing_checkpoint_files(tmp_path, checkpoint):
    with pytest.raises(UserError, match="cfg.json does not exist"):
        load_sae(tmp_path / "nowhere")
    (checkpoint / "sae.safetensors").unlink()
    with pytest.raises(UserError, match="sae.safetensors does not exist"):
        load_sae(checkpoint)


def test_corrupt_checkpoint_files(checkpoint):
    weights, cfg = checkpoint / "sae.safetensors", checkpoint / "cfg.json"
    good = cfg.read_text()
    cfg.write_text("{ not json")
    with pytest.raises(UserError, match="cfg.json is unreadable or not valid JSON"):
        load_sae(checkpoint)
    cfg.write_text(json.dumps({**json.loads(good), "architecture": "gated"}))
    with pytest.raises(UserError, match="architecture 'gated'"):
        load_sae(checkpoint)
    cfg.write_text(json.dumps({**json.loads(good), "l0_coefficient": -1}))
    with pytest.raises(UserError, match="cfg.json: SAE config: l0_coefficient=-1"):
        load_sae(checkpoint)
    cfg.write_text(good)
    weights.write_bytes(b"garbage" * 10)
    with pytest.raises(UserError, match="sae.safetensors is corrupt"):
        load_sae(checkpoint)


def test_checkpoint_tensors_must_match_the_config(checkpoint):
    weights = checkpoint / "sae.safetensors"
    tensors = load_file(weights)
    save_file({**tensors, "W_enc": torch.zeros(16, 7)}, weights)
    with pytest.raises(UserError, match=r"W_enc of shape \(16, 7\)"):
        load_sae(checkpoint)
    save_file({k: v for k, v in tensors.items() if k != "threshold"}, weights)
    with pytest.raises(UserError, match="needs exactly"):
        load_sae(checkpoint)
