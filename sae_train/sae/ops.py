"""Selection rules and the fused training step of the SAE family.

Three implementations of the selection, two of the step:
- `topk_rows_torch`, `batch_topk_torch`: the selection rule written the obvious way (dense
  masks, int64 cumsums, nonzero): the reference the C kernels and sae/sparse.py are tested
  against, not used in training;
- plain PyTorch (sae/sparse.py and each architecture's `_forward_torch`): sparse, sync-free,
  used on CUDA, without a C compiler, with `SAE_TRAIN_KERNELS=torch` and in float64;
- the fast CPU path: `SparseSAEFunction` (TopK family: no dense decode, sparse gradients of
  W_enc/b_enc/W_dec/b_dec) and `DenseSAEFunction` (ReLU family: five GEMMs plus one fused
  elementwise pass each way), built on sae_train/sae/kernels.

Selection rule (both implementations): value descending, NaN above everything (as
`torch.topk`, so a broken encoder shows up in the loss), ties to the lower index — per row for
TopK, in row-major order over the batch for BatchTopK. Selected indices are ascending within
a row, so both implementations return identical tensors, not just the same sets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from sae_train.sae import kernels, sparse


def _tie_select(v: Tensor, kth: Tensor, n_keep: Tensor | int, dim: int) -> Tensor:
    """Mask of the entries ranking above `kth`, plus the first ties in index order up to n_keep."""
    nan = v.isnan()
    kth_nan = kth.isnan()
    gt = torch.where(kth_nan, torch.zeros_like(nan), nan | (v > kth))
    eq = torch.where(kth_nan, nan, v == kth)
    need = n_keep - gt.sum(dim, keepdim=dim == 1)
    return gt | (eq & (eq.cumsum(dim) <= need))


def topk_rows_torch(v: Tensor, k: int, colmask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per row, the k largest entries of v (among columns with colmask set).

    Returns (indices [B, k] int64 ascending, values [B, k]). Values must be finite or NaN
    (masked columns are filled with -inf).
    """
    if colmask is not None:
        v = v.masked_fill(~colmask, float("-inf"))
    kth = v.topk(k, dim=1, sorted=True).values[:, -1:]
    sel = _tie_select(v, kth, k, dim=1)
    idx = sel.nonzero()[:, 1].view(v.shape[0], k)
    return idx, v.gather(1, idx)


def _top_of_flat(vals: Tensor, n_keep: int) -> Tensor:
    """Mask over a 1-D tensor: its n_keep largest entries under the selection rule."""
    if vals.numel() <= n_keep:
        return torch.ones_like(vals, dtype=torch.bool)
    kth = vals.topk(n_keep, sorted=True).values[-1]
    return _tie_select(vals, kth, n_keep, dim=0)


def _csr_from_rows(rows: Tensor, n_rows: int) -> Tensor:
    offsets = torch.zeros(n_rows + 1, dtype=torch.int64, device=rows.device)
    offsets[1:] = torch.bincount(rows, minlength=n_rows).cumsum(0)
    return offsets


