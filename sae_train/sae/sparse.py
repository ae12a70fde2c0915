"""The device-agnostic sparse step of the TopK family, in plain PyTorch ops.

What CUDA runs, and what the CPU runs with SAE_TRAIN_KERNELS=torch or in float64. The only
[B, d_sae] tensor is the pre-activations (the exact fp32 values z + b_enc are formed a block of
rows at a time); there is no host-device sync (no nonzero, boolean indexing, bincount or
.item()) and every reduction is ordered, so the step is deterministic.

Selection follows the rule of sae/ops.py (value descending, NaN first, ties to the lower
index). Wide rows go through groups of columns (`_best_groups`): one strided max per group,
`torch.topk` over the group maxima for the c = k + margin best groups, then over sub-group
maxima and their columns (`_refine`, `_ranked`), keeping c candidates, which are ranked
exactly (value, then index) by a stable sort; no torch.topk sees more than O(c) entries per
row beyond the group maxima. The exact top k is among the candidates unless more than
`margin` entries (or groups) tie at the k-th place; torch.topk's choice among tied entries is
unspecified on CUDA, and ranking the candidates by index makes the result deterministic and
equal to the C kernels' whenever the tie group fits in the margin. Only degenerate rows (e.g.
x = b_dec while b_enc = 0) tie more widely; they still get a valid top k.

Gradients: autograd, with two custom pieces.
- `SparseDecode`: x_hat = embedding_bag(ids, W_dec, per_sample_weights=values) + b_dec; the
  values' gradient from the embedding bag's per-sample-weights kernel, dW_dec as one embedding
  bag over the entries grouped by latent.
- `SparsePreact`: the selected pre-activations as a function of W_enc, b_enc, b_dec. Its
  backward groups the entries by latent (`ByLatent`: one stable sort of the nnz ids, shared with
  `SparseDecode`) and computes dW_enc^T and db_enc together as one embedding bag over the
  tokens' rows [x - b_dec, 1]; then
  db_dec = -W_enc @ db_enc. No [nnz, d_in] buffer, no atomics.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as tdist
import torch.nn.functional as F
from torch import Tensor


def _margin(n: int, k: int) -> int:
    """Extra candidates beyond the k best of n: covers the entries sharing the k-th entry's value
    (bf16 GEMM outputs tie often: a few per row at d_sae 65k, ~n/2^14 for Gaussian-like
    pre-activations; ~k/9 over a BatchTopK batch at b_enc = 0), with room to spare."""
    return max(8, k // 4, n // 1024)


GROUP = 16
"""Columns per group in the selection's first pass (`_best_groups`)."""
SUB = 4
"""Blocks per sub-group in its second pass (`_refine`)."""
_CHUNK = {"cpu": 1 << 20}
"""Elements per pass of `_group_max` by device type (CPU: a cache-sized block, few enough passes
that a loaded host does not stall on each); others: 1 << 26."""


def _grouped(n: int, c: int) -> bool:
    """Whether rows of n columns are selected through groups: enough of them to pay off."""
    return n // GROUP >= 4 * c


def _best_groups(gmax: Tensor, c: int) -> Tensor:
    """The c groups [R, c] with the largest maxima of each row of gmax [R, N // GROUP] (group j:
    columns j, j + N // GROUP, ...). They hold the row's c largest entries, up to ties at the
    c-th place as torch.topk: a group outside them has c groups above it, each holding an entry
    larger than all of its own. So torch.topk runs on N/GROUP maxima, then (`_refine`) on the
    c*GROUP/SUB maxima of their sub-groups and (`_ranked`) on the c*SUB columns of the best c
    sub-groups (plus the N % GROUP last columns, candidates outright), instead of N columns:
    beyond one strided max at memory speed, the selection's work grows with c, not N.

    Many groups (wide rows) are chosen the same way one level up, through the maxima of SUB
    strided groups each (the n_groups % SUB last groups are candidates outright)."""
    n_rows, n_groups = gmax.shape
    if n_groups // SUB < 4 * c:
        return gmax.topk(c, dim=1, sorted=False).indices
    stride = n_groups // SUB
    upper = _best_groups(gmax[:, : stride * SUB].unflatten(1, (SUB, stride)).amax(1), c)
    cand = (upper.unsqueeze(1) + stride * torch.arange(SUB, device=gmax.device).unsqueeze(1)).flatten(1)
    if stride * SUB < n_groups:
        tail = torch.arange(stride * SUB, n_groups, device=gmax.device).expand(n_rows, -1)
        cand = torch.cat([cand, tail], dim=1)
    return cand.gather(1, gmax.gather(1, cand).topk(c, dim=1, sorted=False).indices)


