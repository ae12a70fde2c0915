"""TopK SAE (Gao et al. 2024): exactly k latents per token — the k largest pre-activations,
then ReLU — plus the AuxK loss that revives dead latents.

Decoder rows stay unit-norm during training. That is what makes `fold` exact: folding the
decoder norms n_i into the encoder multiplies pre-activation i by n_i, and only a uniform
factor (all n_i = 1, then the normalisation scale) leaves the per-token ranking unchanged.

AuxK (OpenAI; as in sparsify): when the trainer marks dead latents, the top
min(aux_k, n_dead) pre-activations among them (ReLU'd) reconstruct the detached residual
e = x - x_hat, auxk = ||e_hat - e||^2 / ||e - mean(e)||^2 over the batch. It is computed
densely on the dead columns only ((x - b_dec) @ W_enc[:, dead], then [B, n_dead] @
W_dec[dead]): aux_k is ~10x k, so a sparse decode of it would cost more than these GEMMs.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from sae_train.sae import kernels
from sae_train.sae.base import SAE, SAEOutput, SparseLatents
from sae_train.sae.config import SAEConfig, config_error
from sae_train.sae.ops import SparseSAEFunction, SparseSpec, auxk_ratio, topk_rows_torch


class TopKSAE(SAE):
    architecture = "topk"
    config_fields = frozenset({"k", "aux_k", "aux_coefficient"})
    revival = "auxk"
    step_gemms = ("encoder",)  # decode and backward are sparse
    saelens_architecture = saelens_training_architecture = "topk"
    batch_selection: ClassVar[bool] = False  # k*B over the batch (BatchTopK) instead of k per token

    @classmethod
    def check_config(cls, cfg: SAEConfig) -> None:
        if not isinstance(cfg.k, int) or cfg.k <= 0:
            raise config_error(cfg, "k", "a positive integer", "Set sae.k to the number of active latents per token, e.g. 32.")
        d_sae = cfg.d_sae or cfg.expansion_factor * cfg.d_in
        if cfg.d_in and cfg.k > d_sae:
            raise config_error(cfg, "k", f"at most d_sae = {d_sae}", "Lower sae.k or raise sae.d_sae / sae.expansion_factor.")

    # ------------------------------------------------------------------ selection (torch twin)

    def _select_torch(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """(offsets [B+1], latent ids [nnz]) of the training selection on pre-activations z."""
        B, k = z.shape[0], self.cfg.k
        idx, _ = topk_rows_torch(z, k)
        return torch.arange(0, B * k + 1, k, device=z.device), idx.view(-1)

    def _activation(self, z: Tensor) -> Tensor:
        k = self.cfg.k
        if kernels.supports(z) and not (torch.is_grad_enabled() and z.requires_grad) and kernels.available():
            idx, val = kernels.topk_rows(z.contiguous(), torch.zeros(z.shape[1]), k)
        else:
            idx, val = topk_rows_torch(z, k)
        return torch.zeros_like(z).scatter(1, idx, val.relu())

    def _dead_ids(self, dead_mask: Tensor | None) -> Tensor | None:
        dead = None if dead_mask is None else dead_mask.nonzero().squeeze(1)
        return dead if dead is not None and dead.numel() else None

    def _auxk_torch(self, x: Tensor, target: Tensor, x_hat: Tensor, dead: Tensor | None) -> Tensor:
        """The AuxK loss term (unweighted) by plain autograd; 0 without dead latents."""
        if dead is None:
            return x_hat.new_zeros(())
        z = self._matmul(self._encoder_input(x), self.W_enc[:, dead]) + self.b_enc[dead]  # [B, n_dead]
        idx, _ = topk_rows_torch(z.detach(), min(self.cfg.aux_k, dead.numel()))
        f = torch.zeros_like(z).scatter(1, idx, torch.relu(z.gather(1, idx)))
        return auxk_ratio(self._matmul(f, self.W_dec[dead]), (target - x_hat).detach())

    # ------------------------------------------------------------------ forward

    def _output(self, x: Tensor, x_hat: Tensor, mse: Tensor, auxk: Tensor, latents: SparseLatents) -> SAEOutput:
        loss = mse + self.cfg.aux_coefficient * auxk
        active = (latents.values != 0).float()
        counts = torch.zeros(self.cfg.d_sae, device=x.device).index_add_(0, latents.indices, active)
        l0 = active.sum() / x.shape[0]
        return SAEOutput(x_hat, {"loss": loss, "mse": mse, "auxk": auxk}, l0, counts > 0, latents)

    def _forward_torch(self, x: Tensor, target: Tensor, dead_mask: Tensor | None, sparsity_scale: float) -> SAEOutput:
        z = self._preact(x)
        B = x.shape[0]
        offsets, idx = self._select_torch(z.detach())
        rows = torch.repeat_interleave(torch.arange(B, device=x.device), offsets.diff())
        vals = torch.relu(z[rows, idx])
        f = torch.zeros_like(z).index_put((rows, idx), vals)
        # values stay fp32, weights are rounded to the GEMM dtype: what the sparse decode does
        x_hat = f @ self.W_dec.to(self._gemm_dtype).to(f.dtype) + self.b_dec
        auxk = self._auxk_torch(x, target, x_hat, self._dead_ids(dead_mask))
        latents = SparseLatents(vals.detach(), idx, offsets, self.cfg.d_sae)
        return self._output(x, x_hat, self._mse(x_hat, target), auxk, latents)

    def _forward_fast(self, x: Tensor, target: Tensor, dead_mask: Tensor | None, sparsity_scale: float) -> SAEOutput:
        dead = self._dead_ids(dead_mask)
        aux_k = 0 if dead is None else min(self.cfg.aux_k, dead.numel())
        spec = SparseSpec(self.batch_selection, self.cfg.k, self.gemm_weights(), dead, aux_k)
        x_hat, mse, auxk, vals = SparseSAEFunction.apply(x, self.b_dec, self.W_enc, self.b_enc, self.W_dec, spec)
        return self._output(x, x_hat, mse, auxk, SparseLatents(vals, spec.idx, spec.offsets, self.cfg.d_sae))
