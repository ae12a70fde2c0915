"""The machine's own GEMM bound, so throughput is reported as a fraction of what is possible.

An SAE training step is bounded by its dense matrix products, which each architecture names
(`SAE.step_gemms`): the encoder GEMM alone where decode and backward are sparse (the TopK
family), five where the latents are dense (encoder forward, decoder forward, latent gradient,
decoder-weight gradient, encoder-weight gradient). Timing those exact products (shapes and
transposes) on this device in the compute dtype gives the bound in tokens/s that every log line
and benchmark compares against.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from sae_train.sae import ARCHITECTURES


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn: Callable[[], torch.Tensor], device: torch.device, repeats: int) -> float:
    for _ in range(2):  # warm-up: allocator, kernel selection, first-touch page faults
        fn()
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def step_gemms(
    architecture: str, rows: int, d_in: int, d_sae: int, dtype: torch.dtype, device: torch.device
) -> list[Callable[[], torch.Tensor]]:
    """The dense GEMMs one training step of `architecture` needs, as callables on random data."""

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=device).to(dtype)

    names = ARCHITECTURES[architecture].step_gemms
    x, w_enc, w_dec = rand(rows, d_in), rand(d_in, d_sae), rand(d_sae, d_in)
    dense = bool(set(names) - {"encoder"})  # the dense-latent GEMMs need f and its gradient
    f, grad_x = (rand(rows, d_sae), rand(rows, d_in)) if dense else (torch.empty(0), torch.empty(0))
    catalogue: dict[str, Callable[[], torch.Tensor]] = {
        "encoder": lambda: x @ w_enc,  # encoder forward
        "decoder": lambda: f @ w_dec,  # decoder forward
        "latent_grad": lambda: grad_x @ w_dec.T,  # latent gradient
        "decoder_grad": lambda: f.T @ grad_x,  # decoder-weight gradient
        "encoder_grad": lambda: x.T @ f,  # encoder-weight gradient
    }
    return [catalogue[name] for name in names]


def step_gemm_seconds(
    architecture: str, rows: int, d_in: int, d_sae: int, dtype: torch.dtype, device: torch.device, repeats: int = 5
) -> float:
    """Best-of-N time of the dense GEMMs one training step of `architecture` needs."""
    return sum(best_time(g, device, repeats) for g in step_gemms(architecture, rows, d_in, d_sae, dtype, device))
