"""The device-agnostic path (sae/sparse.py and every `_forward_torch`): the selection rule against
the exact reference, no host-device sync, the GEMMs and [B, d_sae] buffers it is allowed, and
(on a CUDA machine) the CUDA step against the CPU on the same weights."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sae_train.sae import ARCHITECTURES, ops, sparse
from tests.syncs import record_sync_ops
from tests.test_sae_math import _kw, data, make, perturb

DTYPES = [torch.float32, torch.bfloat16]

SITE_ARCHS = sorted(a for a, cls in ARCHITECTURES.items() if not cls.cross_layer)
"""The architectures reading one site (cross-layer transcoders: tests/test_clt.py)."""


def _rows(B, N, dtype, ties, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, N, generator=g)
    if ties == "some":  # bf16-like grid: a few entries tie at the k-th place
        z = (z * 64).round() / 64
    elif ties == "many":  # a handful of distinct values: ties far wider than the margin
        z = (2 * z).round()
    bias = 0.1 * torch.randn(N, generator=g) if ties == "none" else torch.zeros(N)
    return z.to(dtype), bias


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ties", ["none", "some"])
@pytest.mark.parametrize(
    "B, N, k",
    [(7, 100, 5), (33, 700, 32), (5, 64, 64), (9, 130, 1), (3, 5000, 300), (6, 1030, 8), (5, 2048, 16), (3, 4200, 8)],
)  # the last three: through groups
# (with a tail; the last also through groups of groups, with a tail)
def test_topk_rows_equals_the_exact_rule(dtype, ties, B, N, k):
    z, bias = _rows(B, N, dtype, ties)
    ids, vals = sparse.topk_rows(z, bias, k)
    ref_ids, ref_vals = ops.topk_rows_torch(z.float() + bias, k)
    assert torch.equal(ids, ref_ids) and torch.equal(vals, ref_vals)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N, k", [(300, 20), (1500, 8)])
def test_topk_rows_with_column_mask(dtype, N, k):
    z, bias = _rows(11, N, dtype, "some", seed=1)
    mask = torch.rand(N, generator=torch.Generator().manual_seed(2)) < 0.3
    ids, vals = sparse.topk_rows(z, bias, k, mask)
    ref = ops.topk_rows_torch(z.float() + bias, k, mask)
    assert torch.equal(ids, ref[0]) and torch.equal(vals, ref[1])


def test_topk_rows_through_groups_reaches_the_last_columns():
    """Columns past the last full group (N % GROUP of them) are candidates too."""
    z, bias = _rows(5, 1100, torch.float32, "none", seed=7)
    assert 1100 % sparse.GROUP and sparse._grouped(1100, 8 + sparse._margin(1100, 8))
    z[:, -3:] += 10.0  # the three last columns win every row
    ids, vals = sparse.topk_rows(z, bias, 8)
    ref_ids, ref_vals = ops.topk_rows_torch(z + bias, 8)
    assert torch.equal(ids, ref_ids) and torch.equal(vals, ref_vals) and (ids[:, -3:] == torch.arange(1097, 1100)).all()


def test_ties_wider_than_the_margin_still_give_a_top_k():
    z, bias = _rows(9, 2000, torch.float32, "many", seed=5)
    ids, vals = sparse.topk_rows(z, bias, 10)
    _, ref_vals = ops.topk_rows_torch(z + bias, 10)
    assert torch.equal(vals.sort(1).values, ref_vals.sort(1).values)  # same values, maybe other tied ids
    assert torch.equal(ids, ids.sort(1).values) and torch.equal(z.gather(1, ids), vals)


@pytest.mark.parametrize("N", [50, 1000])
def test_nan_ranks_first(N):
    z = torch.randn(4, N, generator=torch.Generator().manual_seed(13))
    z[1, 7] = float("nan")
    z[2, 20:26] = float("nan")  # six tied NaNs: the three lowest ids
    ids, _ = sparse.topk_rows(z, torch.zeros(N), 3)
    assert torch.equal(ids, ops.topk_rows_torch(z, 3)[0])
    assert 7 in ids[1] and ids[2].tolist() == [20, 21, 22]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ties", ["none", "some"])
@pytest.mark.parametrize("k", [1, 5, 40])
def test_batch_topk_equals_the_exact_rule(dtype, ties, k):
    z, bias = _rows(40, 256, dtype, ties, seed=3)
    sel = sparse.batch_topk(z, bias, k)
    offsets, ids, vals = ops.batch_topk_torch(z.float() + bias, k * 40)
    assert torch.equal(sel.offsets, offsets) and torch.equal(sel.ids, ids) and sel.keep is None
    assert torch.equal(sel.rows, torch.repeat_interleave(torch.arange(40), offsets.diff()))
    assert sel.min_kept == vals.min()


def test_batch_topk_with_fewer_positive_entries_pads_with_zeros():
    z = torch.full((4, 8), -1.0)
    z[1, 3], z[2, 5] = 0.5, 2.0
    sae = make("batchtopk", d_in=8, d_sae=8, k=2)
    sel = sparse.batch_topk(z, torch.zeros(8), 2)
    assert sel.ids.numel() == 8 and sel.min_kept == 0.5
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(8))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    sae.impl = "torch"
    out = sae(z)
    assert out.l0 == 0.5 and out.latents.to_dense()[2, 5] == 2.0 and out.stats["min_kept"] == 0.5


# ----------------------------------------------------------------------------- what a step may do


def _step(sae, x, dead, n=2):
    """n warm steps: forward, backward, after_step (the BatchTopK threshold EMA)."""
    for _ in range(n):
        sae.zero_grad(set_to_none=True)
        out = sae(x, dead_mask=dead)
        out.losses["loss"].backward()
        sae.after_step(out)
    return out


@pytest.mark.parametrize("compute", DTYPES)
@pytest.mark.parametrize("arch", SITE_ARCHS)
def test_torch_path_has_no_sync(arch, compute):
    sae = perturb(make(arch, compute=compute, **_kw({})))
    sae.impl = "torch"
    x = data()
    dead = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    dead[::3] = True
    _step(sae, x, dead, n=1)
    with record_sync_ops() as ops:
        _step(sae, x, dead)
        _step(sae, x, None)
    assert ops == []


class _Recorder(TorchDispatchMode):
    """Shapes of matrix products and of every tensor produced."""

    def __init__(self):
        super().__init__()
        self.mm, self.outputs = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func._schema.name.split("::")[-1]
        if name in ("mm", "addmm", "bmm", "matmul"):
            self.mm.append((name, tuple(args[-2].shape), tuple(args[-1].shape)))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if (
                isinstance(t, torch.Tensor) and not name.endswith("_") and not func.is_view
            ):  # in place, views: no new buffer
                self.outputs.append(tuple(t.shape))
        return out


@pytest.mark.parametrize("arch, n_gemms", [("topk", 1), ("batchtopk", 1), ("relu", 5), ("jumprelu", 5)])
def test_torch_path_gemms(arch, n_gemms):
    """TopK family: the encoder GEMM only (decode and gradients sparse); ReLU family: 5 (b_dec's
    gradient is summed over tokens first, no sixth GEMM). No [nnz, d_in] buffer either."""
    B, d_in, d_sae = 64, 16, 512
    sae = perturb(make(arch, d_in=d_in, d_sae=d_sae, **_kw({})))
    sae.impl = "torch"
    dead = torch.zeros(d_sae, dtype=torch.bool)
    dead[::7] = True
    x = data(n=B, d_in=d_in)
    with _Recorder() as rec:
        _step(sae, x, dead if arch in ("topk", "batchtopk") else None, n=1)
    assert len(rec.mm) == n_gemms, rec.mm
    if arch in ("topk", "batchtopk"):
        wide = [s for s in rec.outputs if len(s) == 2 and s[0] == B and s[1] == d_sae]
        assert len(wide) <= 3, wide  # the pre-activations and a selection key each for TopK, AuxK
        nnz = B * max(sae.cfg.k, sae.cfg.aux_k)
        big = [s for s in rec.outputs if len(s) == 2 and s[0] >= nnz and s[0] != d_sae and s[1] >= d_in]
        assert not big, big


# ----------------------------------------------------------------------------- CUDA == CPU

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("compute", DTYPES)
@pytest.mark.parametrize("pattern", ["none", "some", "all"])
@pytest.mark.parametrize("arch", SITE_ARCHS)
def test_cuda_step_equals_cpu(arch, pattern, compute):
    """Same weights, a tie-free batch: losses, reconstruction and every gradient (fp32 rtol 1e-4,
    bf16 2e-2 of the largest entry)."""
    from tests.test_sae_math import _dead_pattern, run

    sae = perturb(make(arch, d_in=64, d_sae=1024, compute=compute, **_kw({})))
    x, dead = data(n=256, d_in=64), _dead_pattern(sae, pattern)
    cpu, g_cpu = run(sae, x, dead)
    gpu_sae = sae.to("cuda")
    gpu, g_gpu = run(gpu_sae, x.cuda(), dead.cuda())
    tol = 1e-4 if compute == torch.float32 else 2e-2
    for key in cpu.losses:
        torch.testing.assert_close(gpu.losses[key].cpu(), cpu.losses[key], rtol=tol, atol=tol * 1e-2)
    torch.testing.assert_close(gpu.x_hat.cpu(), cpu.x_hat, rtol=tol, atol=tol * 1e-2)
    for name, g in g_cpu.items():
        assert (g_gpu[name].cpu() - g).abs().max() <= tol * g.abs().max(), name


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("arch", SITE_ARCHS)
def test_cuda_step_has_no_sync(arch):
    """The GPU twin of test_torch_path_has_no_sync: CUDA itself raises on a synchronising call."""
    sae = perturb(make(arch, d_in=64, d_sae=1024, compute=torch.bfloat16, **_kw({}))).to("cuda")
    x = data(n=256, d_in=64).cuda()
    dead = torch.zeros(1024, dtype=torch.bool, device="cuda")
    dead[::3] = True
    _step(sae, x, dead, n=1)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _step(sae, x, dead)
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ----------------------------------------------------------------------------- memory: chunks


@pytest.mark.parametrize("arch", SITE_ARCHS)
def test_encode_and_init_run_in_chunks(monkeypatch, arch):
    """No [n, d_sae] temporary beyond one chunk's rows (the encode output aside); same results."""
    from sae_train.sae import base

    x = data(n=100)
    sae = perturb(make(arch, **_kw({})))
    sae.impl = "torch"
    whole = sae.encode(x)
    init = perturb(make(arch, **_kw({})))
    init.impl = "torch"
    init.init_from_data(x)
    monkeypatch.setattr(base, "CHUNK_TOKENS", 16)
    with _Recorder() as rec:
        chunked = sae.encode(x)
    wide = [s for s in rec.outputs if len(s) == 2 and s[1] == sae.cfg.d_sae and s[0] > 16]
    assert wide == [(100, sae.cfg.d_sae)], wide  # the output only
    assert torch.equal(chunked, whole)
    again = perturb(make(arch, **_kw({})))
    again.impl = "torch"
    with _Recorder() as rec:
        again.init_from_data(x)
    assert not [s for s in rec.outputs if len(s) == 2 and s[1] == sae.cfg.d_sae and s[0] > 16]
    if not getattr(
        ARCHITECTURES[arch], "batch_selection", False
    ):  # BatchTopK selects within each chunk: a different (valid) init
        for name, p in init.named_parameters():
            assert torch.allclose(p, dict(again.named_parameters())[name], rtol=1e-5, atol=1e-7), name


