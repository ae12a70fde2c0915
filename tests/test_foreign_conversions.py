"""The conversions benchmarks/quality_vs_others.py evaluates other libraries' dictionaries through:
each converted dictionary computes what the library's own forward computes, on random inputs."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from sae_train.errors import UserError
from sae_train.sae.saelens import from_saelens
from sae_train.sae.sparsify import from_sparsify

D_IN, D_SAE, K = 16, 64, 4


def _perturb(module: torch.nn.Module, seed: int) -> None:
    """Random weights everywhere (biases and decoder norms included), so every term is tested."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


def _inputs(seed: int = 1) -> torch.Tensor:
    return torch.randn(256, D_IN, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["batchtopk", "matryoshka"])
def test_saelens_training_sae_converts_to_its_inference_forward(tmp_path, kind):
    """A SAELens (Matryoshka) BatchTopK training SAE, saved as SAELens saves it for inference (a
    JumpReLU, the EMA threshold and the decoder norms folded in), loads as ours with the same
    latents and reconstructions as sae_lens's own loaded SAE."""
    sae_lens = pytest.importorskip("sae_lens", reason="SAELens is not installed")
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.saes.matryoshka_batchtopk_sae import (
        MatryoshkaBatchTopKTrainingSAE,
        MatryoshkaBatchTopKTrainingSAEConfig,
    )

    if kind == "matryoshka":
        theirs = MatryoshkaBatchTopKTrainingSAE(
            MatryoshkaBatchTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, matryoshka_widths=[8, 32, D_SAE])
        )
    else:
        theirs = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K))
    assert theirs.cfg.rescale_acts_by_decoder_norm  # SAELens's default: the fold below matters
    _perturb(theirs, 0)
    theirs.topk_threshold.fill_(0.7)
    theirs.save_inference_model(str(tmp_path))
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu"
    ours = from_saelens(cfg, load_file(tmp_path / "sae_weights.safetensors"))
    loaded = sae_lens.SAE.load_from_disk(str(tmp_path))
    x = _inputs()
    latents, x_hat = ours.reconstruct(x)
    with torch.no_grad():
        f = loaded.encode(x)
        expected = loaded.decode(f)
    assert (f > 0).any() and (f == 0).any()
    torch.testing.assert_close(latents, f, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x_hat, expected, atol=1e-5, rtol=1e-5)


def _sparsify_coder(tmp_path, **fields):
    sparsify = pytest.importorskip("sparsify", reason="EleutherAI sparsify (eai-sparsify) is not installed")
    coder = sparsify.SparseCoder(D_IN, sparsify.SparseCoderConfig(num_latents=D_SAE, k=K, **fields))
    _perturb(coder, 0)
    coder.save_to_disk(tmp_path)  # its own on-disk format, read back as the converter's input
    return coder, json.loads((tmp_path / "cfg.json").read_text()), load_file(tmp_path / "sae.safetensors")


def _sparsify_forward(coder, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        out = coder(x)
    dense = torch.zeros(x.shape[0], D_SAE).scatter(1, out.latent_indices, out.latent_acts.float())
    return dense, out.sae_out


def test_sparsify_topk_converts_to_its_forward(tmp_path):
    coder, cfg, tensors = _sparsify_coder(tmp_path)
    ours = from_sparsify(cfg, tensors)
    assert ours.cfg.architecture == "topk" and ours.cfg.k == K and not ours.cfg.is_transcoder
    x = _inputs()
    latents, x_hat = ours.reconstruct(x)
    f, expected = _sparsify_forward(coder, x)
    torch.testing.assert_close(latents, f, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x_hat, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("skip", [False, True])
def test_sparsify_transcoder_converts_to_its_forward(tmp_path, skip):
    coder, cfg, tensors = _sparsify_coder(tmp_path, transcode=True, skip_connection=skip)
    ours = from_sparsify(cfg, tensors, target="blocks.0.hook_mlp_out")
    assert ours.cfg.is_transcoder and ours.cfg.skip == skip and ours.cfg.target == "blocks.0.hook_mlp_out"
    x = _inputs()
    latents, y_hat = ours.reconstruct(x)
    f, expected = _sparsify_forward(coder, x)
    torch.testing.assert_close(latents, f, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y_hat, expected, atol=1e-5, rtol=1e-5)


def test_sparsify_transcoder_needs_its_target(tmp_path):
    _, cfg, tensors = _sparsify_coder(tmp_path, transcode=True)
    with pytest.raises(UserError, match="target"):
        from_sparsify(cfg, tensors)
