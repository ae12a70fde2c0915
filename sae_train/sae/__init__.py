"""SAE architectures (pure math) and checkpoint io.

    cfg = SAEConfig(architecture="topk", k=32).resolved(d_in)
    sae = create_sae(cfg, compute_dtype=torch.bfloat16)
    sae.init_from_data(sample)            # normalised units: E||x|| = 1
    out = sae(x, dead_mask=dead)          # SAEOutput: x_hat, losses["loss"], l0, fired, latents
    save_sae(sae.fold(scale), "runs/sae/blocks.8.hook_resid_post", {"site": ...})

Imports nothing from the other rooms of sae_train.
"""

from sae_train.sae.base import SAE, SAEOutput, SparseLatents, geometric_median
from sae_train.sae.checkpoint import load_sae, load_sae_cfg, save_sae
from sae_train.sae.config import SAEConfig
from sae_train.sae.registry import ARCHITECTURES, create_sae, load_folded, load_weights, register

__all__ = [
    "ARCHITECTURES",
    "SAE",
    "SAEConfig",
    "SAEOutput",
    "SparseLatents",
    "create_sae",
    "geometric_median",
    "load_folded",
    "load_sae",
    "load_sae_cfg",
    "load_weights",
    "register",
    "save_sae",
]
