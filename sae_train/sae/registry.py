"""Architecture name -> class. Adding an architecture: a new module and one line here."""

from __future__ import annotations

import torch

from sae_train.sae.base import SAE
from sae_train.sae.batchtopk import BatchTopKSAE
from sae_train.sae.config import SAEConfig
from sae_train.sae.jumprelu import JumpReLUSAE
from sae_train.sae.relu import ReLUSAE
from sae_train.sae.topk import TopKSAE

ARCHITECTURES: dict[str, type[SAE]] = {
    "relu": ReLUSAE,
    "topk": TopKSAE,
    "batchtopk": BatchTopKSAE,
    "jumprelu": JumpReLUSAE,
}


def create_sae(cfg: SAEConfig, *, compute_dtype: torch.dtype = torch.float32) -> SAE:
    """A freshly initialised SAE for a resolved config (call init_from_data next)."""
    return ARCHITECTURES[cfg.architecture](cfg, compute_dtype=compute_dtype)
