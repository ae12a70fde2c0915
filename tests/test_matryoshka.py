"""Matryoshka BatchTopK: its config, its nested losses against SAELens's own training SAE, the
folded SAE reproducing the training model, and what the nesting is for (frequent features in the
first latents). (The loss and gradients against a naive dense loop over the prefixes:
tests/test_sae_math.py.)"""

import pytest
import torch

from sae_train.errors import UserError
from sae_train.sae import SAEConfig, create_sae, kernels, load_sae
from sae_train.sae.matryoshka import prefix_widths
from sae_train.train import TrainConfig, run
from tests.synthetic import recovered_fraction, sample, true_directions, write_store


def make(**cfg):
    return create_sae(SAEConfig(architecture="matryoshka", k=4, **cfg).resolved(16))  # d_sae 128


def batch(n=64, seed=0):
    x = torch.randn(n, 16, generator=torch.Generator().manual_seed(seed)) + 0.3
    return x / x.norm(dim=1).mean()


def test_prefixes_are_fractions_or_widths():
    assert prefix_widths([0.0625, 0.25, 1.0], 4608) == prefix_widths([288, 1152, 4608], 4608) == [288, 1152, 4608]
    assert make().widths == [8, 32, 128]
    assert make(matryoshka_prefixes=[1, 16, 128]).widths == [1, 16, 128]


@pytest.mark.parametrize(
    "cfg, needle",
    [
        ({"matryoshka_prefixes": []}, "non-empty list"),
        ({"matryoshka_prefixes": [0.5, -0.1, 1.0]}, "non-empty list"),
        ({"matryoshka_prefixes": [0.25, 64, 128]}, "Do not mix"),
        (
            {"matryoshka_prefixes": [0.5, 0.25, 1.0]},
            "strictly increasing widths ending at d_sae = 128 (they are [64, 32, 128])",
        ),
        ({"matryoshka_prefixes": [0.25, 0.5]}, "ending at d_sae = 128"),
        ({"matryoshka_prefixes": [32, 64, 100]}, "ending at d_sae = 128"),
        ({"matryoshka_prefixes": [0.001, 1.0]}, "they are [0, 128]"),
        ({"matryoshka_weights": [1.0, 1.0]}, "3 numbers >= 0 (one per prefix)"),
        ({"matryoshka_weights": [0, 0, 0]}, "not all 0"),
        ({"matryoshka_weights": [1, -1, 1]}, "matryoshka_weights"),
    ],
)
def test_bad_prefixes_and_weights_are_user_errors(cfg, needle):
    with pytest.raises(UserError, match="SAE config: matryoshka_") as err:
        SAEConfig(architecture="matryoshka", **cfg).resolved(16)
    assert needle in str(err.value)


def test_losses_weights_and_prefix_mses():
    x = batch()
    sae = make(matryoshka_weights=[2, 1, 1])
    out = sae(x)
    assert list(out.losses) == ["loss", "mse", "nested_mse", "mse_8", "mse_32", "auxk"]
    f = out.latents.to_dense()
    for m in (8, 32, 128):
        expected = ((f[:, :m] @ sae.W_dec[:m] + sae.b_dec - x) ** 2).sum(1).mean()
        assert torch.allclose(out.losses[f"mse_{m}" if m < 128 else "mse"], expected, rtol=1e-5)
    nested = (2 * out.losses["mse_8"] + out.losses["mse_32"] + out.losses["mse"]) / 4
    assert torch.allclose(out.losses["nested_mse"], nested, rtol=1e-6)
    assert torch.equal(out.losses["loss"], out.losses["nested_mse"])  # no dead latents: AuxK is 0
    scaled = create_sae(SAEConfig(**{**sae.cfg.to_dict(), "matryoshka_weights": [6, 3, 3]}))  # normalised
    assert torch.equal(scaled(x).losses["loss"], out.losses["loss"])
    # a single prefix is BatchTopK
    plain = create_sae(SAEConfig(**{**sae.cfg.to_dict(), "architecture": "batchtopk"}))
    single = create_sae(SAEConfig(**{**sae.cfg.to_dict(), "matryoshka_prefixes": [1.0], "matryoshka_weights": []}))
    assert torch.allclose(single(x).losses["loss"], plain(x).losses["loss"], rtol=1e-6)


def test_matches_saelens_matryoshka_training_sae():
    """SAELens sums the levels' MSEs unweighted: L times our equally weighted loss, same gradients up to L."""
    pytest.importorskip("sae_lens")
    from sae_lens.saes.matryoshka_batchtopk_sae import (
        MatryoshkaBatchTopKTrainingSAE,
        MatryoshkaBatchTopKTrainingSAEConfig,
    )
    from sae_lens.saes.sae import TrainStepInput

    ours = make()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    ours.constrain_()
    theirs = MatryoshkaBatchTopKTrainingSAE(
        MatryoshkaBatchTopKTrainingSAEConfig(
            d_in=16, d_sae=128, k=4, matryoshka_widths=[8, 32, 128], apply_b_dec_to_input=True
        )
    )
    with torch.no_grad():
        for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
            getattr(theirs, name).copy_(getattr(ours, name))
    x = batch()
    out = ours(x)
    step = theirs.training_forward_pass(TrainStepInput(x, {}, None, 0, False))
    assert torch.allclose(step.feature_acts, out.latents.to_dense(), atol=1e-6)
    assert torch.allclose(step.losses["mse_loss"], out.losses["mse"], rtol=1e-5)
    for m in (8, 32):
        assert torch.allclose(step.losses[f"inner_mse_loss_{m}"], out.losses[f"mse_{m}"], rtol=1e-5)
    assert torch.allclose(step.loss, 3 * out.losses["loss"], rtol=1e-5)
    (3 * out.losses["loss"]).backward()
    step.loss.backward()
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        g, ref = getattr(ours, name).grad, getattr(theirs, name).grad
        assert torch.allclose(g, ref, rtol=1e-4, atol=1e-6 * ref.abs().max()), name


