"""Matryoshka BatchTopK SAE (Bussmann, Nabeshima, Karvonen & Nanda 2025): BatchTopK whose
nested prefixes of latents each reconstruct the input on their own.

With prefix widths m_1 < ... < m_L = d_sae (cfg.matryoshka_prefixes) and weights w_l summing
to 1 (cfg.matryoshka_weights), the batch's BatchTopK selection f gives

    x_hat_l = f[:, :m_l] @ W_dec[:m_l] + b_dec     (b_dec in every prefix)
    loss    = sum_l w_l * mse(x_hat_l, x) + aux_coefficient * auxk

so the first latents must carry the most of the input alone: general features gather in the
small prefixes and the wide ones add detail (less feature absorption). The latents keep their
index order: the nesting is what orders them, nothing is permuted or sorted. This is the loss
of dictionary_learning's MatryoshkaBatchTopK (b_dec at every level, equal weights 1/L by
default, AuxK on the full reconstruction's residual; it then averages the weighted terms, a
further 1/L) and of SAELens's matryoshka_batchtopk with use_matryoshka_aux_loss off (it sums
the levels unweighted: L times ours). Weights summing to 1 keep aux_coefficient meaning what it
means for BatchTopK. "mse" stays the full reconstruction's, the one FVU and eval measure;
"nested_mse" is the weighted sum and "mse_<m>" each inner prefix's.

The prefix decodes cost one sparse decode, not L dense ones: the selection lists each token's
latents in ascending order, so a token's entries below m_1, then in [m_1, m_2), ... are
consecutive runs; one embedding bag sums each run (token b, level l) into D[b, l] and the
prefix reconstructions are b_dec + cumsum_l D[b, l]. The encoder is BatchTopK's; on CPU
(`_SparseEncoder`) the compiled kernels select and take the encoder's gradient from the
selected entries only; the decode is PyTorch on both paths. Inference, the learned threshold
and the SAELens export (as JumpReLU) are BatchTopK's: the nesting only shapes training.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from sae_train.sae import kernels
from sae_train.sae.base import SAEOutput, SparseLatents
from sae_train.sae.batchtopk import BatchTopKSAE
from sae_train.sae.config import SAEConfig, config_error
from sae_train.sae.ops import batch_topk_kernel


def prefix_widths(prefixes: Sequence[float], d_sae: int) -> list[int]:
    """The prefix widths in latents: fractions of d_sae when every entry is <= 1 (rounded to
    the nearest latent), else widths in latents."""
    if max(prefixes) <= 1:
        return [round(p * d_sae) for p in prefixes]
    return [int(p) for p in prefixes]


class MatryoshkaSAE(BatchTopKSAE):
    architecture = "matryoshka"
    config_fields = BatchTopKSAE.config_fields | {"matryoshka_prefixes", "matryoshka_weights"}
    # inherited step_gemms ("encoder"): the decode and every gradient are sparse on the fast path
    saelens_architecture, saelens_training_architecture = "jumprelu", "matryoshka_batchtopk"

    def __init__(self, cfg: SAEConfig, *, compute_dtype: torch.dtype = torch.float32) -> None:
        super().__init__(cfg, compute_dtype=compute_dtype)
        self.widths = prefix_widths(cfg.matryoshka_prefixes, cfg.d_sae)
        weights = cfg.matryoshka_weights or [1.0] * len(self.widths)
        self.level_weights = [w / sum(weights) for w in weights]  # Python floats: no host-device copy
        # where levels 2..L start (not state: it follows from the config)
        self.register_buffer("level_starts", torch.tensor(self.widths[:-1], dtype=torch.int64), persistent=False)

    @classmethod
    def check_config(cls, cfg: SAEConfig) -> None:
        super().check_config(cfg)
        prefixes, weights = cfg.matryoshka_prefixes, cfg.matryoshka_weights
        example = "e.g. sae.matryoshka_prefixes=[0.0625,0.25,1.0] (fractions of d_sae) or [288,1152,4608] (widths)"
        if (not isinstance(prefixes, Sequence) or not prefixes
                or not all(isinstance(p, (int, float)) and math.isfinite(p) and p > 0 for p in prefixes)):
            raise config_error(cfg, "matryoshka_prefixes", "a non-empty list of numbers > 0", f"Set it, {example}.")
        if max(prefixes) > 1 and any(p != int(p) for p in prefixes):
            raise config_error(cfg, "matryoshka_prefixes", "all fractions of d_sae (<= 1) or all widths in latents "
                               "(integers)", f"Do not mix the two, {example}.")
        if (not isinstance(weights, Sequence)
                or not all(isinstance(w, (int, float)) and math.isfinite(w) and w >= 0 for w in weights)
                or (weights and (len(weights) != len(prefixes) or not sum(weights) > 0))):
            raise config_error(cfg, "matryoshka_weights",
                               f"[] (equal weights) or {len(prefixes)} numbers >= 0 (one per prefix), not all 0",
                               "Give one weight per entry of sae.matryoshka_prefixes, or [] for equal weights.")
        if not cfg.d_in and not cfg.d_sae:
            return  # widths are checked once d_sae is known (`resolved`)
        d_sae = cfg.d_sae or cfg.expansion_factor * cfg.d_in
        widths = prefix_widths(prefixes, d_sae)
        if widths[0] < 1 or any(a >= b for a, b in pairwise(widths)) or widths[-1] != d_sae:
            raise config_error(cfg, "matryoshka_prefixes",
                               f"strictly increasing widths ending at d_sae = {d_sae} (they are {widths})",
                               f"Make every prefix wider than the one before and the last 1.0 (or {d_sae}), {example}.")

    # ------------------------------------------------------------------ forward

    def _forward_torch(self, x: Tensor, dead_mask: Tensor | None, sparsity_scale: float) -> SAEOutput:
        z = self._preact(x)
        offsets, idx = self._select_torch(z.detach())
        rows = torch.repeat_interleave(torch.arange(x.shape[0], device=x.device), offsets.diff())
        return self._nested(x, dead_mask, torch.relu(z[rows, idx]), offsets, idx)

    def _forward_fast(self, x: Tensor, dead_mask: Tensor | None, sparsity_scale: float) -> SAEOutput:
        vals, offsets, idx = _SparseEncoder.apply(x, self.b_dec, self.W_enc, self.b_enc,
                                                  self.cfg.k * x.shape[0], self.gemm_weight("W_enc"))
        return self._nested(x, dead_mask, vals, offsets, idx)

    def _nested(self, x: Tensor, dead_mask: Tensor | None, vals: Tensor, offsets: Tensor, idx: Tensor) -> SAEOutput:
        """Every prefix's reconstruction and the losses from the selection (CSR, values with autograd)."""
        B, L = x.shape[0], len(self.widths)
        rows = torch.repeat_interleave(torch.arange(B, device=x.device), offsets.diff())
        # bag (token b, level l) = the run of b's entries with level_starts[l-1] <= id < level_starts[l]
        bags = rows * L + torch.bucketize(idx, self.level_starts, right=True)
        sizes = torch.bincount(bags, minlength=B * L)
        # values stay fp32, weights are rounded to the GEMM dtype (as TopK's decode)
        W_dec = self.W_dec.to(self._gemm_dtype).to(vals.dtype)
        parts = F.embedding_bag(idx, W_dec, sizes.cumsum(0) - sizes, mode="sum", per_sample_weights=vals)
        x_hats = parts.view(B, L, -1).cumsum(1) + self.b_dec  # [B, L, d_in]: every prefix's reconstruction
        mses = (x_hats - x[:, None]).pow(2).sum(-1).mean(0)  # [L]
        x_hat = x_hats[:, -1]
        auxk = self._auxk_torch(x, x_hat, self._dead_ids(dead_mask))
        out = self._output(x, x_hat, mses[-1], auxk, SparseLatents(vals.detach(), idx, offsets, self.cfg.d_sae))
        nested = sum(w * mse for w, mse in zip(self.level_weights, mses.unbind()))
        out.losses = {"loss": nested + self.cfg.aux_coefficient * auxk, "mse": mses[-1], "nested_mse": nested,
                      "auxk": auxk, **{f"mse_{m}": mses[i] for i, m in enumerate(self.widths[:-1])}}
        return out


