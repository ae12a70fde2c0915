"""SAE math: hand-computed values, a naive dense float64 implementation written here from the
papers' formulas, and the fused fast path pinned to both (values, indices, every gradient)."""

import math

import pytest
import torch

from sae_train.errors import UserError
from sae_train.sae import ARCHITECTURES, SAE, SAEConfig, create_sae, kernels
from sae_train.sae.matryoshka import prefix_widths

fast_only = pytest.mark.skipif(
    not kernels.available(), reason="kernels unavailable (no C compiler, or SAE_TRAIN_KERNELS=torch)"
)

SITE_ARCHS = sorted(a for a, cls in ARCHITECTURES.items() if not cls.cross_layer)
"""The architectures reading one site (cross-layer transcoders: tests/test_clt.py)."""


def make(arch: str, *, d_in=16, dtype=torch.float32, compute=None, **cfg) -> SAE:
    cfg.setdefault("k", 6)
    sae = create_sae(SAEConfig(architecture=arch, **cfg).resolved(d_in), compute_dtype=compute or dtype)
    return sae.to(dtype)


def data(n=48, d_in=16, seed=0, dtype=torch.float32):
    x = torch.randn(n, d_in, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.3
    return (x / x.norm(dim=1).mean()).to(dtype)


def perturb(sae: SAE, seed=1) -> SAE:
    """Move every parameter off its initial value so that no gradient is trivially zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            scale = 0.02 if name == "threshold" else 0.05
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))
        if hasattr(sae, "threshold"):
            sae.threshold.abs_()
    sae.constrain_()
    return sae


# ----------------------------------------------------------------------------- hand-built values


def tiny(arch: str, **cfg) -> SAE:
    """d_in=2, d_sae=3: decoder rows e1, e2, (0.6, 0.8); encoder = decoder^T; b_enc = (0, 0, -0.2)."""
    sae = make(arch, d_in=2, dtype=torch.float64, d_sae=3, **cfg)
    with torch.no_grad():
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], dtype=torch.float64))
        sae.W_enc.copy_(sae.W_dec.t())
        sae.b_enc.copy_(torch.tensor([0.0, 0.0, -0.2], dtype=torch.float64))
        sae.b_dec.zero_()
    return sae


X_TINY = torch.tensor([[1.0, 2.0], [0.5, -1.0]], dtype=torch.float64)  # z = (1, 2, 2), (0.5, -1, -0.7)


def test_hand_computed_relu():
    out = tiny("relu", l1_coefficient=0.1)(X_TINY)
    assert torch.allclose(out.x_hat, torch.tensor([[2.2, 3.6], [0.5, 0.0]], dtype=torch.float64))
    assert math.isclose(out.losses["mse"].item(), 2.5)  # (1.44 + 2.56 + 0 + 1) / 2
    assert math.isclose(out.losses["l1"].item(), 2.75)  # (5 + 0.5) / 2
    assert math.isclose(out.losses["loss"].item(), 2.5 + 0.1 * 2.75)
    assert out.l0.item() == 2.0 and out.fired.tolist() == [True, True, True]


def test_hand_computed_topk_with_ties():
    out = tiny("topk", k=2)(X_TINY)  # row 1: z = (1, 2, 2) -> latents 1, 2; row 2: 0, 2 (relu'd)
    assert torch.allclose(out.x_hat, torch.tensor([[1.2, 3.6], [0.5, 0.0]], dtype=torch.float64))
    assert math.isclose(out.losses["mse"].item(), 1.8)
    assert out.latents.indices.tolist() == [1, 2, 0, 2] and out.l0.item() == 1.5
    out = tiny("topk", k=1)(X_TINY)  # the tie 2 = 2 goes to the lower index
    assert out.latents.indices.tolist() == [1, 0]
    assert torch.allclose(out.x_hat[0], torch.tensor([0.0, 2.0], dtype=torch.float64))


def test_hand_computed_batchtopk():
    out = tiny("batchtopk", k=1)(X_TINY)  # keep 2 over the batch: both 2s of row 1
    assert out.latents.offsets.tolist() == [0, 2, 2] and out.latents.indices.tolist() == [1, 2]
    assert math.isclose(out.losses["mse"].item(), (2.6 + 1.25) / 2)
    assert out.l0.item() == 1.0 and out.stats["min_kept"].item() == 2.0


def test_hand_computed_jumprelu():
    sae = tiny("jumprelu", l0_coefficient=0.01)
    with torch.no_grad():
        sae.threshold.copy_(torch.tensor([0.5, 0.5, 2.5], dtype=torch.float64))
    out = sae(X_TINY)  # row 1: f = (1, 2, 0) -> x_hat = x; row 2: 0.5 is not > 0.5 -> f = 0
    assert torch.allclose(out.x_hat, torch.tensor([[1.0, 2.0], [0.0, 0.0]], dtype=torch.float64))
    assert math.isclose(out.losses["mse"].item(), 0.625)
    assert math.isclose(out.losses["l0"].item(), 1.0)
    assert math.isclose(out.losses["loss"].item(), 0.625 + 0.01)


# ----------------------------------------------------------------------------- naive reference


def _top_k_mask(z: torch.Tensor, k: int, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Per row, the k largest (stable sort: ties to the lower index) among allowed columns."""
    key = z if allowed is None else z.masked_fill(~allowed, -math.inf)
    order = torch.sort(key, dim=1, descending=True, stable=True).indices[:, :k]
    return torch.zeros_like(z, dtype=torch.bool).scatter(1, order, True)


def naive(sae: SAE, x: torch.Tensor, dead: torch.Tensor | None = None, scale: float = 1.0):
    """Loss and latents of `sae` from the papers' formulas, dense, in float64.

    Returns (loss, latents, x_hat) with autograd to float64 copies of the parameters; for
    JumpReLU the threshold gradient is filled in separately (pseudo-derivative)."""
    cfg = sae.cfg
    p = {n: t.detach().double().requires_grad_() for n, t in sae.named_parameters()}
    x = x.double()
    z = (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    arch = cfg.architecture
    sparsity = None
    if arch == "relu":
        f = torch.relu(z)
        w = p["W_dec"].norm(dim=1) if cfg.sparsity == "l1_decnorm" else torch.ones(cfg.d_sae, dtype=torch.float64)
        sparsity = cfg.l1_coefficient * scale * (f * w).sum(1).mean()
    elif arch == "topk":
        f = torch.relu(z) * _top_k_mask(z.detach(), cfg.k)
    elif arch in ("batchtopk", "matryoshka"):
        flat = torch.relu(z.detach()).flatten()
        order = torch.sort(flat, descending=True, stable=True).indices[: cfg.k * x.shape[0]]
        keep = torch.zeros_like(flat, dtype=torch.bool)
        keep[order] = True
        f = torch.relu(z) * (keep & (flat > 0)).view_as(z)
    else:
        h = (z.detach() > p["threshold"].detach()).double()  # H(z - theta): no gradient to z
        f = z * h
        sparsity = cfg.l0_coefficient * scale * h.sum(1).mean()
    x_hat = f @ p["W_dec"] + p["b_dec"]
    loss = ((x_hat - x) ** 2).sum(1).mean()
    if arch == "matryoshka":  # every prefix decoded densely on its own, b_dec included
        widths = prefix_widths(cfg.matryoshka_prefixes, cfg.d_sae)
        w = torch.tensor(cfg.matryoshka_weights or [1.0] * len(widths), dtype=torch.float64)
        loss = sum(
            w_l / w.sum() * ((f[:, :m] @ p["W_dec"][:m] + p["b_dec"] - x) ** 2).sum(1).mean()
            for w_l, m in zip(w, widths)
        )
    if sparsity is not None:
        loss = loss + sparsity
    if arch in ("topk", "batchtopk", "matryoshka") and dead is not None and dead.any():
        k_aux = min(cfg.aux_k, int(dead.sum()))
        f_aux = torch.relu(z) * _top_k_mask(z.detach(), k_aux, dead)
        e = (x - x_hat).detach()
        e_hat = f_aux @ p["W_dec"]
        loss = loss + cfg.aux_coefficient * ((e_hat - e) ** 2).sum() / ((e - e.mean(0)) ** 2).sum()
    loss.backward()
    grads = {n: t.grad for n, t in p.items()}
    if arch == "jumprelu":  # Rajamanoharan et al. 2024, eqs. (11)-(12), rectangle kernel
        theta, eps = p["threshold"].detach(), cfg.jumprelu_bandwidth
        window = (((z.detach() - theta) / eps).abs() < 0.5).double()
        g_f = 2 * (x_hat - x).detach() @ p["W_dec"].detach().t() / x.shape[0]
        grads["threshold"] = (-(theta / eps) * window * g_f).sum(0) - cfg.l0_coefficient * scale * (
            window.sum(0) / eps / x.shape[0]
        )
    return loss.detach(), f.detach(), x_hat.detach(), grads


def run(sae: SAE, x: torch.Tensor, dead=None, scale=1.0):
    sae.zero_grad(set_to_none=True)
    out = sae(x, dead_mask=dead, sparsity_scale=scale)
    out.losses["loss"].backward()
    return out, {n: t.grad.detach().clone() for n, t in sae.named_parameters()}


CASES = [
    ("relu", {}),
    ("relu", {"sparsity": "l1_decnorm"}),
    ("topk", {}),
    ("batchtopk", {}),
    ("jumprelu", {}),
    ("topk", {"aux_k": 1000}),  # aux_k > n_dead: every dead latent joins AuxK (no selection)
    ("matryoshka", {}),
    # d_sae 128: widths 13, 64, 96, 128 (a weight of 0 drops a level from the loss)
    ("matryoshka", {"matryoshka_prefixes": [0.1, 0.5, 0.75, 1.0], "matryoshka_weights": [4, 1, 0, 2]}),
]


def _dead(sae):
    dead = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    dead[::5] = True
    return dead


def _kw(cfg):
    # jumprelu: a bandwidth wide enough that many pre-activations fall in the window
    return {"jumprelu_bandwidth": 0.05, "l0_coefficient": 0.01, "aux_k": 4, **cfg}


@pytest.mark.parametrize("arch, cfg", CASES)
def test_reference_path_matches_naive_float64(arch, cfg):
    sae = perturb(make(arch, dtype=torch.float64, **_kw(cfg)))
    x, dead = data(dtype=torch.float64), _dead(sae)
    out, grads = run(sae, x, dead, scale=0.7)
    loss, f, x_hat, ref = naive(sae, x, dead, scale=0.7)
    assert torch.allclose(out.losses["loss"], loss, rtol=1e-12)
    assert torch.allclose(out.x_hat, x_hat, rtol=1e-12)
    latents = out.latents if isinstance(out.latents, torch.Tensor) else out.latents.to_dense()
    assert torch.allclose(latents.double(), f, rtol=1e-12)
    for name, g in grads.items():
        assert torch.allclose(g, ref[name], rtol=1e-9, atol=1e-12), name
        assert g.abs().max() > 0, name


def _dead_pattern(sae, pattern):
    dead = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    if pattern == "all":
        dead[:] = True
    elif pattern == "some":
        dead[::5] = True
    return dead


@pytest.mark.parametrize("pattern", ["none", "some", "all"])
@pytest.mark.parametrize("arch, cfg", CASES)
def test_torch_path_fp32_matches_naive_float64(arch, cfg, pattern):
    """The device-agnostic path (what CUDA runs) in fp32, with 0, some and all latents dead."""
    sae = perturb(make(arch, **_kw(cfg)))
    sae.impl = "torch"
    x, dead = data(), _dead_pattern(sae, pattern)
    out, grads = run(sae, x, dead, scale=0.7)
    loss, f, x_hat, ref = naive(sae, x, dead, scale=0.7)
    assert torch.allclose(out.losses["loss"].double(), loss, rtol=1e-5)
    assert torch.allclose(out.x_hat.double(), x_hat, rtol=1e-5, atol=1e-6)
    if "auxk" in out.losses:
        assert (out.losses["auxk"] > 0) == (pattern != "none")
    dense = out.latents.double() if isinstance(out.latents, torch.Tensor) else out.latents.to_dense().double()
    assert torch.equal(dense != 0, f != 0) and torch.allclose(dense, f, atol=1e-6)
    for name, g in grads.items():
        assert torch.allclose(g.double(), ref[name], rtol=1e-4, atol=1e-6 * ref[name].abs().max()), name


@fast_only
@pytest.mark.parametrize("arch, cfg", CASES)
def test_fast_path_fp32_matches_naive_float64(arch, cfg):
    sae = perturb(make(arch, **_kw(cfg)))
    assert sae._fast_path(data())
    x, dead = data(), _dead(sae)
    out, grads = run(sae, x, dead, scale=0.7)
    loss, f, x_hat, ref = naive(sae, x, dead, scale=0.7)
    assert torch.allclose(out.losses["loss"].double(), loss, rtol=1e-5)
    assert torch.allclose(out.x_hat.double(), x_hat, rtol=1e-5, atol=1e-6)
    if isinstance(out.latents, torch.Tensor):
        assert torch.allclose(out.latents.double(), f, atol=1e-6)
    else:  # same indices as the naive selection, same values
        dense = out.latents.to_dense().double()
        assert torch.equal(dense != 0, f != 0) and torch.allclose(dense, f, atol=1e-6)
    for name, g in grads.items():
        assert torch.allclose(g.double(), ref[name], rtol=1e-4, atol=1e-6 * ref[name].abs().max()), name


@fast_only
@pytest.mark.parametrize("arch, cfg", CASES)
def test_fast_path_bf16_matches_reference_bf16(arch, cfg):
    sae = perturb(make(arch, compute=torch.bfloat16, **_kw(cfg)))
    x, dead = data(), _dead(sae)
    fast, g_fast = run(sae, x, dead)
    sae.impl = "torch"
    ref, g_ref = run(sae, x, dead)
    for key in ref.losses:
        assert torch.allclose(fast.losses[key], ref.losses[key], rtol=1e-3, atol=1e-5), key
    assert torch.allclose(fast.x_hat, ref.x_hat, atol=1e-3)
    assert torch.equal(fast.fired, ref.fired) and torch.allclose(fast.l0, ref.l0)
    for name in g_ref:  # bf16 GEMM gradients: 3 significant digits
        scale = g_ref[name].abs().max()
        assert (g_fast[name] - g_ref[name]).abs().max() <= 2e-2 * scale, name


@fast_only
@pytest.mark.parametrize("arch", SITE_ARCHS)
def test_x_hat_stays_differentiable(arch):
    """A loss of the caller's own on x_hat reaches the parameters the same way on both paths."""
    sae = perturb(make(arch, **_kw({})))
    x = data()
    grads = {}
    for impl in ("auto", "torch"):
        sae.impl = impl
        sae.zero_grad(set_to_none=True)
        out = sae(x)
        (out.losses["loss"] + 0.3 * out.x_hat.pow(3).sum()).backward()
        grads[impl] = {n: t.grad.clone() for n, t in sae.named_parameters()}
    for name, g in grads["torch"].items():
        assert torch.allclose(grads["auto"][name], g, rtol=1e-4, atol=1e-6 * g.abs().max()), name


# ----------------------------------------------------------------------------- properties


def test_topk_has_exactly_k_per_token():
    sae = make("topk", d_in=32, k=7)
    out = sae(data(n=64, d_in=32))
    assert out.latents.offsets.diff().eq(7).all() and out.latents.values.view(64, 7).shape == (64, 7)
    assert out.l0 <= 7 and (sae.encode(data(n=64, d_in=32)) != 0).sum(1).le(7).all()


def test_batchtopk_averages_k_per_token():
    sae = make("batchtopk", d_in=32, k=7)
    out = sae(data(n=64, d_in=32))
    counts = out.latents.offsets.diff()
    assert counts.sum() == 7 * 64 and counts.min() != counts.max()  # adapts per token
    assert out.l0.item() == 7.0


def test_unit_norm_constraint_and_gradient_projection():
    sae = make("relu")
    with torch.no_grad():
        sae.W_dec.mul_(torch.linspace(0.5, 2, sae.cfg.d_sae)[:, None])
    sae.constrain_()
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(sae.cfg.d_sae), atol=1e-6)
    sae(data()).losses["loss"].backward()
    assert (sae.W_dec.grad * sae.W_dec).sum(1).abs().max() > 1e-6
    sae.project_grads_()
    assert (sae.W_dec.grad * sae.W_dec).sum(1).abs().max() < 1e-7
    free = make("relu", sparsity="l1_decnorm")
    assert torch.allclose(free.W_dec.norm(dim=1), torch.full((free.cfg.d_sae,), 0.1))
    with torch.no_grad():
        free.W_dec.mul_(3.0)
    free.constrain_()  # no constraint for l1_decnorm
    assert torch.allclose(free.W_dec.norm(dim=1), torch.full((free.cfg.d_sae,), 0.3))


def test_jumprelu_threshold_learns():
    sae = perturb(make("jumprelu", jumprelu_bandwidth=0.05))
    before = sae.threshold.detach().clone()
    out = sae(data())
    out.losses["loss"].backward()
    assert sae.threshold.grad.abs().max() > 0
    torch.optim.Adam(sae.parameters(), lr=1e-3).step()
    sae.constrain_()
    assert not torch.equal(sae.threshold, before) and (sae.threshold >= 0).all()


def test_batchtopk_threshold_follows_recent_steps():
    """The inference threshold is the polynomial-decay average of each step's smallest kept
    activation: the first step sets it, step s of t weighs (s+1)...(s+8) / ((t+1)...(t+9)) * 9,
    and the factor is capped at batchtopk_threshold_beta (then a plain EMA)."""
    for beta in (0.999, 0.95):
        sae = make("batchtopk", batchtopk_threshold_beta=beta)
        seen, ref = [], 0.0
        for t in range(40):
            out = sae(data(seed=t))
            sae.after_step(out)
            m = out.stats["min_kept"].item()
            seen.append(m)
            factor = min(t / (t + 9), beta)
            ref = factor * ref + (1 - factor) * m
            assert torch.allclose(sae.threshold, torch.full_like(sae.threshold, ref), rtol=1e-5)
        if beta == 0.999:  # never capped in 40 steps: the closed form of the average
            t = len(seen) - 1
            w = [9 * math.prod(range(s + 1, s + 9)) / math.prod(range(t + 1, t + 10)) for s in range(t + 1)]
            assert abs(sum(w) - 1) < 1e-9
            assert sae.threshold[0].item() == pytest.approx(
                sum(wi * mi for wi, mi in zip(w, seen, strict=True)), rel=1e-5
            )


def test_batchtopk_threshold_tracks_a_moving_cut():
    """A cut that moves during training (here 1 for 200 steps, then 3 for 40) is followed: the last
    sixth of the run holds ~80% of the weight (1 - (200/240)**9), where a 0.999 EMA would hold 4%."""
    sae = make("batchtopk")
    out = sae(data())
    for t in range(240):
        out.stats["min_kept"] = torch.tensor(1.0 if t < 200 else 3.0)
        sae.after_step(out)
    assert 2.55 < sae.threshold[0].item() < 2.7
    assert int(sae.threshold_updates) == 240


def test_auxk_only_reaches_dead_latents():
    sae = perturb(make("topk", aux_k=4))
    x, dead = data(), _dead(sae)
    _, g_plain = run(sae, x)
    out, g_aux = run(sae, x, dead)
    assert out.losses["auxk"] > 0
    changed = (g_aux["W_enc"] - g_plain["W_enc"]).abs().amax(0) > 0
    assert changed.any() and not changed[~dead].any()


@pytest.mark.parametrize("b_dec_init", ["geometric_median", "mean", "zeros"])
def test_init_from_data(b_dec_init):
    sae = make("relu", b_dec_init=b_dec_init)
    x = data(n=256)
    mse_before = sae(x).losses["mse"].item()
    sae.init_from_data(x)
    if b_dec_init == "mean":
        assert torch.allclose(sae.b_dec, x.mean(0), atol=1e-6)
    elif b_dec_init == "zeros":
        assert sae.b_dec.abs().max() == 0
    else:  # Weiszfeld: a fixed point, the distance-weighted mean of the points
        w = 1 / (x - sae.b_dec).norm(dim=1)
        assert torch.allclose(sae.b_dec, (w[:, None] * x).sum(0) / w.sum(), atol=1e-4)
    assert sae(x).losses["mse"].item() < min(mse_before, 1.0)  # least-squares encoder scale


@pytest.mark.parametrize("arch", SITE_ARCHS)
def test_bad_input_is_a_user_error(arch):
    sae = make(arch)
    with pytest.raises(UserError, match=r"expected \[n_tokens, 16\]"):
        sae(torch.randn(4, 17))
    with pytest.raises(UserError, match="floating-point"):
        sae.encode(torch.ones(4, 16, dtype=torch.int64))
    with pytest.raises(UserError, match="resolved"):
        create_sae(SAEConfig(architecture=arch))
