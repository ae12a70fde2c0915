"""ReLU SAE with an L1 penalty: f = relu((x - b_dec) @ W_enc + b_enc).

sparsity="l1": loss = mse + lambda * mean_tokens sum_i f_i, decoder rows held at unit norm
(otherwise the L1 term is gamed by shrinking f and growing W_dec).
sparsity="l1_decnorm" (Anthropic, April 2024): loss = mse + lambda * mean_tokens sum_i f_i *
||W_dec[i]||, which is invariant to that rescaling, so decoder norms stay free.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sae_train.sae.base import SAE, SAEOutput
from sae_train.sae.ops import DenseSAEFunction, DenseSpec


class ReLUSAE(SAE):
    architecture = "relu"
    config_fields = frozenset({"sparsity", "l1_coefficient", "decoder_init_norm"})
    # AuxK needs a fixed number of active latents to model the residual with; ReLU SAEs
    # re-point dead latents at badly reconstructed inputs instead (Anthropic 2023)
    revival = "resample"
    saelens_architecture = saelens_training_architecture = "standard"
    fused_transcoders = True

    @property
    def unit_norm_decoder(self) -> bool:
        return self.cfg.sparsity == "l1"

    def _decoder_init_norm(self) -> float:
        return 1.0 if self.unit_norm_decoder else self.cfg.decoder_init_norm

    def _l1_weights(self) -> Tensor | None:
        return self.W_dec.norm(dim=1) if self.cfg.sparsity == "l1_decnorm" else None

    def _activation(self, z: Tensor) -> Tensor:
        return torch.relu(z)

    def _output(
        self, x: Tensor, x_hat: Tensor, l1: Tensor, f: Tensor, l0: Tensor, fired: Tensor, scale: float
    ) -> SAEOutput:
        mse = self._mse(x_hat, x)
        loss = mse + self.cfg.l1_coefficient * scale * l1
        return SAEOutput(x_hat, {"loss": loss, "mse": mse, "l1": l1}, l0.detach(), fired, f.detach())

    def _forward_torch(self, x: Tensor, target: Tensor, dead_mask: Tensor | None, sparsity_scale: float) -> SAEOutput:
        f = torch.relu(self._preact(x)).to(self._gemm_dtype)  # the latents the decoder sees
        fa = f.to(self._acc_dtype)
        w = self._l1_weights()
        x_hat, l1 = self._decoded(self._matmul(f, self.W_dec), (fa if w is None else fa * w).sum(-1))
        assert l1 is not None
        l1 = l1.mean()
        active = fa != 0
        return self._output(target, x_hat, l1, f, active.sum(-1).float().mean(), active.any(0), sparsity_scale)

    def _forward_fast(self, x: Tensor, target: Tensor, dead_mask: Tensor | None, sparsity_scale: float) -> SAEOutput:
        spec = DenseSpec(self.gemm_weights())
        dec, row_l1, f, row_l0, col_fired = DenseSAEFunction.apply(
            x, self._encoder_centre(), self.W_enc, self.b_enc, self.W_dec, self._l1_weights(), None, spec
        )
        x_hat = dec + self.b_dec
        return self._output(target, x_hat, row_l1.mean(), f, row_l0.mean(), col_fired > 0, sparsity_scale)
