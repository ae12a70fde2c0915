"""Dead-latent resampling for the ReLU family (Anthropic, "Towards Monosemanticity", 2023).

A dead latent is pointed at an input the SAE reconstructs badly: its decoder row becomes that
input's (centred, normalised) direction, its encoder column the same direction scaled to 0.2x
the mean alive encoder norm, its encoder bias 0, and its Adam moments are reset. For a
transcoder the decoder row is the badly reconstructed target's direction (centred by b_dec)
and the encoder column the input's. Inputs are
drawn with probability proportional to their squared reconstruction error. Rank 0 decides and
broadcasts, so every rank holds the same weights afterwards.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from sae_train.sae import SAE
from sae_train.train.dist import Dist

SAMPLE_TOKENS = 16_384


@torch.no_grad()
def resample_dead_(
    sae: SAE,
    optimizer: torch.optim.Optimizer,
    dead: torch.Tensor,
    sample: Callable[[int], dict[str, torch.Tensor]],
    dist: Dist,
    source: tuple[str, float],
    target: tuple[str, float],
    generator: torch.Generator | None = None,
) -> int:
    """Resample the latents in `dead`; returns how many (the same on every rank). source and
    target are (site, normalisation scale); the target is the source for an SAE. The inputs
    are drawn with `generator` (on dead's device; None: the global one)."""
    dead_idx = dead.nonzero().flatten()
    if dead_idx.numel() == 0:
        return 0
    if dist.is_main:
        rows = sample(SAMPLE_TOKENS)
        x = rows[source[0]].to(dead.device, torch.float32) * source[1]
        y = rows[target[0]].to(dead.device, torch.float32) * target[1] if sae.cfg.is_transcoder else None
        errors = (sae(x, target=y).x_hat - (x if y is None else y)).pow(2).sum(dim=1)
        if float(errors.sum()) > 0:
            picks = torch.multinomial(
                errors, dead_idx.numel(), replacement=dead_idx.numel() > len(x), generator=generator
            )
            directions = (x if y is None else y)[picks] - sae.b_dec
            directions /= directions.norm(dim=1, keepdim=True).clamp_min(1e-8)
            enc_directions = directions
            if y is not None:
                enc_directions = x[picks] / x[picks].norm(dim=1, keepdim=True).clamp_min(1e-8)
            alive = ~dead
            enc_norm = sae.W_enc[:, alive].norm(dim=0).mean() if alive.any() else torch.tensor(1.0)
            sae.W_dec[dead_idx] = (
                directions * sae.W_dec[alive].norm(dim=1).mean().clamp_min(1e-8) if alive.any() else directions
            )
            sae.W_enc[:, dead_idx] = enc_directions.T * 0.2 * enc_norm
            sae.b_enc[dead_idx] = 0.0
    for tensor in (sae.W_dec, sae.W_enc, sae.b_enc):
        dist.broadcast_(tensor.data)
        # writes through .data bypass the version counter, which retires SAE.gemm_weight's copies
        torch.autograd.graph.increment_version(tensor)
    _reset_adam_rows(optimizer, sae, dead_idx)
    return int(dead_idx.numel())


def _reset_adam_rows(optimizer: torch.optim.Optimizer, sae: SAE, idx: torch.Tensor) -> None:
    """Zero the Adam moments of the resampled latents so old statistics don't undo the reset."""
    axes = {id(sae.W_dec): 0, id(sae.W_enc): 1, id(sae.b_enc): 0}
    for group in optimizer.param_groups:
        for param in group["params"]:
            axis = axes.get(id(param))
            state = optimizer.state.get(param, {})
            if axis is None or not state:
                continue
            for key in ("exp_avg", "exp_avg_sq"):
                state[key].index_fill_(axis, idx, 0.0)
