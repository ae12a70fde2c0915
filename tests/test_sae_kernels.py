"""The C kernels against their PyTorch twins: selection (with and without ties, masks, NaN),
sparse products, the fused activation passes, and the build/switch machinery."""

from pathlib import Path

import pytest
import torch

from sae_train.errors import UserError
from sae_train.sae import kernels, ops
from sae_train.sae.kernels import build

pytestmark = pytest.mark.skipif(
    not kernels.available(), reason="kernels unavailable (no C compiler, or SAE_TRAIN_KERNELS=torch)"
)

DTYPES = [torch.float32, torch.bfloat16]


def _rows(B, N, dtype, ties, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, N, generator=g)
    if ties:  # few distinct values: many exact ties, including at the k-th place
        z = (2 * z).round()
    bias = torch.zeros(N) if ties else 0.1 * torch.randn(N, generator=g)
    return z.to(dtype), bias


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("B, N, k", [(7, 100, 5), (33, 700, 32), (5, 64, 64), (9, 130, 1), (3, 2000, 300)])
def test_topk_rows_matches_torch(dtype, ties, B, N, k):
    z, bias = _rows(B, N, dtype, ties)
    idx, val = kernels.topk_rows(z, bias, k)
    ref_idx, ref_val = ops.topk_rows_torch(z.float() + bias, k)
    assert torch.equal(idx, ref_idx) and torch.equal(val, ref_val)
    # the rule itself: the k-th value bounds the rest, ties go to the lower index
    v = z.float() + bias
    kth = val.min(1, keepdim=True).values
    outside = torch.ones_like(v, dtype=torch.bool).scatter(1, idx, False)
    assert not (v[outside].view(B, -1) > kth).any()
    tied_out = outside & (v == kth)
    last_tied_in = torch.where(v.gather(1, idx) == kth, idx, -1).max(1).values
    for r in range(B):
        assert not tied_out[r, : last_tied_in[r]].any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ties", [False, True])
def test_topk_rows_with_column_mask(dtype, ties):
    z, bias = _rows(11, 300, dtype, ties, seed=1)
    mask = torch.rand(300, generator=torch.Generator().manual_seed(2)) < 0.3
    idx, val = kernels.topk_rows(z, bias, 20, mask)
    assert mask[idx].all()
    ref = ops.topk_rows_torch(z.float() + bias, 20, mask)
    assert torch.equal(idx, ref[0]) and torch.equal(val, ref[1])


def test_nan_ranks_first_like_torch_topk():
    z = torch.randn(4, 50, generator=torch.Generator().manual_seed(13))
    z[1, 7] = float("nan")
    z[2, :] = float("nan")
    idx, val = kernels.topk_rows(z, torch.zeros(50), 3)
    assert torch.equal(idx, ops.topk_rows_torch(z, 3)[0])
    assert 7 in idx[1] and idx[2].tolist() == [0, 1, 2]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("frac", [0.001, 0.05, 0.3, 1.0])
def test_batch_topk_matches_torch(dtype, ties, frac):
    z, bias = _rows(40, 256, dtype, ties, seed=3)
    n_keep = max(1, int(frac * z.numel()))  # 1.0: more than there are positive entries
    got = ops.batch_topk_kernel(z, bias, n_keep)
    ref = ops.batch_topk_torch(z.float() + bias, n_keep)
    for a, b in zip(got, ref):
        assert torch.equal(a, b)
    offsets, idx, val = got
    assert (val > 0).all() and offsets[-1] == min(n_keep, int(((z.float() + bias) > 0).sum()))


def test_batch_topk_recovers_from_a_bad_cut():
    z, bias = _rows(200, 200, torch.float32, False, seed=4)
    ref = ops.batch_topk_torch(z + bias, 5000)
    for guess, expected in [(10.0, 6000), (0.0, 1)]:  # cut above the answer; scratch too small
        got = kernels.batch_topk(z, bias, 5000, guess, expected)
        assert all(torch.equal(a, b) for a, b in zip(got, ref))