class _SparseEncoder(torch.autograd.Function):
    """The fast CPU encoder: GEMM, BatchTopK selection (compiled kernel) and ReLU, returning the
    selected values [nnz] with the CSR (offsets [B+1], ascending latent ids [nnz]); the same
    tensors as the PyTorch twin. Its backward touches the selected entries only (CSR kernels,
    as `SparseSAEFunction`'s): dL/dW_enc[:, i] = sum_b gv[b, i] (x - b_dec)[b], dL/db_enc its
    column sums, dL/db_dec = -W_enc @ dL/db_enc, with gv the values' gradient through the ReLU.
    """

    @staticmethod
    def forward(ctx, x, b_dec, W_enc, b_enc, n_keep: int, W_gemm: Tensor):  # type: ignore[override]
        xc = kernels.center_cast(x.contiguous(), b_dec.detach(), W_gemm.dtype)  # (x - b_dec) in the GEMM dtype
        offsets, idx, pre = batch_topk_kernel(xc @ W_gemm, b_enc.detach(), n_keep)
        vals = pre.clamp_min(0)
        ctx.csr = offsets, idx
        ctx.save_for_backward(xc, W_enc, vals)
        ctx.mark_non_differentiable(offsets, idx)
        return vals, offsets, idx

    @staticmethod
    @once_differentiable
    def backward(ctx, g_vals, *_):  # type: ignore[override]
        xc, W_enc, vals = ctx.saved_tensors
        offsets, idx = ctx.csr
        gv = (g_vals * (vals > 0)).float().contiguous()
        coff, crow, perm = kernels.csr_transpose(offsets, idx, W_enc.shape[1])
        grad_b_enc = torch.empty(W_enc.shape[1])
        grad_W_enc = kernels.csr_spmm(coff, crow, gv, xc, perm=perm, transpose_out=True, val_sum=grad_b_enc)
        grad_b_dec = -kernels.gemv(W_enc.detach(), grad_b_enc)
        return None, grad_b_dec, grad_W_enc, grad_b_enc, None, None