# ----------------------------------------------------------------------------- BatchTopK over ranks

TIED = torch.tensor(
    [
        [3.0, 1.0, 2.0, 2.0, 0.5, -1.0],
        [2.0, 2.0, 0.0, 4.0, 1.0, 2.0],
        [2.0, 5.0, 2.0, 1.0, -2.0, 0.0],
        [1.0, 2.0, 3.0, 2.0, 2.0, 0.25],
    ]
)  # many 2.0s straddle the cut at every k


def _ranked_worker(rank: int, store_path: str, k: int, out_path: str) -> None:
    import torch.distributed as tdist

    tdist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=2)
    try:
        sel = sparse.batch_topk(TIED[2 * rank : 2 * rank + 2], torch.zeros(6), k, world=2)
        kept = sel.keep.nonzero().squeeze(1)
        torch.save(
            {"rows": sel.rows[kept] + 2 * rank, "ids": sel.ids[kept], "min_kept": sel.min_kept}, f"{out_path}.{rank}"
        )
    finally:
        tdist.destroy_process_group()


@pytest.mark.parametrize("k", [1, 2, 3])
def test_batch_topk_across_two_ranks_equals_one_process(tmp_path, k):
    """Ties at the global cut go to the lower flat index of the concatenated batch (rank 0 first)."""
    import torch.multiprocessing as mp

    mp.spawn(_ranked_worker, args=(str(tmp_path / "store"), k, str(tmp_path / "out")), nprocs=2)
    parts = [torch.load(tmp_path / f"out.{r}") for r in (0, 1)]
    one = sparse.batch_topk(TIED, torch.zeros(6), k)
    assert torch.equal(torch.cat([p["rows"] for p in parts]), one.rows)
    assert torch.equal(torch.cat([p["ids"] for p in parts]), one.ids)
    assert parts[0]["min_kept"] == parts[1]["min_kept"] == one.min_kept


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_auxk_on_a_bounded_slice_of_dead_latents(arch):
    """max_dead >= n_dead: the same step as the full mask; max_dead < n_dead: the first max_dead
    dead latents (by id) only, as if the others were alive for AuxK."""
    from tests.test_sae_math import run

    sae = perturb(make(arch, d_sae=96, **_kw({"aux_k": 5})))
    sae.impl = "torch"
    x = data()
    dead = torch.zeros(96, dtype=torch.bool)
    dead[[3, 10, 11, 40, 41, 42, 77]] = True
    full, g_full = run(sae, x, dead)
    sae.max_dead = 9
    bounded, g_bounded = run(sae, x, dead)
    assert torch.equal(full.losses["auxk"], bounded.losses["auxk"])
    for name in g_full:
        torch.testing.assert_close(g_bounded[name], g_full[name], rtol=1e-6, atol=1e-7)
    sae.max_dead = 4  # only 3, 10, 11, 40 take part
    cut, g_cut = run(sae, x, dead)
    sae.max_dead = None
    first = torch.zeros(96, dtype=torch.bool)
    first[[3, 10, 11, 40]] = True
    ref, g_ref = run(sae, x, first)
    assert torch.equal(cut.losses["auxk"], ref.losses["auxk"]) and cut.losses["auxk"] > 0
    for name in g_ref:
        torch.testing.assert_close(g_cut[name], g_ref[name], rtol=1e-6, atol=1e-7)
    sae.max_dead = 2
    with record_sync_ops() as ops:
        _step(sae, x, dead)
    assert ops == []