@pytest.mark.parametrize("table_dtype", DTYPES)
def test_sparse_products_read_and_write_column_slices(table_dtype):
    """A cross-layer transcoder's decode reads and writes [B, L, d] buffers one layer's slice at
    a time: tables, outputs and gradients whose rows are further apart than their width."""
    B, N, k, D, W = 29, 64, 5, 48, 3 * 48
    g = torch.Generator().manual_seed(7)
    idx, val = kernels.topk_rows(torch.randn(B, N, generator=g), torch.zeros(N), k)
    offsets, idx, val = torch.arange(0, B * k + 1, k), idx.view(-1), val.view(-1)
    dense = torch.zeros(B, N).scatter(1, idx.view(B, k), val.view(B, k))
    wide = torch.randn(N, W, generator=g).to(table_dtype)
    table = wide[:, D : 2 * D]  # rows W apart
    tol = dict(atol=1e-4, rtol=1e-5)
    assert torch.allclose(kernels.csr_spmm(offsets, idx, val, table), dense @ table.float(), **tol)
    out = torch.randn(B, W, generator=g)
    before = out.clone()
    kernels.csr_spmm(offsets, idx, val, table, out=out[:, D : 2 * D], accumulate=True)
    assert torch.equal(out[:, :D], before[:, :D]) and torch.equal(out[:, 2 * D :], before[:, 2 * D :])
    assert torch.allclose(out[:, D : 2 * D], before[:, D : 2 * D] + dense @ table.float(), **tol)
    grad = torch.randn(B, W, generator=g)[:, D : 2 * D]
    gv = kernels.csr_sddmm(offsets, idx, grad, table.contiguous())
    assert torch.allclose(gv, (grad @ table.float().t()).gather(1, idx.view(B, k)).view(-1), **tol)
    # the same products as decode_backward's without an MSE term, on the gradient's contiguous copy
    same, g_out, colsum = kernels.decode_backward(offsets, idx, grad.contiguous(), None, None, 0.0, table.contiguous())
    assert torch.equal(same, gv)
    assert torch.allclose(g_out.float(), grad.to(table_dtype).float()) and torch.allclose(colsum, grad.sum(0), **tol)
    with pytest.raises(ValueError, match="contiguous rows"):
        kernels.csr_spmm(offsets, idx, val, wide.t()[:D])  # columns, not rows, contiguous