def batch_topk_torch(v: Tensor, n_keep: int) -> tuple[Tensor, Tensor, Tensor]:
    """The n_keep largest positive entries of v [B, N] over the whole batch, as CSR.

    Returns (offsets [B+1], column ids [nnz], values [nnz]) in row-major order; nnz = n_keep
    unless fewer entries are positive (ReLU comes first: zeros are never selected).
    """
    flat = v.reshape(-1)
    cand = ((flat > 0) | flat.isnan()).nonzero().squeeze(1)
    keep = cand[_top_of_flat(flat[cand], n_keep)]
    n_cols = v.shape[1]
    return _csr_from_rows(keep // n_cols, v.shape[0]), keep % n_cols, flat[keep]


def batch_topk_kernel(z: Tensor, bias: Tensor, n_keep: int) -> tuple[Tensor, Tensor, Tensor]:
    """`batch_topk_torch(z.float() + bias, n_keep)` without materialising z + bias.

    A sample of the batch (~64k entries) picks a cut expected to leave ~1.3*n_keep
    candidates; one SIMD pass collects them and an exact selection runs on those only.
    """
    expected = int(1.3 * n_keep) + 64
    return kernels.batch_topk(z, bias, n_keep, kernels.batch_topk_guess(z, bias, expected), expected)


def _batch_topk_global(z: Tensor, bias: Tensor, n_keep: int, world: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """`batch_topk_kernel` over the global batch of `world` ranks (k*B_global over all ranks,
    `sparse.global_cut`), plus the smallest kept value. CPU only: compacts by masks."""
    if world == 1:
        offsets, idx, pre = batch_topk_kernel(z, bias, n_keep)
        return offsets, idx, pre, pre.min() if pre.numel() else pre.new_zeros(())
    n_keep *= world
    offsets, idx, pre = batch_topk_kernel(z, bias, min(n_keep, z.numel()))
    ranked, order = pre.sort(descending=True, stable=True)  # CSR order is flat-index order
    n_local, min_kept = sparse.global_cut(ranked, n_keep)
    keep = torch.zeros(pre.numel(), dtype=torch.bool)
    keep[order[: int(n_local)]] = True
    rows = torch.repeat_interleave(torch.arange(z.shape[0]), offsets.diff())[keep]
    return _csr_from_rows(rows, z.shape[0]), idx[keep], pre[keep], min_kept


def batch_topk_selection(z: Tensor, bias: Tensor, k: int, world: int = 1) -> sparse.BatchSelection:
    """`sparse.batch_topk(z, bias, k, world)` through the C kernel where it applies (one process,
    CPU, kernels available): 1 ms against 280 ms on one thread for k = 16 over a [4096, 1152]
    batch, whose k*B of 4.7M entries torch.topk and the ranking sorts select slowly. The kernel lists the positive entries of the
    selection only, those the PyTorch one lists with the rest (ReLU makes them 0, without
    gradient): the same reconstruction, gradients, L0, fired latents and smallest kept value."""
    if world > 1 or not kernels.supports(z) or not kernels.available():
        return sparse.batch_topk(z, bias, k, world)
    offsets, idx, pre, min_kept = _batch_topk_global(z, bias.contiguous(), k * z.shape[0], 1)
    rows = torch.repeat_interleave(torch.arange(z.shape[0]), offsets.diff(), output_size=idx.numel())
    return sparse.BatchSelection(offsets, idx, rows, pre, None, min_kept)


@dataclass
class SparseSpec:
    """Static arguments of `SparseSAEFunction`; forward fills in the selection (CSR)."""

    batch: bool  # BatchTopK (k*B over the batch) instead of TopK (k per token)
    k: int
    weights: tuple[Tensor, Tensor]  # W_enc, W_dec in the compute dtype (SAE.gemm_weights)
    dead: Tensor | None = None  # int64 ids of dead latents (ascending): AuxK on, else off
    aux_k: int = 0
    world: int = 1  # BatchTopK: ranks the selection spans (sparse.selection_world)
    offsets: Tensor | None = None  # [B+1]: token b owns entries offsets[b]:offsets[b+1]
    idx: Tensor | None = None  # [nnz] latent ids, ascending within a token
    min_kept: Tensor | None = None  # BatchTopK: smallest kept value over the (global) batch
    levels: Levels | None = None  # Matryoshka's nested prefixes; None: one reconstruction


@dataclass
class Levels:
    """Matryoshka's nested prefixes for `SparseSAEFunction`: prefix l holds the latents below
    starts[l] (the last prefix: all of them) and its reconstruction b_dec + its latents' decode
    must match the target; the loss is sum_l weights[l] * mse_l. Forward fills in `mses`."""

    starts: Tensor  # [L-1] int64 ascending: where levels 2..L begin
    weights: tuple[float, ...]  # [L], summing to 1
    mses: Tensor | None = None  # [L]: every prefix's MSE (the last: the full reconstruction's)


def _level_bags(offsets: Tensor, idx: Tensor, starts: Tensor) -> Tensor:
    """The CSR offsets [B*L+1] of the same entries in (token b, level l) bags, row b*L + l: ids
    ascend within a token, so each bag is a run of the token's entries."""
    B, L = offsets.numel() - 1, starts.numel() + 1
    rows = torch.repeat_interleave(torch.arange(B), offsets.diff(), output_size=idx.numel())
    return _csr_from_rows(rows * L + torch.bucketize(idx, starts, right=True), B * L)


def auxk_ratio(e_hat: Tensor, e: Tensor) -> Tensor:
    """||e_hat - e||^2 / ||e - mean(e)||^2 over the batch (0 when the residual does not vary)."""
    num = (e_hat - e).pow(2).sum()
    den = (e - e.mean(0)).pow(2).sum()
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), torch.zeros_like(num))


