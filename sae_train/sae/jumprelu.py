"""JumpReLU SAE (Rajamanoharan et al. 2024, "Jumping Ahead"; Gemma Scope).

f_i = z_i * H(z_i - theta_i) with a learned threshold theta > 0 per latent, and an L0 penalty
lambda * mean_tokens sum_i H(z_i - theta_i). H has no useful derivative, so theta gets the
paper's straight-through pseudo-derivatives with a rectangle kernel K(u) = 1[|u| < 1/2] of
bandwidth eps:
    d f_i / d theta_i   = -(theta_i / eps) K((z_i - theta_i) / eps)
    d H_i / d theta_i   = -(1 / eps) K((z_i - theta_i) / eps)
    d f_i / d z_i       = H(z_i - theta_i)        (the L0 term passes no gradient to z)
theta is a plain parameter (as in dictionary_learning: a log-parametrisation moves it by a
relative lr per step, too slowly for short runs) kept >= 0 by constrain_. Decoder rows are
unit-norm like the paper's.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sae_train.sae.base import SAE, SAEOutput
from sae_train.sae.config import SAEConfig
from sae_train.sae.ops import DenseSAEFunction, DenseSpec


def _rectangle(u: Tensor) -> Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class JumpReLUFunction(torch.autograd.Function):
    """z * H(z - theta); gradient to z: H, to theta: the rectangle pseudo-derivative."""

    @staticmethod
    def forward(ctx, z: Tensor, theta: Tensor, eps: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return z * (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        z, theta = ctx.saved_tensors
        grad_theta = (-(theta / ctx.eps) * _rectangle((z - theta) / ctx.eps) * g).sum(0)
        return (z > theta).to(g.dtype) * g, grad_theta, None


class StepFunction(torch.autograd.Function):
    """H(z - theta); no gradient to z, the rectangle pseudo-derivative to theta."""

    @staticmethod
    def forward(ctx, z: Tensor, theta: Tensor, eps: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        z, theta = ctx.saved_tensors
        grad_theta = (-(1.0 / ctx.eps) * _rectangle((z - theta) / ctx.eps) * g).sum(0)
        return None, grad_theta, None


class JumpReLUSAE(SAE):
    architecture = "jumprelu"
    config_fields = frozenset({"l0_coefficient", "jumprelu_bandwidth", "jumprelu_init_threshold"})
    # resampling measurably hurt: re-opened latents close again and disturb the rest
    revival = "none"
    base_lr = 1.1e-3  # 5.5x Gao et al.'s: the thresholds close latents for good at higher rates
    inference_tensors = (*SAE.inference_tensors, "threshold")
    latent_axes = {**SAE.latent_axes, "threshold": 0}
    saelens_architecture = saelens_training_architecture = "jumprelu"
    fused_transcoders = True

    def __init__(self, cfg: SAEConfig, *, compute_dtype: torch.dtype = torch.float32) -> None:
        super().__init__(cfg, compute_dtype=compute_dtype)
        self.threshold = nn.Parameter(torch.full((cfg.d_sae,), float(cfg.jumprelu_init_threshold)))

    def _activation(self, z: Tensor) -> Tensor:
        return z * (z > self.threshold).to(z.dtype)

    def _fold_extra(self, latent_scale: Tensor) -> None:
        self.threshold.mul_(latent_scale)

    @torch.no_grad()
    def constrain_extra_(self) -> None:
        self.threshold.clamp_(min=0.0)  # a negative threshold would let negative z through

    def _output(
        self, x: Tensor, x_hat: Tensor, l0: Tensor, f: Tensor, n_active: Tensor, fired: Tensor, scale: float
    ) -> SAEOutput:
        mse = self._mse(x_hat, x)
        loss = mse + self.cfg.l0_coefficient * scale * l0
        return SAEOutput(x_hat, {"loss": loss, "mse": mse, "l0": l0}, n_active.detach(), fired, f.detach())

    def _forward_torch(self, x: Tensor, target: Tensor, dead_mask: Tensor | None, sparsity_scale: float) -> SAEOutput:
        z = self._preact(x)
        eps = self.cfg.jumprelu_bandwidth
        f = JumpReLUFunction.apply(z, self.threshold, eps).to(self._gemm_dtype)
        x_hat, l0 = self._decoded(self._matmul(f, self.W_dec), StepFunction.apply(z, self.threshold, eps).sum(-1))
        assert l0 is not None
        l0 = l0.mean()
        active = f != 0
        return self._output(target, x_hat, l0, f, active.sum(-1).float().mean(), active.any(0), sparsity_scale)

    def _forward_fast(self, x: Tensor, target: Tensor, dead_mask: Tensor | None, sparsity_scale: float) -> SAEOutput:
        spec = DenseSpec(self.gemm_weights(), jumprelu_bandwidth=self.cfg.jumprelu_bandwidth)
        dec, row_l0, f, n_active, col_fired = DenseSAEFunction.apply(
            x, self._encoder_centre(), self.W_enc, self.b_enc, self.W_dec, None, self.threshold, spec
        )
        x_hat = dec + self.b_dec
        return self._output(target, x_hat, row_l0.mean(), f, n_active.mean(), col_fired > 0, sparsity_scale)