@pytest.mark.parametrize("table_dtype", DTYPES)
@pytest.mark.parametrize("D", [40, 300, 576])  # < one register block; block + tail; 2 blocks + tail
def test_sparse_products_match_dense(table_dtype, D):
    B, N, k = 37, 200, 6
    g = torch.Generator().manual_seed(5)
    idx, val = kernels.topk_rows(torch.randn(B, N, generator=g), torch.zeros(N), k)
    offsets, idx, val = torch.arange(0, B * k + 1, k), idx.view(-1), val.view(-1)
    dense = torch.zeros(B, N).scatter(1, idx.view(B, k), val.view(B, k))
    T = torch.randn(N, D, generator=g).to(table_dtype)
    Tf = T.float()
    tol = dict(atol=1e-4, rtol=1e-5)
    assert torch.allclose(kernels.csr_spmm(offsets, idx, val, T), dense @ Tf, **tol)
    # decode = CSR @ T + bias with the squared error, and its backward with the MSE folded in
    bias, target = torch.randn(D, generator=g), torch.randn(B, D, generator=g)
    x_hat, sse = kernels.csr_decode(offsets, idx, val, T, bias, target)
    assert torch.allclose(x_hat, dense @ Tf + bias, **tol)
    assert torch.allclose(sse, ((x_hat - target) ** 2).sum(1), rtol=1e-4)
    G = torch.randn(B, D, generator=g)
    for grad, scale, mse in [(G, 0.0, True), (None, 0.3, True), (G, 0.3, True), (G, 0.3, False)]:
        g_eff = (0 if grad is None else grad) + (scale * (x_hat - target) if mse else 0)
        args = (x_hat, target) if mse else (None, None)  # no MSE term: g = grad
        gv, g_out, colsum = kernels.decode_backward(offsets, idx, grad, *args, scale, T)
        assert torch.allclose(gv, (g_eff @ Tf.t()).gather(1, idx.view(B, k)).view(-1), **tol)
        assert torch.allclose(g_out.float(), g_eff.to(table_dtype).float(), rtol=1e-2, atol=1e-5)
        assert torch.allclose(colsum, g_eff.sum(0), **tol)
    coff, crow, perm = kernels.csr_transpose(offsets, idx, N)
    X = torch.randn(B, D, generator=g).to(table_dtype)
    Xf = X.float()
    out = kernels.csr_spmm(coff, crow, val, X, perm=perm)
    assert torch.allclose(out, dense.t() @ Xf, **tol)
    kernels.csr_spmm(coff, crow, val, X, perm=perm, out=out, accumulate=True)
    assert torch.allclose(out, 2 * dense.t() @ Xf, **tol)
    out = kernels.csr_spmm(coff, crow, val, X, perm=perm, transpose_out=True)
    assert torch.allclose(out, Xf.t() @ dense, **tol)
    kernels.csr_spmm(coff, crow, val, X, perm=perm, out=out, transpose_out=True, accumulate=True)
    assert torch.allclose(out, 2 * Xf.t() @ dense, **tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_activation_passes_match_torch(dtype):
    B, N = 19, 70
    g = torch.Generator().manual_seed(6)
    z = torch.randn(B, N, generator=g).to(dtype)
    bias, colw = 0.3 * torch.randn(N, generator=g), torch.rand(N, generator=g)
    tol = dict(atol=1e-5, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5)
    # ReLU forward, in place, with the weighted row sums, row counts and column fire counts
    f = z.clone()
    wsum, cnt, fired = kernels.act_fwd(f, f, bias, None, colw, row_sums=True)
    f_ref = torch.relu(z.float() + bias).to(dtype)
    assert torch.equal(f, f_ref)
    assert torch.allclose(wsum, (f_ref.float() * colw).sum(1), **tol)
    assert torch.equal(cnt, (f_ref != 0).sum(1).float()) and torch.equal(fired, (f_ref != 0).sum(0).int())
    # ReLU backward: (g + row_g * colw) * [f > 0], column sums, grad of colw
    grad, row_g = torch.randn(B, N, generator=g).to(dtype), torch.randn(B, generator=g)
    gz = grad.clone()
    col_g, col_w, _, _ = kernels.act_bwd(gz, f, bias, row_g=row_g, colw=colw, want_colw_grad=True)
    gz_ref = ((grad.float() + row_g[:, None] * colw) * (f_ref.float() > 0)).to(dtype)
    assert torch.allclose(gz.float(), gz_ref.float(), **tol)
    assert torch.allclose(col_g, gz.float().sum(0), **tol)
    assert torch.allclose(col_w, (row_g[:, None] * f_ref.float()).sum(0), **tol)
    # JumpReLU forward (separate output) and backward with the rectangle-window sums
    thr, eps = 0.5 * torch.rand(N, generator=g), 0.3
    fj = torch.empty_like(z)
    _, cnt, _ = kernels.act_fwd(z, fj, bias, thr, None, row_sums=False)
    v = z.float() + bias
    assert torch.equal(fj, torch.where(v > thr, v, 0).to(dtype))
    assert torch.equal(cnt, (v > thr).sum(1).float())
    gj = grad.clone()
    col_g, _, win_g, win_r = kernels.act_bwd(gj, z, bias, thr=thr, eps=eps, row_g=row_g)
    window = ((v - thr).abs() < eps / 2).float()
    assert torch.equal(gj, (grad.float() * (v > thr)).to(dtype))
    assert torch.allclose(win_g, (window * grad.float()).sum(0), **tol)
    assert torch.allclose(win_r, (window * row_g[:, None]).sum(0), **tol)


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request):
    """Run a test with 1 and with 2 threads (the suite defaults to 1): exercises the splits."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def _csr(B, N, seed, batch=False):
    """A TopK-like (k per row) or BatchTopK-like (ragged, some rows empty) selection."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, N, generator=g)
    if batch:
        return ops.batch_topk_torch(z * torch.rand(B, 1, generator=g) * 2, 3 * B)
    idx, val = kernels.topk_rows(z, torch.zeros(N), 6)
    return torch.arange(0, 6 * B + 1, 6), idx.view(-1), val.view(-1).relu()


@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_rows_reference_shape(dtype, threads):
    """The training shape (N a multiple of 16, k = 32: 64 group maxima and ~50 candidates,
    both selected by the sorting network) and a ragged one, on both thread splits."""
    for B, N, k, seed in [(64, 4608, 32, 7), (17, 1000, 24, 8)]:
        z, bias = _rows(B, N, dtype, False, seed=seed)
        idx, val = kernels.topk_rows(z, bias, k)
        ref_idx, ref_val = ops.topk_rows_torch(z.float() + bias, k)
        assert torch.equal(idx, ref_idx) and torch.equal(val, ref_val)


