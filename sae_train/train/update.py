"""The optimizer step of one SAE: decoder-gradient projection, gradient clipping, Adam and the
unit-norm decoder constraint.

Two implementations, pinned together by tests/test_train.py:
- `reference_update`, the obvious sequence: `sae.project_grads_()`, `clip_grad_norm_`,
  `optimizer.step()`, `sae.constrain_()`. Each of those reads or writes all of W_enc/W_dec,
  their gradients and Adam moments: ~30 passes over W-sized tensors, about a sixth of a TopK
  step at the reference size on CPU;
- `fused_update` (CPU, compiled kernels, plain Adam): two passes (sae_kernels.c). Pass 1 reads
  the gradients once for the clip norm of the projected gradient (and the per-row projection
  coefficients). Pass 2 runs Adam row by row on clip * (projected gradient), computed on the
  fly (the gradient itself is not rewritten); the decoder rows are renormalised while they are
  in cache, and bf16 copies of W_enc/W_dec are written on the way for the next forward's GEMMs
  (`SAE.gemm_weight`), which saves that forward two casts.

On CUDA the step is `reference_update` (torch's fused CUDA Adam), followed, for bf16 GEMMs, by
one cast of W_enc/W_dec to bf16 that every GEMM of the next step shares through
`SAE.gemm_weight`.

Adam's state stays in the torch optimizer (`exp_avg`, `exp_avg_sq`, `step`, initialised as
torch does), so checkpoints and resume are unchanged, and pass 2 computes what torch's fused
CPU Adam computes, in the same order. The clip norm is summed in another order than
`clip_grad_norm_`'s, so the two paths agree to rounding, not bit for bit.
"""

from __future__ import annotations

import math
from typing import cast

import torch

from sae_train.sae import SAE, kernels


def reference_update(sae: SAE, optimizer: torch.optim.Optimizer, grad_clip: float) -> None:
    """One optimizer step the plain way (any device, optimizer and dtype)."""
    sae.project_grads_()
    if grad_clip > 0:
        if sae.shard is None:
            torch.nn.utils.clip_grad_norm_([p for p in sae.parameters() if p.requires_grad], grad_clip)
        else:  # a latent shard: the whole SAE's norm (sae/shard.py)
            params = {n: p for n, p in sae.named_parameters() if p.requires_grad and p.grad is not None}
            squares = {n: torch.linalg.vector_norm(p.grad).square() for n, p in params.items()}
            norm = sae.shard.norm_sq(squares, sae.latent_axes).sqrt().to(torch.float32)
            torch.nn.utils.clip_grads_with_norm_(list(params.values()), grad_clip, norm)
    optimizer.step()
    sae.constrain_()


def fused_supported(sae: SAE, optimizer: torch.optim.Optimizer) -> bool:
    """Whether `fused_update` applies: CPU fp32 parameters that all have gradients, compiled
    kernels, and torch's Adam without the options pass 2 does not implement."""
    if type(optimizer) is not torch.optim.Adam or any(p.device.type != "cpu" for p in sae.parameters()):
        return False
    if not kernels.available():  # after the device check: a GPU node never builds the CPU kernels
        return False
    for group in optimizer.param_groups:
        if (
            group["amsgrad"]
            or group["maximize"]
            or group["weight_decay"] != 0
            or group["differentiable"]
            or group["capturable"]
            or group.get("decoupled_weight_decay", False)
            or torch.is_tensor(group["lr"])
            or any(torch.is_tensor(b) for b in group["betas"])
        ):
            return False
        for p in group["params"]:
            if p.device.type != "cpu" or p.dtype != torch.float32 or not p.is_contiguous():
                return False
            if p.grad is None or p.grad.dtype != torch.float32 or not p.grad.is_contiguous() or p.grad.is_sparse:
                return False
    return True


