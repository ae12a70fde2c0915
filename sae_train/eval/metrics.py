"""The numbers of an SAE evaluation, as streaming accumulators over eval batches.

Everything is summed in float64 on the activations' device and read out once at the end, so
the result does not depend on how the tokens were batched (tests pin this against a one-shot
computation). Definitions (the report's "Definitions" section repeats them):

- mse             mean over tokens of sum over dims (x - x_hat)^2  (the training loss's unit)
- mse_per_element the same divided by d_in  (torch.nn.functional.mse_loss)
- fvu             sum ||x - x_hat||^2 / sum ||x - mean(x)||^2, mean over all eval tokens,
                  per dimension; explained_variance = 1 - fvu
- l0              mean over tokens of the number of nonzero latents
- dead / dense    latents nonzero on no eval token / on more than dense_threshold of them
- ce, kl          mean over scored predictions of -log p(target) and of
                  KL(p_clean || p) = sum_v p_clean(v) (log p_clean(v) - log p(v))
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor


class ReconstructionStats:
    """Reconstruction and sparsity sums of one SAE over the counted eval tokens.

    The centred sum of squares is merged batch by batch (Chan et al.'s parallel variance),
    which stays exact where sum(x^2) - n mean^2 would cancel: residual streams have
    directions whose mean dwarfs their spread.
    """

    def __init__(self, d_in: int, d_sae: int, device: torch.device | str = "cpu"):
        f64 = partial(torch.zeros, dtype=torch.float64, device=device)
        self.n = 0
        self.sse = f64(())
        self.mean = f64(d_in)
        self.m2 = f64(d_in)
        self.active = f64(())
        self.fires = torch.zeros(d_sae, dtype=torch.int64, device=device)

    def update(self, x: Tensor, x_hat: Tensor, latents: Tensor) -> None:
        """Add a batch: inputs and reconstructions [n, d_in], dense latents [n, d_sae]."""
        n = x.shape[0]
        if n == 0:
            return
        x64 = x.double()
        self.sse += (x64 - x_hat.double()).pow(2).sum()
        batch_mean = x64.mean(0)
        delta = batch_mean - self.mean
        total = self.n + n
        self.m2 += (x64 - batch_mean).pow(2).sum(0) + delta.pow(2) * (self.n * n / total)
        self.mean += delta * (n / total)
        self.n = total
        fired = latents != 0
        self.active += fired.sum()
        self.fires += fired.sum(0)

    @property
    def frequency(self) -> Tensor:
        """Firing frequency of each latent over the counted tokens (float64 [d_sae])."""
        return self.fires.double() / max(self.n, 1)

    def metrics(self, dense_threshold: float) -> dict[str, float]:
        n, d_in = max(self.n, 1), self.mean.numel()
        sse, variance = self.sse.item(), self.m2.sum().item()
        fvu = sse / variance if variance > 0 else math.nan
        freq = self.frequency
        return {
            "mse": sse / n,
            "mse_per_element": sse / (n * d_in),
            "fvu": fvu,
            "explained_variance": 1.0 - fvu,
            "l0": self.active.item() / n,
            "dead_fraction": (self.fires == 0).double().mean().item(),
            "dense_fraction": (freq > dense_threshold).double().mean().item(),
            "n_dead": int((self.fires == 0).sum()),
            "n_dense": int((freq > dense_threshold).sum()),
            "n_tokens": self.n,
        }


def token_ce(log_probs: Tensor, targets: Tensor) -> Tensor:
    """-log p(target) per prediction: log_probs [N, V], targets [N] -> [N]."""
    return -log_probs.gather(1, targets[:, None]).squeeze(1)


def token_kl(clean_log_probs: Tensor, log_probs: Tensor) -> Tensor:
    """KL(p_clean || p) per prediction, in nats: [N, V] x [N, V] -> [N]."""
    return (clean_log_probs.exp() * (clean_log_probs - log_probs)).sum(-1)


@dataclass
class LossStats:
    """Sums of CE and KL(clean || condition) over the scored predictions of one condition."""

    n: int = 0
    ce: float = 0.0
    kl: float = 0.0

    def update(self, log_probs: Tensor, clean_log_probs: Tensor, targets: Tensor) -> None:
        self.n += targets.numel()
        self.ce += token_ce(log_probs, targets).double().sum().item()
        self.kl += token_kl(clean_log_probs, log_probs).double().sum().item()

    @property
    def mean_ce(self) -> float:
        return self.ce / self.n if self.n else math.nan

    @property
    def mean_kl(self) -> float:
        return self.kl / self.n if self.n else math.nan


def ce_recovered(ce_clean: float, ce_sae: float, ce_ablated: float) -> float:
    """(CE_ablated - CE_sae) / (CE_ablated - CE_clean): 1 = as good as clean, 0 = as bad as ablating."""
    gap = ce_ablated - ce_clean
    return (ce_ablated - ce_sae) / gap if gap != 0 else math.nan


def density_histogram(frequency: Tensor, n_tokens: int, bins_per_decade: int = 10) -> dict[str, list]:
    """Histogram of log10 firing frequency over the latents that fired at all.

    The edges run from the decade below 1/n_tokens (the rarest observable frequency) to 1, so
    every SAE evaluated on the same tokens shares them. Dead latents (log10 0 = -inf) are
    counted apart, in "n_dead".
    """
    low = min(math.floor(math.log10(1.0 / max(n_tokens, 1))), -1)
    edges = torch.linspace(low, 0.0, bins_per_decade * -low + 1, dtype=torch.float64)
    alive = frequency[frequency > 0].double().cpu()
    counts = torch.histogram(alive.log10(), bins=edges).hist if alive.numel() else torch.zeros(len(edges) - 1)
    histogram: dict[str, Any] = {
        "log10_edges": [round(e, 6) for e in edges.tolist()],
        "counts": [int(c) for c in counts.tolist()],
        "n_dead": int((frequency == 0).sum()),
    }
    return histogram