@pytest.mark.parametrize("batch", [False, True])
def test_csr_transpose_is_a_stable_sort_by_column(batch, threads):
    offsets, idx, val = _csr(53, 90, seed=9, batch=batch)
    coff, crow, perm = kernels.csr_transpose(offsets, idx, 90)
    rows = torch.repeat_interleave(torch.arange(53), offsets.diff())
    ref_perm = torch.sort(idx, stable=True).indices
    assert torch.equal(perm, ref_perm) and torch.equal(crow, rows[ref_perm])
    assert torch.equal(
        coff, torch.cat([torch.zeros(1, dtype=torch.int64), torch.bincount(idx, minlength=90).cumsum(0)])
    )
    # a CSC pass can also sum each column's values: what index_add_ over the CSR entries gives
    g = torch.Generator().manual_seed(12)
    col_sum, W = torch.empty(90), torch.randn(8, 90, generator=g)
    kernels.csr_spmm(coff, crow, val, torch.randn(53, 8, generator=g), perm=perm, transpose_out=True, val_sum=col_sum)
    assert torch.equal(col_sum, torch.zeros(90).index_add_(0, idx, val))
    # b_dec's share of it; fp32 sums in another order differ by rounding relative to sum |w_i c_i|
    bound = 1e-5 * (W.abs() @ col_sum.abs())
    assert ((kernels.gemv(W, col_sum) - W @ col_sum).abs() <= bound).all()


