"""The device-agnostic sparse step of the TopK family, in plain PyTorch ops.

What CUDA runs, and what the CPU runs with SAE_TRAIN_KERNELS=torch or in float64. The only
[B, d_sae] tensors are the pre-activations (and their selection key); there is no host-device
sync (no nonzero, boolean indexing, bincount or .item()) and every reduction is ordered, so the
step is deterministic.

Selection follows the rule of sae/ops.py (value descending, NaN first, ties to the lower
index). `torch.topk` picks c = k + margin candidates per row on a cheap key -- on CUDA with a bf16
GEMM the bf16 pre-activations plus bias, rounded once (rounding is monotone, so the exact top k
is among the candidates unless more than `margin` entries share the k-th entry's bf16 value) --
and the candidates are then ranked exactly (fp32 value, then index) by two small sorts.
torch.topk's choice among tied entries is unspecified on CUDA; ranking the candidates by index
makes the result deterministic and equal to the C kernels' whenever the tie group at the k-th
place fits in the margin. Only degenerate rows (e.g. x = b_dec while b_enc = 0) tie more
widely; they still get a valid top k.

Gradients: autograd, with two custom pieces.
- `SparseDecode`: x_hat = embedding_bag(ids, W_dec, per_sample_weights=values) + b_dec; the
  values' gradient from the embedding bag's per-sample-weights kernel, dW_dec as one embedding
  bag over the entries grouped by latent.
- `SparsePreact`: the selected pre-activations as a function of W_enc, b_enc, b_dec. Its
  backward groups the entries by latent (a stable sort of the nnz ids) and computes dW_enc^T
  and db_enc together as one embedding bag over the tokens' rows [x - b_dec, 1]; then
  db_dec = -W_enc @ db_enc. No [nnz, d_in] buffer, no atomics.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as tdist
import torch.nn.functional as F
from torch import Tensor


def _margin(n: int, k: int) -> int:
    """Extra candidates beyond the k best of n: covers the entries sharing the k-th entry's bf16
    value (a few per row at d_sae 65k, ~n/2^14 for Gaussian-like pre-activations; ~k/9 over a
    BatchTopK batch at b_enc = 0), with room to spare."""
    return max(8, k // 4, n // 1024)


def ranked_top(key: Tensor, k: int, exact: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor]:
    """Per row of key [R, N], the k largest entries under the selection rule, best first.

    `key` orders like the exact values up to ties (the exact values, or a monotone rounding of
    them); `exact(ids [R, c])` returns the exact values at those columns. Returns (column ids
    [R, k], exact values [R, k]) ranked by value descending, then column ascending.
    """
    n = key.shape[1]
    cand = key.topk(min(n, k + _margin(n, k)), dim=1, sorted=False).indices.sort(dim=1).values
    vals, order = exact(cand).sort(dim=1, descending=True, stable=True)
    return cand.gather(1, order[:, :k]), vals[:, :k]


def _keys(z: Tensor, bias: Tensor, colmask: Tensor | None) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """Selection key and exact values of z + bias (z in the GEMM dtype, bias in fp32/fp64).

    The key is z + bias rounded to z's dtype on CUDA (a bf16 torch.topk reads half the bytes of
    an fp32 one), the exact fp32 sum elsewhere (a CPU's topk is compute-bound, and the mixed
    bf16 output costs an extra pass there)."""
    acc = bias.dtype
    if z.dtype == acc or not z.is_cuda:
        key = _exact_key(z, bias)
        if colmask is not None:
            key.masked_fill_(~colmask, float("-inf"))
        return key, lambda ids: key.gather(1, ids)
    key = torch.empty_like(z)
    torch.add(z, bias, out=key)  # computed in fp32, rounded once: monotone in the exact value
    if colmask is not None:
        key.masked_fill_(~colmask, float("-inf"))

    def exact(ids: Tensor) -> Tensor:
        v = z.gather(1, ids).to(acc) + bias[ids]
        return v if colmask is None else v.masked_fill(~colmask[ids], float("-inf"))

    return key, exact


def _exact_key(z: Tensor, bias: Tensor) -> Tensor:
    """z + bias in bias's dtype, as a new tensor (a separate cast then an in-place add is ~2x
    faster on CPU than a mixed-dtype add)."""
    return z + bias if z.dtype == bias.dtype else z.to(bias.dtype).add_(bias)


def topk_rows(z: Tensor, bias: Tensor, k: int, colmask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per row of z + bias, the k largest entries (among columns with colmask set).

    Returns (ids [B, k] ascending, values [B, k] in bias's dtype; -inf at masked columns, which
    are picked only when fewer than k columns are allowed)."""
    key, exact = _keys(z, bias, colmask)
    ids, _ = ranked_top(key, k, exact)
    ids = ids.sort(dim=1).values
    return ids, exact(ids)