def _nested_decode(
    offsets: Tensor, idx: Tensor, vals: Tensor, Wd: Tensor, b_dec: Tensor, target: Tensor, levels: Levels
) -> tuple[Tensor, Tensor, Tensor, tuple[Tensor, Tensor]]:
    """Every prefix's reconstruction from one sparse decode: each (token, level) bag decoded on
    its own, then res[:, l] = b_dec + the bags' running sum - target. Returns (x_hat, the full
    reconstruction's per-token squared error, the weighted loss, what the backward needs)."""
    B, L = offsets.numel() - 1, len(levels.weights)
    bags = _level_bags(offsets, idx, levels.starts)
    res = kernels.csr_spmm(bags, idx, vals, Wd).view(B, L, -1)
    res[:, 0].add_(b_dec).sub_(target)
    for level in range(1, L):  # res[:, l] = x_hat_l - target (a loop: cumsum over 3 is 2x slower)
        res[:, level] += res[:, level - 1]
    sse = torch.linalg.vector_norm(res, dim=-1).square()  # [B, L]; one pass, ~4x faster than a sum of squares
    levels.mses = sse.mean(0)
    loss = levels.mses @ torch.tensor(levels.weights)
    return res[:, -1] + target, sse[:, -1], loss, (bags, res)


def _nested_backward(
    bags: Tensor, idx: Tensor, res: Tensor, g_xhat: Tensor | None, scale: float, levels: Levels, Wd: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The nested loss's gradients (scale = 2 dL/dloss / B): a latent in level l decodes into
    every prefix from l on, so its bag's gradient is G_l = sum_{j >= l} scale w_j res_j (+ x_hat's
    own gradient, x_hat being the last prefix's). Returns (<G[bag], W_dec[id]> per entry, G in
    W_dec's dtype [B*L, d_out], b_dec's gradient, the target's)."""
    B, L, D = res.shape
    G = res * torch.tensor([scale * w for w in levels.weights])[:, None]
    for level in range(L - 2, -1, -1):
        G[:, level] += G[:, level + 1]
    grad_target = -G[:, 0]
    if g_xhat is not None:
        G += g_xhat[:, None]
    gv, g, _ = kernels.decode_backward(bags, idx, G.view(B * L, D), None, None, 0.0, Wd)
    return gv, g, G[:, 0].sum(0), grad_target


class SparseSAEFunction(torch.autograd.Function):
    """TopK/BatchTopK encoder + selection + sparse decode + MSE (+ AuxK) in one autograd node,
    for an SAE and a transcoder alike.

    Inputs x [B, d_in] (data, no gradient), target [B, d_out] (what x_hat reconstructs: x for
    an SAE; a transcoder's target site, minus its skip term, which carries W_skip's gradient),
    centre [d_in] (subtracted from x before the encoder: b_dec for an SAE, zeros for a
    transcoder), W_enc, b_enc, W_dec, b_dec [d_out] (the output bias). An SAE passes b_dec as
    both centre and b_dec, and autograd sums the two gradients. Outputs x_hat ([B, d_out]
    fp32), mse = mean_tokens ||x_hat - target||^2, the AuxK ratio (0 without dead latents)
    and, non-differentiable, the selected values (after ReLU). Only the encoder GEMM is dense;
    the decode and every gradient touch the selected entries only (tables in compute_dtype,
    accumulation in fp32). With g the gradient of x_hat (the MSE's 2 (x_hat - target) / B
    folded in):
      dL/dvalue[b,i] = <g[b], W_dec[i]> * [value > 0]   (the ReLU)
      dL/dW_dec[i]   = sum_b value[b,i] * g[b]
      dL/dW_enc[:,i] = sum_b gv[b,i] * (x - centre)[b],  dL/db_enc = column sums of gv
      dL/db_dec      = sum_b g[b],  dL/dcentre = -W_enc @ dL/db_enc
      dL/dtarget     = -2 (x_hat - target) / B * dL/dmse   (AuxK's residual is a constant)
    AuxK runs densely on the dead columns only (aux_k ~ 10k would make a sparse decode cost
    more than these [B, n_dead] GEMMs) and adds its gradients in place to those rows/columns.
    With spec.levels (Matryoshka) the mse output is the weighted sum of every prefix's MSE
    (`_nested_decode`, `_nested_backward`); x_hat stays the full reconstruction.
    """

    @staticmethod
    def forward(ctx, x, target, centre, W_enc, b_enc, W_dec, b_dec, spec: SparseSpec):  # type: ignore[override]
        Wc, Wd = spec.weights
        cd = Wc.dtype
        target = target.contiguous()
        xc = kernels.center_cast(x.contiguous(), centre.detach(), cd)  # (x - centre).to(cd)
        z = xc @ Wc
        B = x.shape[0]
        if spec.batch:
            offsets, idx, pre, spec.min_kept = _batch_topk_global(z, b_enc, spec.k * B, spec.world)
        else:
            idx, pre = kernels.topk_rows(z, b_enc, spec.k)
            offsets, idx, pre = torch.arange(0, B * spec.k + 1, spec.k), idx.view(-1), pre.view(-1)
        # AuxK's pre-activations: the dead latents' columns of the encoder GEMM just done
        zd = None if spec.dead is None else z.index_select(1, spec.dead)  # [B, n_dead]
        del z
        vals = pre.clamp_min(0)  # NaN stays NaN
        ctx.resid = ctx.nested = None
        if spec.levels is not None:
            x_hat, row_sse, loss_mse, ctx.nested = _nested_decode(
                offsets, idx, vals, Wd, b_dec.detach(), target, spec.levels
            )
        elif any(ctx.needs_input_grad):
            # the residual-side work of the backward, while the decoder rows are in cache
            x_hat, row_sse, *ctx.resid = kernels.decode_train(offsets, idx, vals, Wd, b_dec.detach(), target)
        else:
            x_hat, row_sse = kernels.csr_decode(offsets, idx, vals, Wd, b_dec.detach(), target)
        if ctx.nested is None:
            loss_mse = row_sse.sum() / B
        spec.offsets, spec.idx = offsets, idx
        ctx.spec = spec
        ctx.aux = None
        auxk = x_hat.new_zeros(())
        if spec.dead is not None and zd is not None:
            dead = spec.dead
            if spec.aux_k >= dead.numel():  # every dead latent takes part: no selection
                a_idx, F = None, (zd.float() + b_enc[dead]).clamp_min_(0).to(cd)
            else:
                a_idx, a_pre = kernels.topk_rows(zd, b_enc[dead].contiguous(), spec.aux_k)
                F = torch.zeros(zd.shape, dtype=cd).scatter_(1, a_idx, a_pre.clamp_min(0).to(cd))
            Wd_dead = Wd[dead]
            # e = target - x_hat is the residual AuxK models (a constant: no gradient to x_hat);
            # sum_b ||e_b - mean(e)||^2 = sum_b ||e_b||^2 - B ||mean(e)||^2, and the decode
            # already produced ||e_b||^2 (row_sse): no pass over e needed
            # (the training decode summed x_hat - target over tokens already)
            e_mean = -ctx.resid[2] / B if ctx.resid is not None else target.mean(0) - x_hat.mean(0)
            den = float(row_sse.double().sum() - B * e_mean.double().pow(2).sum())
            diff, sq = kernels.auxk_residual((F @ Wd_dead).contiguous(), target, x_hat)  # e_hat - e, in cd
            if den > 0:
                auxk = x_hat.new_tensor(sq / den)
                ctx.aux = (F, Wd_dead, a_idx, diff, den)
        ctx.save_for_backward(target, x_hat, xc, W_enc, Wd, vals)
        ctx.mark_non_differentiable(vals)
        ctx.set_materialize_grads(False)
        return x_hat, loss_mse, auxk, vals

    @staticmethod
    @once_differentiable
    def backward(ctx, g_xhat, g_mse, g_aux, _g_vals):  # type: ignore[override]
        if g_xhat is None and g_mse is None and g_aux is None:
            return None, None, None, None, None, None, None, None
        target, x_hat, xc, W_enc, Wd, vals = ctx.saved_tensors
        spec: SparseSpec = ctx.spec
        scale = 0.0 if g_mse is None else 2.0 * float(g_mse) / target.shape[0]
        grad_target = None
        # Matryoshka's entries sit in (token, level) bags: crow then counts bags, not tokens
        row_offsets = spec.offsets if ctx.nested is None else ctx.nested[0]
        coff, crow, perm = kernels.csr_transpose(row_offsets, spec.idx, W_enc.shape[1])
        if ctx.nested is not None:
            bags, res = ctx.nested
            gv, g, g_colsum, grad_target = _nested_backward(bags, spec.idx, res, g_xhat, scale, spec.levels, Wd)
            grad_W_dec = kernels.csr_spmm(coff, crow, vals, g, perm=perm)
            crow = crow // res.shape[1]
            grad_target = grad_target if ctx.needs_input_grad[1] else None
        elif g_xhat is None and ctx.resid is not None:  # g = scale * res: scale what the forward prepared
            dots, res, res_colsum = ctx.resid
            gv, g_colsum = dots * scale, res_colsum * scale  # not in place: backward may run again
            grad_W_dec = kernels.csr_spmm(coff, crow, vals * scale, res, perm=perm)
        else:
            grad = None if g_xhat is None else g_xhat.contiguous()
            gv, g, g_colsum = kernels.decode_backward(spec.offsets, spec.idx, grad, x_hat, target, scale, Wd)
            grad_W_dec = kernels.csr_spmm(coff, crow, vals, g, perm=perm)
        gv.mul_(vals > 0)
        grad_b_enc = torch.empty(W_enc.shape[1])  # column sums of gv, from the same pass
        grad_W_enc = kernels.csr_spmm(coff, crow, gv, xc, perm=perm, transpose_out=True, val_sum=grad_b_enc)
        if ctx.aux is not None and g_aux is not None:
            F, Wd_dead, a_idx, diff, den = ctx.aux
            dead = spec.dead
            c = 2.0 * float(g_aux) / den  # the gradient of e_hat is c * diff; c is applied after the GEMMs
            g_all = diff @ Wd_dead.t()  # [B, n_dead]
            if a_idx is None:  # every dead latent took part
                g_z = g_all.float().mul_(c).mul_(F > 0)
                G = g_z.to(F.dtype)
                g_b = g_z.sum(0)  # [n_dead]
            else:
                g_z = g_all.gather(1, a_idx).float().mul_(c) * (F.gather(1, a_idx) > 0)
                G = torch.zeros(F.shape, dtype=F.dtype).scatter_(1, a_idx, g_z.to(F.dtype))
                g_b = torch.zeros(dead.numel()).index_add_(0, a_idx.view(-1), g_z.view(-1))
            grad_b_enc.index_add_(0, dead, g_b)
            grad_W_dec.index_add_(0, dead, (F.t() @ diff).float().mul_(c))
            grad_W_enc.index_add_(1, dead, (G.t() @ xc).float().t())
        grad_centre = -kernels.gemv(W_enc.detach(), grad_b_enc) if ctx.needs_input_grad[2] else None
        if ctx.nested is None and ctx.needs_input_grad[1]:
            grad_target = (target - x_hat).mul_(scale)
        return None, grad_target, grad_centre, grad_W_enc, grad_b_enc, grad_W_dec, g_colsum, None


@dataclass
class DenseSpec:
    """Static arguments of `DenseSAEFunction`."""

    weights: tuple[Tensor, Tensor]  # W_enc, W_dec in the compute dtype (SAE.gemm_weights)
    jumprelu_bandwidth: float = 0.0  # > 0: JumpReLU (threshold given), else ReLU


class DenseSAEFunction(torch.autograd.Function):
    """ReLU/JumpReLU SAE: encoder GEMM, fused activation pass, decoder GEMM in one node.

    Inputs x (data), b_dec, W_enc, b_enc, W_dec, colw (ReLU: per-latent L1 weights, e.g.
    decoder norms, or None), threshold (JumpReLU, else None). Outputs dec = f @ W_dec (fp32,
    without b_dec) and a per-token sparsity statistic (ReLU: sum_i colw_i f_i; JumpReLU: the
    L0 count, whose gradient reaches only the threshold, through the rectangle-kernel
    pseudo-derivative), plus non-differentiable f, per-token L0 and per-latent fire counts.

    Backward is GEMM + one fused pass + two GEMMs: g_f = g_dec @ W_dec^T, then in place
    g_z = (g_f + row_g * colw) * f'(z) with the column sums (b_enc grad) and, for JumpReLU,
    the window sums for the threshold, then W_dec and W_enc grads. The gradient buffers are
    created here, so the in-place pass never touches a tensor autograd shares.
    """

    @staticmethod
    def forward(ctx, x, b_dec, W_enc, b_enc, W_dec, colw, threshold, spec: DenseSpec):  # type: ignore[override]
        Wc, Wd = spec.weights
        xc = kernels.center_cast(x.contiguous(), b_dec.detach(), Wc.dtype)  # (x - b_dec).to(compute dtype)
        z = xc @ Wc
        jump = spec.jumprelu_bandwidth > 0
        f = torch.empty_like(z) if jump else z  # JumpReLU keeps z: the threshold grad needs it
        row_sum, row_cnt, col_cnt = kernels.act_fwd(z, f, b_enc, threshold if jump else None, colw, row_sums=not jump)
        dec = (f @ Wd).float()
        ctx.spec = spec
        ctx.save_for_backward(xc, f, z if jump else None, W_enc, b_enc, Wd, colw, threshold)
        ctx.mark_non_differentiable(f, row_cnt, col_cnt)
        ctx.set_materialize_grads(False)
        return dec, (row_cnt.clone() if jump else row_sum), f, row_cnt, col_cnt

    @staticmethod
    @once_differentiable
    def backward(ctx, g_dec, g_row, *_):  # type: ignore[override]
        xc, f, z, W_enc, b_enc, Wd, colw, threshold = ctx.saved_tensors
        spec: DenseSpec = ctx.spec
        if g_dec is None:
            g_dec = torch.zeros(f.shape[0], Wd.shape[1])
        gc = g_dec.to(Wd.dtype).contiguous()
        g = gc @ Wd.t()
        row_g = None if g_row is None else g_row.float().contiguous()
        grad_colw = grad_thr = None
        if spec.jumprelu_bandwidth > 0:
            eps = spec.jumprelu_bandwidth
            col_g, _, win_g, win_r = kernels.act_bwd(g, z, b_enc, thr=threshold, eps=eps, row_g=row_g)
            grad_thr = -(threshold / eps) * win_g
            if win_r is not None:
                grad_thr = grad_thr - win_r / eps
        else:
            want = colw is not None and ctx.needs_input_grad[5]
            col_g, grad_colw, _, _ = kernels.act_bwd(g, f, b_enc, row_g=row_g, colw=colw, want_colw_grad=want)
        grad_W_dec = (f.t() @ gc).float()
        grad_W_enc = (xc.t() @ g).float()
        grad_b_dec = -(W_enc @ col_g)
        return None, grad_b_dec, grad_W_enc, col_g, grad_W_dec, grad_colw, grad_thr, None