def _adam_state(optimizer: torch.optim.Adam, group: dict, p: torch.nn.Parameter) -> dict:
    """The optimizer's state of p, initialised as `torch.optim.Adam` does on its first step."""
    state = optimizer.state[p]
    if not state:
        fused = group["fused"] or group["capturable"]
        state["step"] = (
            torch.zeros((), dtype=torch.float32)
            if fused
            else torch.tensor(0.0, dtype=torch.optim.optimizer._get_scalar_dtype())
        )
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return state


@torch.no_grad()
def fused_update(sae: SAE, optimizer: torch.optim.Adam, grad_clip: float) -> None:
    """`reference_update` in two passes over the weights (see the module docstring); only
    where `fused_supported`. The gradients are left as they are (unprojected, unclipped)."""
    project = sae.unit_norm_decoder  # W_dec.grad exists (fused_supported)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    # pass 1: projection coefficients and the squared norm of the gradient Adam will see
    coefs: dict[int, torch.Tensor] = {}
    squares: dict[str, float] = {}
    names = {id(p): n for n, p in sae.named_parameters()}
    for p in reversed(params):  # pass 2 starts where pass 1 ends: those tensors may still be cached
        on_rows = project and p is sae.W_dec
        if grad_clip > 0 or on_rows:
            sq, coef = kernels.rows_sqnorm(p.grad, p.detach() if on_rows else None)
            squares[names[id(p)]] = sq
            if coef is not None:
                coefs[id(p)] = coef
    total = sum(squares.values())
    if sae.shard is not None and grad_clip > 0:  # a latent shard: the whole SAE's norm (sae/shard.py)
        total = float(sae.shard.norm_sq({n: torch.tensor(v) for n, v in squares.items()}, sae.latent_axes))
    # clip_grad_norm_'s coefficient, clamped at 1 (NaN when the norm is not finite, as there)
    clip = min(grad_clip / (math.sqrt(total) + 1e-6), 1.0) if grad_clip > 0 else 1.0
    # pass 2: Adam (+ decoder renormalisation, + bf16 copies for the next forward's GEMMs)
    bf16_copies = sae.compute_dtype == torch.bfloat16
    shadowed = {id(getattr(sae, n)): n for n in sae.gemm_weight_names}
    for group in optimizer.param_groups:
        beta1, beta2 = group["betas"]
        for p in group["params"]:
            state = _adam_state(optimizer, group, p)
            state["step"] += 1
            name = shadowed.get(id(p))
            shadow = torch.empty_like(p, dtype=torch.bfloat16) if name and bf16_copies else None
            kernels.adam_rows(
                p.detach(), p.grad, state["exp_avg"], state["exp_avg_sq"], step=float(state["step"]),
                lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], clip=clip, coef=coefs.get(id(p)),
                normalize=project and p is sae.W_dec, shadow=shadow,
            )  # fmt: skip
            torch.autograd.graph.increment_version(p)  # written through a raw pointer: tell autograd and caches
            if name and shadow is not None:
                sae.set_gemm_weight(name, shadow)
    sae.constrain_extra_()


@torch.no_grad()
def write_gemm_copies(sae: SAE) -> None:
    """CUDA, bf16 GEMMs: cast W_enc/W_dec once after the step, for every GEMM of the next step
    to share (`SAE.gemm_weight`); the caching allocator hands back last step's blocks."""
    if sae.W_enc.device.type == "cuda" and sae.compute_dtype == torch.bfloat16 and sae.W_enc.dtype == torch.float32:
        for name in sae.gemm_weight_names:
            sae.set_gemm_weight(name, getattr(sae, name).detach().to(torch.bfloat16))


def update(sae: SAE, optimizer: torch.optim.Optimizer, grad_clip: float) -> None:
    """One optimizer step: `fused_update` where it applies, else `reference_update` (plus the
    bf16 weight copies on CUDA). SAE_TRAIN_KERNELS=torch selects the reference everywhere."""
    if fused_supported(sae, optimizer):
        fused_update(sae, cast(torch.optim.Adam, optimizer), grad_clip)
    else:
        reference_update(sae, optimizer, grad_clip)
        write_gemm_copies(sae)