@dataclass
class BatchSelection:
    """BatchTopK's entries in CSR (row-major), with the statistic its threshold EMA needs."""

    offsets: Tensor  # [B+1]
    ids: Tensor  # [nnz] latent ids, ascending within a token
    rows: Tensor  # [nnz] token of each entry
    keep: Tensor | None  # bool [nnz]: entries past the global cut (DDP) are padding, else None
    min_kept: Tensor  # smallest positive kept pre-activation over the global batch (0 if none)


def selection_world() -> int:
    """Ranks that a BatchTopK selection spans: every rank of torch.distributed in a training
    forward (autograd on), else 1 -- forwards without autograd (the data-dependent init, run
    on rank 0 alone; evaluation) select within their own batch and reach no collective."""
    if torch.is_grad_enabled() and tdist.is_available() and tdist.is_initialized():
        return tdist.get_world_size()
    return 1


def batch_topk(z: Tensor, bias: Tensor, k: int, world: int = 1) -> BatchSelection:
    """The k*B largest entries of z + bias over the batch; with world > 1 (`selection_world`),
    the k*B*world largest over every rank's rows, so that N ranks select what 1 process would
    on the concatenated batch (`global_cut`).

    Fixed size: k*B entries (k*B*world per rank under DDP, `keep` marks the kept ones);
    entries that are not positive get value 0 after ReLU, as in TopK.
    """
    B, n = z.shape
    key = _exact_key(z, bias)  # exact values: global_cut compares them across ranks
    n_keep = min(k * B * world, key.numel())
    flat = key.view(1, -1)
    ranked, vals = ranked_top(flat, n_keep, lambda ids: flat.gather(1, ids))
    ranked, vals = ranked[0], vals[0]
    keep = None
    if world > 1:
        n_local, min_kept = global_cut(vals, n_keep)
        keep = torch.arange(n_keep, device=z.device) < n_local
    else:
        min_kept = _min_positive(vals)
    ids, order = ranked.sort()
    keep = None if keep is None else keep[order]
    rows = ids // n
    offsets = torch.searchsorted(rows, torch.arange(B + 1, device=z.device))
    return BatchSelection(offsets, ids % n, rows, keep, min_kept)


def _min_positive(v: Tensor) -> Tensor:
    """The smallest positive entry of v, 0 if none (the statistic BatchTopK's threshold tracks)."""
    m = torch.where(v > 0, v, torch.full_like(v, float("inf"))).amin() if v.numel() else v.new_zeros(())
    return torch.where(torch.isinf(m), torch.zeros_like(m), m)


def global_cut(ranked_vals: Tensor, n_keep: int) -> tuple[Tensor, Tensor]:
    """How many of this rank's candidates to keep so that the ranks together keep the n_keep
    largest entries of the global batch, and the smallest positive kept value (both 0-d device
    tensors, equal on every rank for the second).

    ranked_vals are this rank's n_keep best entries, ranked by the selection rule (the global
    top n_keep can hold at most n_keep of one rank's). One all_gather of them gives every rank
    the global n_keep-th value t; entries above t are kept, and entries equal to t go to the
    lower global flat index, i.e. to lower ranks first (rank r's rows follow rank r-1's).
    """
    world, rank = tdist.get_world_size(), tdist.get_rank()
    parts = [torch.empty_like(ranked_vals) for _ in range(world)]
    tdist.all_gather(parts, ranked_vals.contiguous())
    allv = torch.stack(parts)  # [world, n_keep]
    t = allv.flatten().topk(n_keep, sorted=True).values[-1]
    eq = (allv == t) | (allv.isnan() & t.isnan())
    gt = ~(allv <= t) & ~eq  # NaN ranks above everything
    need = n_keep - gt.sum()
    eq_n = eq.sum(1)
    quota = (need - (eq_n.cumsum(0) - eq_n)).clamp(min=0).minimum(eq_n)
    kept = gt | (eq & (torch.arange(allv.shape[1], device=allv.device) < (gt.sum(1) + quota)[:, None]))
    min_kept = _min_positive(torch.where(kept, allv, torch.zeros_like(allv)).flatten())
    return gt[rank].sum() + quota[rank], min_kept