def _grid(t: Tensor, best: Tensor) -> Tensor:
    """t [R, N] at the columns of the groups best [R, c]: [R, GROUP, c], block s holding columns
    best + s * (N // GROUP)."""
    n_rows, n = t.shape
    n_groups = n // GROUP
    idx = best.unsqueeze(1).expand(n_rows, GROUP, best.shape[1])
    return t[:, : n_groups * GROUP].unflatten(1, (GROUP, n_groups)).gather(2, idx)


def _refine(grid: Tensor, best: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """The groups' values grid [R, GROUP, c] (`_grid`) cut to the c sub-groups (SUB blocks of one
    group) with the largest maxima, which hold the c largest values (as in `_best_groups`):
    (columns [R, SUB*c], values [R, SUB*c])."""
    c = grid.shape[2]
    top = grid.unflatten(1, (GROUP // SUB, SUB)).amax(2).flatten(1).topk(c, dim=1, sorted=False).indices
    part, group = top // c, top % c
    blocks = part.unsqueeze(1) * SUB + torch.arange(SUB, device=grid.device).unsqueeze(1)  # [R, SUB, c]
    vals = grid.flatten(1).gather(1, (blocks * c + group.unsqueeze(1)).flatten(1))
    cols = best.gather(1, group).unsqueeze(1) + blocks * (n // GROUP)
    return cols.flatten(1), vals


def _with_tail(cols: Tensor, vals: Tensor, tail: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Candidates plus the N % GROUP last columns (their values tail [R, N % GROUP])."""
    if tail.shape[1] == 0:
        return cols, vals
    tail_cols = torch.arange(n - tail.shape[1], n, device=cols.device).expand(cols.shape[0], -1)
    return torch.cat([cols, tail_cols], dim=1), torch.cat([vals, tail], dim=1)


def _ranked(cols: Tensor, vals: Tensor, k: int, c: int) -> tuple[Tensor, Tensor]:
    """The k best of candidate columns cols [R, C] with exact values vals [R, C], ranked by value
    descending, then column ascending: (columns [R, k], values [R, k]).

    Beyond c candidates, torch.topk first keeps c of them (exact unless more than c - k tie at
    the k-th place); a stable sort of the rest, in column order, makes the ranking and its ties
    deterministic."""
    if cols.shape[1] > c:
        top = vals.topk(c, dim=1, sorted=False)
        cols, vals = cols.gather(1, top.indices), top.values
    cols, order = cols.sort(dim=1)
    vals, rank = vals.gather(1, order).sort(dim=1, descending=True, stable=True)
    return cols.gather(1, rank[:, :k]), vals[:, :k]


def ranked_top(key: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Per row of key [R, N] (exact values), the k largest entries under the selection rule, best
    first: (column ids [R, k], values [R, k]) by value descending, then column ascending."""
    n = key.shape[1]
    c = min(n, k + _margin(n, k))
    if _grouped(n, c):
        grouped = n // GROUP * GROUP
        best = _best_groups(key[:, :grouped].unflatten(1, (GROUP, n // GROUP)).amax(1), c)
        cols, vals = _with_tail(*_refine(_grid(key, best), best, n), key[:, grouped:], n)
    else:
        top = key.topk(c, dim=1, sorted=False)
        cols, vals = top.indices, top.values
    return _ranked(cols, vals, k, c)


def _exact(z: Tensor, bias: Tensor, colmask: Tensor | None) -> Tensor:
    """z + bias in bias's dtype, -inf where colmask is unset. (A cast then an in-place add: ~2x
    faster on CPU than a mixed-dtype add.)"""
    v = z.to(bias.dtype, copy=True).add_(bias)
    return v if colmask is None else v.masked_fill_(~colmask, float("-inf"))


def _group_max(z: Tensor, bias: Tensor, colmask: Tensor | None) -> Tensor:
    """Per row, the maxima [B, N // GROUP] of the exact values (`_exact`) over the groups of
    `_best_groups`, a block of rows at a time: the fp32 values never exist for all of z."""
    B, n = z.shape
    n_groups = n // GROUP
    grouped = n_groups * GROUP
    z, bias = z[:, :grouped], bias[:grouped]
    colmask = None if colmask is None else colmask[:grouped]
    rows = max(1, _CHUNK.get(z.device.type, 1 << 26) // n)
    gmax = torch.empty(B, n_groups, dtype=bias.dtype, device=z.device)
    for start in range(0, B, rows):
        block = _exact(z[start : start + rows], bias, colmask)
        torch.amax(block.unflatten(1, (GROUP, n_groups)), 1, out=gmax[start : start + rows])
    return gmax


def topk_rows(z: Tensor, bias: Tensor, k: int, colmask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per row of z + bias (z in the GEMM dtype, bias in fp32/fp64), the k largest entries
    (among columns with colmask set).

    Returns (ids [B, k] ascending, values [B, k] in bias's dtype; -inf at masked columns, which
    are picked only when fewer than k columns are allowed)."""
    B, n = z.shape
    c = min(n, k + _margin(n, k))
    if _grouped(n, c):
        best = _best_groups(_group_max(z, bias, colmask), c)
        grid = _grid(z, best).to(bias.dtype).add_(_grid(bias.expand(B, n), best))
        if colmask is not None:
            grid.masked_fill_(~_grid(colmask.expand(B, n), best), float("-inf"))
        grouped = n // GROUP * GROUP
        tail = _exact(z[:, grouped:], bias[grouped:], None if colmask is None else colmask[grouped:])
        cols, vals = _with_tail(*_refine(grid, best, n), tail, n)
    else:
        top = _exact(z, bias, colmask).topk(c, dim=1, sorted=False)
        cols, vals = top.indices, top.values
    ids, vals = _ranked(cols, vals, k, c)
    ids, order = ids.sort(dim=1)
    return ids, vals.gather(1, order)


@dataclass
class BatchSelection:
    """The entries a TopK-family step selected, in CSR (row-major), with what BatchTopK adds: the
    padding mask under DDP and the statistic its inference threshold tracks."""

    offsets: Tensor  # [B+1]
    ids: Tensor  # [nnz] latent ids, ascending within a token
    rows: Tensor  # [nnz] token of each entry
    values: Tensor  # [nnz] their pre-activations z + bias (in bias's dtype)
    keep: Tensor | None  # bool [nnz]: entries past the global cut (DDP) are padding, else None
    min_kept: Tensor | None  # smallest positive kept pre-activation over the global batch (0 if none)


_span: tuple[tdist.ProcessGroup | None, int] | None = None
"""(process group, its size) set by `selection_span`; None: every rank of torch.distributed."""


@contextlib.contextmanager
def selection_span(group: tdist.ProcessGroup | None, world_size: int) -> Iterator[None]:
    """Within the block, training forwards select across `group`'s `world_size` ranks (None:
    the default group) instead of every rank: the ranks that train one SAE together when the
    run's SAEs are spread over ranks (1: its owner alone, no collective)."""
    global _span
    outer, _span = _span, (group, world_size)
    try:
        yield
    finally:
        _span = outer


def selection_world() -> int:
    """Ranks that a BatchTopK selection spans: every rank of torch.distributed (or of the
    `selection_span` group) in a training forward (autograd on), else 1 -- forwards without
    autograd (the data-dependent init, run on rank 0 alone; evaluation) select within their own
    batch and reach no collective."""
    if torch.is_grad_enabled() and tdist.is_available() and tdist.is_initialized():
        return tdist.get_world_size() if _span is None else _span[1]
    return 1


def batch_topk(
    z: Tensor,
    bias: Tensor,
    k: int,
    world: int = 1,
    gather: Callable[[Tensor], tuple[Tensor, int]] | None = None,
) -> BatchSelection:
    """The k*B largest entries of z + bias over the batch; with world > 1 (`selection_world`),
    the k*B*world largest over every rank's rows, so that N ranks select what 1 process would
    on the concatenated batch (`global_cut`). `gather` replaces the all_gather over every rank of
    torch.distributed (latent shards: the ranks holding blocks of the global batch, sae/shard.py).

    Fixed size: min(k*B*world, entries of z) per rank (`keep` marks the kept ones when the cut
    spans ranks); entries that are not positive get value 0 after ReLU, as in TopK.
    """
    B, n = z.shape
    key = _exact(z, bias, None)  # exact values: global_cut compares them across ranks
    n_keep = k * B * world
    ranked, vals = ranked_top(key.view(1, -1), min(n_keep, key.numel()))
    ranked, vals = ranked[0], vals[0]
    keep = None
    if world > 1 or gather is not None:
        n_local, min_kept = global_cut(vals, n_keep, gather)
        keep = torch.arange(vals.numel(), device=z.device) < n_local
    else:
        min_kept = _min_positive(vals)
    ids, order = ranked.sort()
    keep = None if keep is None else keep[order]
    rows = ids // n
    offsets = torch.searchsorted(rows, torch.arange(B + 1, device=z.device))
    return BatchSelection(offsets, ids % n, rows, vals[order], keep, min_kept)


def _min_positive(v: Tensor) -> Tensor:
    """The smallest positive entry of v, 0 if none (the statistic BatchTopK's threshold tracks)."""
    m = torch.where(v > 0, v, torch.full_like(v, float("inf"))).amin() if v.numel() else v.new_zeros(())
    return torch.where(torch.isinf(m), torch.zeros_like(m), m)


def _all_gather_world(tensor: Tensor) -> tuple[Tensor, int]:
    """[world, *tensor.shape] over every rank of torch.distributed (or of the `selection_span`
    group), and this rank's index among them."""
    group = None if _span is None else _span[0]
    parts = [torch.empty_like(tensor) for _ in range(tdist.get_world_size(group))]
    tdist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.stack(parts), tdist.get_rank(group)


def cut_mask(every: Tensor, n_keep: int) -> Tensor:
    """Which candidates of every [..., P, c] (P parts -- ranks, latent shards -- each listing its
    candidates in the selection's order among equals: ranked, or by ascending column) are among
    the n_keep largest of their [..., P*c]: bool [..., P, c].

    With t the n_keep-th value, entries above t are kept, and entries equal to t go to the
    lower parts first (rank r's rows follow rank r-1's; shard s's latents follow shard s-1's),
    then in their order within the part -- ties to the lower global index, the selection rule.
    NaN ranks above everything."""
    t = every.flatten(-2).topk(n_keep, dim=-1, sorted=True).values[..., -1, None, None]
    eq = (every == t) | (every.isnan() & t.isnan())
    gt = ~(every <= t) & ~eq
    need = n_keep - gt.sum((-2, -1))
    eq_n = eq.sum(-1)  # [..., P]
    quota = (need.unsqueeze(-1) - (eq_n.cumsum(-1) - eq_n)).clamp(min=0).minimum(eq_n)
    return gt | (eq & (eq.cumsum(-1) <= quota.unsqueeze(-1)))


def global_cut(
    ranked_vals: Tensor, n_keep: int, gather: Callable[[Tensor], tuple[Tensor, int]] | None = None
) -> tuple[Tensor, Tensor]:
    """How many of this rank's candidates to keep so that the ranks together keep the n_keep
    largest entries of the global batch, and the smallest positive kept value (both 0-d device
    tensors, equal on every rank for the second).

    ranked_vals are this rank's best entries (at most n_keep), ranked by the selection rule (the
    global top n_keep can hold at most n_keep of one rank's). One gather of them (padded to
    n_keep with -inf; default: an all_gather over every rank) gives every rank the global
    n_keep-th value t; `cut_mask` keeps the entries above t and gives those equal to t to the
    lower ranks first.
    """
    padded = torch.cat([ranked_vals, ranked_vals.new_full((n_keep - ranked_vals.numel(),), float("-inf"))])
    every, rank = (gather or _all_gather_world)(padded)
    kept = cut_mask(every, n_keep)
    min_kept = _min_positive(torch.where(kept, every, torch.zeros_like(every)).flatten())
    return kept[rank].sum(), min_kept


class SparsePreact(torch.autograd.Function):
    """Pre-activations z[rows, ids] + b_enc[ids] of selected entries (`pre`, as the selection
    computed them from z = (x - b_dec) @ W_enc without autograd), differentiable in W_enc, b_enc
    and b_dec.

    With gp the entries' gradient and xc = x - b_dec:
        dW_enc[:, i] = sum over entries of latent i of gp * xc[row],  db_enc[i] = sum gp
        db_dec = -W_enc @ db_enc
    The first two are one embedding bag: entries sorted by latent (stable: deterministic) are
    bags, the tokens' rows [xc, 1] the table, gp the per-sample weights.
    """

    @staticmethod
    def forward(
        ctx, pre: Tensor, xc: Tensor, rows: Tensor, groups: ByLatent, b_dec: Tensor, W_enc: Tensor, b_enc: Tensor
    ) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(xc, rows, W_enc)
        ctx.groups = groups
        return pre.view_as(pre)

    @staticmethod
    def backward(ctx, gp: Tensor):  # type: ignore[override]
        xc, rows, W_enc = ctx.saved_tensors
        d_in = W_enc.shape[0]
        order, bags = ctx.groups.get()
        table = torch.cat([xc, xc.new_ones(xc.shape[0], 1)], dim=1).to(gp.dtype)
        g = F.embedding_bag(
            rows[order], table, bags, mode="sum", per_sample_weights=gp[order], include_last_offset=True
        )
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


class ByLatent:
    """Entries (latent ids [nnz]) grouped by latent for the backward's embedding bags: a stable
    permutation sorting ids, and bag offsets [d_sae+1]. Made on first use and shared by every
    backward over the same entries (`SparsePreact` and `SparseDecode`: one sort per step)."""

    def __init__(self, ids: Tensor, d_sae: int) -> None:
        self.ids, self.d_sae = ids, d_sae
        self._groups: tuple[Tensor, Tensor] | None = None

    def get(self) -> tuple[Tensor, Tensor]:
        if self._groups is None:
            key = self.ids.to(torch.int32) if self.d_sae < 2**31 else self.ids  # int32 sorts ~2x faster
            sorted_ids, order = key.sort(stable=True)
            bounds = torch.arange(self.d_sae + 1, dtype=key.dtype, device=key.device)
            self._groups = order, torch.searchsorted(sorted_ids, bounds)
        return self._groups


class SparseDecode(torch.autograd.Function):
    """sum over a token's entries of value * table[id]: [B, d_in], differentiable in the values
    and the table. Backward: the values' gradient <g[row], table[id]> by the embedding bag's own
    per-sample-weights kernel (no [nnz, d_in] buffer); the table's gradient as one forward
    embedding bag over the entries grouped by latent (as `SparsePreact`) -- autograd's
    embedding-bag backward does the same work ~10x slower on CPU."""

    @staticmethod
    def forward(ctx, values: Tensor, table: Tensor, groups: ByLatent, rows: Tensor, offsets: Tensor) -> Tensor:  # type: ignore[override]
        ids = groups.ids
        ctx.save_for_backward(values, table, ids, rows, offsets)
        ctx.groups = groups
        return F.embedding_bag(ids, table, offsets, mode="sum", per_sample_weights=values, include_last_offset=True)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        values, table, _, rows, offsets = ctx.saved_tensors
        grads = decode_backward(g, values, table, ctx.groups, rows, offsets, ctx.needs_input_grad[:2])
        return *grads, None, None, None


def decode_backward(
    g: Tensor, values: Tensor, table: Tensor, groups: ByLatent, rows: Tensor, offsets: Tensor, needs: Sequence[bool]
) -> tuple[Tensor | None, Tensor | None]:
    """`SparseDecode`'s gradients (of the values, of the table; each where `needs` says) from the
    output's gradient g [B, D]."""
    g = g.contiguous()
    grad_values = grad_table = None
    if needs[0]:  # offset2bag (the bag of each entry) is `rows`
        grad_values = torch.ops.aten._embedding_bag_per_sample_weights_backward(
            g, table, groups.ids, offsets, rows, 0, -1
        )
    if needs[1]:
        order, bags = groups.get()
        grad_table = F.embedding_bag(
            rows[order], g, bags, mode="sum", per_sample_weights=values[order], include_last_offset=True
        )
    return grad_values, grad_table