@pytest.mark.parametrize("table_dtype", DTYPES)
@pytest.mark.parametrize("batch", [False, True])
def test_decode_train_is_decode_plus_backward(table_dtype, batch, threads):
    """The training decode does the backward's residual work early: scaled by s, its outputs
    are what decode_backward(grad=None, scale=s) returns."""
    B, N, D = 45, 120, 300
    offsets, idx, val = _csr(B, N, seed=10, batch=batch)
    g = torch.Generator().manual_seed(11)
    T = torch.randn(N, D, generator=g).to(table_dtype)
    bias, target = torch.randn(D, generator=g), torch.randn(B, D, generator=g)
    x_hat, sse, dots, res, colsum = kernels.decode_train(offsets, idx, val, T, bias, target)
    ref_x_hat, ref_sse = kernels.csr_decode(offsets, idx, val, T, bias, target)
    assert torch.equal(x_hat, ref_x_hat) and torch.equal(sse, ref_sse)
    s = 0.37
    gv, g_out, g_col = kernels.decode_backward(offsets, idx, None, x_hat, target, s, T)
    tol = dict(rtol=1e-5, atol=1e-4)  # sums of O(10) terms of O(10): rounding ~1e-5
    assert torch.allclose(s * dots, gv, **tol) and torch.allclose(s * colsum, g_col, **tol)
    assert torch.equal(res, (x_hat - target).to(table_dtype))
    assert torch.allclose(s * res.float(), g_out.float(), rtol=1e-2, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_elementwise_passes_match_torch(dtype, threads):
    g = torch.Generator().manual_seed(12)
    x, b = torch.randn(33, 70, generator=g), torch.randn(70, generator=g)
    assert torch.equal(kernels.center_cast(x, b, dtype), (x - b).to(dtype))
    y, var = kernels.scale_moments(x + 3.0, 0.7)
    assert torch.equal(y, (x + 3.0) * 0.7)
    yd = y.double()
    assert var == pytest.approx(float((yd - yd.mean(0)).pow(2).sum()), rel=1e-6)  # fp32 row sums
    ehat, x_hat = torch.randn(33, 70, generator=g).to(dtype), torch.randn(33, 70, generator=g)
    diff, sq = kernels.auxk_residual(ehat, x, x_hat)
    ref = (ehat.float() - x) + x_hat
    assert torch.equal(diff, ref.to(dtype)) and sq == pytest.approx(float(ref.double().pow(2).sum()), rel=1e-6)


def test_batch_topk_reference_shape(threads):
    """The sampled starting cut on a realistic batch: same answer as the twin."""
    z, bias = _rows(512, 2304, torch.bfloat16, False, seed=13)
    n_keep = 32 * 512
    got = ops.batch_topk_kernel(z, bias, n_keep)
    ref = ops.batch_topk_torch(z.float() + bias, n_keep)
    assert all(torch.equal(a, b) for a, b in zip(got, ref))
    guess = kernels.batch_topk_guess(z, bias, int(1.3 * n_keep))
    assert 0 < guess < float(got[2].min())  # a cut below the answer: no retry needed


def test_optimizer_step_kernels_match_torch(threads):
    """Pass 1 (projected gradient norm) against project_grads_'s formula; pass 2 (Adam on
    rows, then renormalise, then the bf16 copy) against torch's fused Adam and constrain_."""
    g = torch.Generator().manual_seed(14)
    w = torch.randn(37, 100, generator=g)
    w /= w.norm(dim=1, keepdim=True)
    grad = torch.randn(37, 100, generator=g)
    sq, coef = kernels.rows_sqnorm(grad, w)
    ref_coef = (grad * w).sum(1) / (w * w).sum(1)
    assert torch.allclose(coef, ref_coef, rtol=1e-5, atol=1e-7)
    assert sq == pytest.approx(float((grad - ref_coef[:, None] * w).pow(2).sum()), rel=1e-5)
    assert kernels.rows_sqnorm(grad)[0] == pytest.approx(float(grad.pow(2).sum()), rel=1e-6)
    for shape, project in [((37, 100), True), ((37, 100), False), ((4608,), False), ((45,), False)]:
        p0 = torch.randn(shape, generator=g)
        if project:
            p0 /= p0.norm(dim=1, keepdim=True)
        ref = torch.nn.Parameter(p0.clone())
        opt = torch.optim.Adam([ref], lr=1e-2, betas=(0.9, 0.99), eps=1e-6, fused=True)
        p, m, v = p0.clone(), torch.zeros(shape), torch.zeros(shape)
        shadow = torch.empty(shape, dtype=torch.bfloat16)
        for step in range(1, 5):
            grad = torch.randn(shape, generator=g)
            clip = 0.5 if step % 2 else 1.0
            coef = kernels.rows_sqnorm(grad, p)[1] if project else None
            # the reference: project, clip, torch's fused Adam, renormalise
            gr = grad - coef[:, None] * ref.detach() if project else grad.clone()
            ref.grad = gr * clip
            opt.step()
            if project:
                with torch.no_grad():
                    ref.div_(ref.norm(dim=1, keepdim=True).clamp_min(1e-12))
            kernels.adam_rows(
                p,
                grad,
                m,
                v,
                step=float(step),
                lr=1e-2,
                beta1=0.9,
                beta2=0.99,
                eps=1e-6,
                clip=clip,
                coef=coef,
                normalize=project,
                shadow=shadow,
            )
            st = opt.state[ref]
            tol = dict(rtol=1e-6, atol=1e-7)
            assert torch.allclose(m, st["exp_avg"], **tol) and torch.allclose(v, st["exp_avg_sq"], **tol)
            assert torch.allclose(p, ref.detach(), **tol), (shape, project, step)
            assert torch.equal(shadow, p.to(torch.bfloat16))


def test_environment_switch(monkeypatch):
    monkeypatch.setenv(kernels.ENV_VAR, "torch")
    assert not kernels.available()
    monkeypatch.setenv(kernels.ENV_VAR, "cuda")
    with pytest.raises(UserError, match="auto, c, torch"):
        kernels.available()
    monkeypatch.setenv(kernels.ENV_VAR, "auto")
    assert kernels.available()


def test_build_is_cached_per_source_and_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first = Path(build.load(kernels._SIGNATURES)._name)
    assert first.parent == tmp_path / "sae_train" / "kernels" and first.exists()
    mtime = first.stat().st_mtime_ns
    assert Path(build.load(kernels._SIGNATURES)._name) == first and first.stat().st_mtime_ns == mtime  # reused
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temporary left behind


@pytest.mark.skipif("avx512f" not in build.cpu_flags(), reason="this CPU already runs the portable path")
def test_portable_build_passes_this_suite(tmp_path):
    """CPUs without AVX-512 (AVX2 laptops and cloud VMs) compile the portable C path: build it
    here with -mno-avx512f (8-float AVX2 vectors, so "auto" takes it) and run every other test
    of this file against it."""
    import os
    import subprocess
    import sys

    env = {**os.environ, build.CFLAGS_VAR: "-mno-avx512f", "XDG_CACHE_HOME": str(tmp_path)}
    width = subprocess.run(
        [sys.executable, "-c", "from sae_train.sae import kernels; print(kernels._lib_or_raise().sae_vector_width())"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert width == "8" and kernels._lib_or_raise().sae_vector_width() == 16
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "not portable_build"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