class SparsePreact(torch.autograd.Function):
    """Pre-activations z[rows, ids] + b_enc[ids] of selected entries, differentiable in
    W_enc, b_enc and b_dec (z = (x - b_dec) @ W_enc is given, computed without autograd).

    With gp the entries' gradient and xc = x - b_dec:
        dW_enc[:, i] = sum over entries of latent i of gp * xc[row],  db_enc[i] = sum gp
        db_dec = -W_enc @ db_enc
    The first two are one embedding bag: entries sorted by latent (stable: deterministic) are
    bags, the tokens' rows [xc, 1] the table, gp the per-sample weights.
    """

    @staticmethod
    def forward(ctx, z: Tensor, xc: Tensor, rows: Tensor, ids: Tensor, b_dec: Tensor, W_enc: Tensor, b_enc: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(xc, rows, ids, W_enc)
        return z.view(-1)[rows * z.shape[1] + ids].to(b_enc.dtype) + b_enc[ids]

    @staticmethod
    def backward(ctx, gp: Tensor):  # type: ignore[override]
        xc, rows, ids, W_enc = ctx.saved_tensors
        d_in, d_sae = W_enc.shape
        order, bags = by_latent(ids, d_sae)
        table = torch.cat([xc, xc.new_ones(xc.shape[0], 1)], dim=1).to(gp.dtype)
        g = F.embedding_bag(rows[order], table, bags, mode="sum", per_sample_weights=gp[order], include_last_offset=True)
        grad_b_enc = g[:, d_in].contiguous()
        grad_W_enc = g[:, :d_in].t()
        grad_b_dec = -(W_enc.detach() @ grad_b_enc)
        return None, None, None, None, grad_b_dec, grad_W_enc, grad_b_enc


class RoundThrough(torch.autograd.Function):
    """`rounded` (a copy of w in the GEMM dtype) as w's dtype; the gradient passes to w as is,
    unrounded (a plain `.to()` chain would round the gradient too)."""

    @staticmethod
    def forward(ctx, w: Tensor, rounded: Tensor) -> Tensor:  # type: ignore[override]
        return rounded.to(w.dtype)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        return g, None


def by_latent(ids: Tensor, d_sae: int) -> tuple[Tensor, Tensor]:
    """The entries grouped by latent: (a stable permutation sorting ids, bag offsets [d_sae+1])."""
    sorted_ids, order = ids.sort(stable=True)
    return order, torch.searchsorted(sorted_ids, torch.arange(d_sae + 1, device=ids.device))


class SparseDecode(torch.autograd.Function):
    """sum over a token's entries of value * table[id]: [B, d_in], differentiable in the values
    and the table. Backward: the values' gradient <g[row], table[id]> by the embedding bag's own
    per-sample-weights kernel (no [nnz, d_in] buffer); the table's gradient as one forward
    embedding bag over the entries grouped by latent (as `SparsePreact`) -- autograd's
    embedding-bag backward does the same work ~10x slower on CPU."""

    @staticmethod
    def forward(ctx, values: Tensor, table: Tensor, ids: Tensor, rows: Tensor, offsets: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(values, table, ids, rows, offsets)
        return F.embedding_bag(ids, table, offsets, mode="sum", per_sample_weights=values, include_last_offset=True)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        values, table, ids, rows, offsets = ctx.saved_tensors
        g = g.contiguous()
        grad_values = grad_table = None
        if ctx.needs_input_grad[0]:  # offset2bag (the bag of each entry) is `rows`
            grad_values = torch.ops.aten._embedding_bag_per_sample_weights_backward(g, table, ids, offsets, rows, 0, -1)
        if ctx.needs_input_grad[1]:
            order, bags = by_latent(ids, table.shape[0])
            grad_table = F.embedding_bag(rows[order], g, bags, mode="sum", per_sample_weights=values[order],
                                         include_last_offset=True)
        return grad_values, grad_table, None, None, None