@pytest.mark.skipif(not kernels.available(), reason="the fused CPU kernels are not built here")
def test_fused_step_matches_the_torch_step_with_a_gradient_through_x_hat():
    """The fused step decodes every prefix from (token, level) bags: same losses, per-prefix MSEs
    and gradients as the plain-PyTorch step, also when x_hat itself carries a gradient."""
    x = batch(96)
    dead = torch.zeros(128, dtype=torch.bool)
    dead[::7] = True
    probe = torch.randn(96, 16, generator=torch.Generator().manual_seed(5))
    results = []
    for impl in ("auto", "torch"):
        sae = make(matryoshka_weights=[3, 0, 1])
        with torch.no_grad():
            for p in sae.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
        sae.impl = impl
        if impl == "auto":  # the fused step, not a fallback to the PyTorch one
            sae._forward_torch = None  # type: ignore[method-assign]
        out = sae(x, dead_mask=dead)
        (out.losses["loss"] + (out.x_hat * probe).sum()).backward()
        results.append((out, {n: p.grad.clone() for n, p in sae.named_parameters()}))
    (fast, g_fast), (ref, g_ref) = results
    assert ref.losses["auxk"] > 0 and list(fast.losses) == list(ref.losses)
    for name in ref.losses:
        torch.testing.assert_close(fast.losses[name], ref.losses[name], rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(fast.x_hat, ref.x_hat, rtol=1e-5, atol=1e-5)
    for name in g_ref:
        torch.testing.assert_close(g_fast[name], g_ref[name], rtol=1e-4, atol=1e-5, msg=name)


def test_folded_sae_reproduces_training_outputs():
    """With the threshold at the batch's smallest kept activation, the folded SAE's inference on raw
    inputs selects what training selected and reconstructs the training x_hat."""
    sae, scale = make(), 0.37
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    sae.constrain_()
    x_raw = batch() / scale
    out = sae(x_raw * scale)
    sae.after_step(out)  # first update: threshold = smallest kept activation
    with torch.no_grad():
        sae.threshold.mul_(1 - 1e-4)  # inference keeps z > threshold: the smallest kept one too
        folded = sae.fold(scale)
        f = folded.encode(x_raw)
        assert torch.equal(f != 0, out.latents.to_dense() != 0)
        assert torch.allclose(folded.decode(f), out.x_hat / scale, rtol=1e-5, atol=1e-5)


def test_first_prefix_learns_the_most_frequent_features(tmp_path):
    """64 true features with firing rates falling geometrically from 0.25 to 0.0125 (feature i
    more frequent than i+1). The nested loss puts frequent features in the first latents; plain
    BatchTopK on the same data and initialisation (seed 1: not the true directions) does not.
    Both checkpoints' inference thresholds give L0 ~ k on fresh rows of the training distribution."""
    dirs = true_directions(64, 32)
    p = (0.25 * torch.logspace(0, -1.3, 64)).tolist()
    store = write_store(tmp_path / "store", dirs, 65_536, p=p)
    fresh = sample(16_384, dirs, p, 0.02, torch.Generator().manual_seed(7))
    first = {}
    for arch in ("matryoshka", "batchtopk"):
        sae_cfg = SAEConfig(architecture=arch, k=4, expansion_factor=2, seed=1, matryoshka_prefixes=[0.25, 1.0])
        summary = run(
            TrainConfig(
                store=str(store),
                out_dir=str(tmp_path / arch),
                n_tokens=196_608,
                batch_size=512,
                dtype="float32",
                progress=False,
                sae=sae_cfg,
            )
        )
        sae = load_sae(summary.saes["synthetic"]["checkpoint"])
        with torch.no_grad():
            l0 = (sae.encode(fresh) > 0).sum(1).float().mean().item()
        assert 3.6 < l0 < 4.4, (arch, l0)  # k 4
        W_dec = sae.W_dec.detach()
        best = (dirs @ W_dec[:16].T).max(0)  # the true feature closest to each of the first 16 latents
        first[arch] = int(((best.values > 0.9) & (best.indices < 24)).sum())
        if arch == "matryoshka":
            assert recovered_fraction(W_dec, dirs, 0.9) >= 0.5
            assert summary.saes["synthetic"]["metrics"]["dead_fraction"] < 0.25
    assert first["matryoshka"] >= 13 > first["batchtopk"], first
