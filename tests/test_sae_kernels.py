"""The C kernels against their PyTorch twins: selection (with and without ties, masks, NaN),
sparse products, the fused activation passes, and the build/switch machinery."""

import pytest
import torch

from sae_train.errors import UserError
from sae_train.sae import kernels, ops

pytestmark = pytest.mark.skipif(not kernels.available(), reason="kernels unavailable (no C compiler, or SAE_TRAIN_KERNELS=torch)")

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
    z = torch.randn(4, 50)
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
    for grad, scale in [(G, 0.0), (None, 0.3), (G, 0.3)]:
        g_eff = (0 if grad is None else grad) + scale * (x_hat - target)
        gv, g_out, colsum = kernels.decode_backward(offsets, idx, grad, x_hat, target, scale, T)
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


def test_environment_switch(monkeypatch):
    monkeypatch.setenv(kernels.ENV_VAR, "torch")
    assert not kernels.available()
    monkeypatch.setenv(kernels.ENV_VAR, "cuda")
    with pytest.raises(UserError, match="auto, torch"):
        kernels.available()
    monkeypatch.setenv(kernels.ENV_VAR, "auto")
    assert kernels.available()


def test_build_is_cached_per_source_and_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first = kernels._build()
    assert first.parent == tmp_path / "sae_train" / "kernels" and first.exists()
    mtime = first.stat().st_mtime_ns
    assert kernels._build() == first and first.stat().st_mtime_ns == mtime  # reused, not rebuilt
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temporary left behind
