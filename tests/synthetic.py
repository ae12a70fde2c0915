"""Synthetic activations with known ground truth, written as a real activation store.

Tokens are sparse non-negative combinations of `n_features` random unit directions in d_in
dimensions (each feature fires independently with probability `p`, one for all or one per
feature, magnitude ~ 1 + Exp(1)),
plus a constant offset (like an LM's mean activation) and isotropic noise. An SAE that learned
the data has decoder rows matching the true directions.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sae_train.store import StoreWriter


def true_directions(n_features: int, d_in: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    dirs = torch.randn(n_features, d_in, generator=gen)
    return dirs / dirs.norm(dim=1, keepdim=True)


def sample(n: int, dirs: torch.Tensor, p: float | list[float], noise: float, gen: torch.Generator) -> torch.Tensor:
    n_features, d_in = dirs.shape
    active = torch.rand(n, n_features, generator=gen) < torch.as_tensor(p)
    magnitude = 1.0 + torch.empty(n, n_features).exponential_(1.0, generator=gen)
    codes = active * magnitude
    offset = torch.linspace(-1.0, 1.0, d_in)
    return codes @ dirs + offset + noise * torch.randn(n, d_in, generator=gen)


def write_store(
    root: Path,
    dirs: torch.Tensor,
    n_tokens: int,
    *,
    p: float | list[float] = 0.05,
    noise: float = 0.02,
    site: str = "synthetic",
    tokens_per_shard: int = 8192,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Path:
    gen = torch.Generator().manual_seed(seed)
    spec = {"synthetic": {"n_features": dirs.shape[0], "p": p, "noise": noise, "seed": seed}}
    with StoreWriter(root, spec, {site: dirs.shape[1]}, dtype) as writer:
        for index, start in enumerate(range(0, n_tokens, tokens_per_shard)):
            n = min(tokens_per_shard, n_tokens - start)
            ids = torch.arange(start, start + n, dtype=torch.int32)
            writer.write_shard(index, {site: sample(n, dirs, p, noise, gen)}, ids, torch.zeros(n, dtype=torch.int32))
        writer.close()
    return root


def recovered_fraction(decoder: torch.Tensor, dirs: torch.Tensor, threshold: float = 0.9) -> float:
    """Share of true directions matched by some decoder row with cosine > threshold."""
    rows = decoder / decoder.norm(dim=1, keepdim=True).clamp_min(1e-12)
    best = (dirs @ rows.T).max(dim=1).values
    return float((best > threshold).float().mean())
