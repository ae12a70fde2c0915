"""Learning-rate and sparsity-coefficient schedules, as fractions of the run.

Expressed in fractions of the total steps so the defaults hold for a 1M-token test run and a
1B-token production run alike.
"""

from __future__ import annotations


def lr_factor(step: int, total: int, warmup: float, decay: float) -> float:
    """Linear warm-up over the first `warmup` fraction of steps, constant, then linear decay
    to zero over the last `decay` fraction (Anthropic's April-2024 recipe)."""
    warm_steps = max(1, round(warmup * total))
    if step < warm_steps:
        return (step + 1) / warm_steps
    decay_steps = round(decay * total)
    if decay_steps and step >= total - decay_steps:
        return max(0.0, (total - step) / decay_steps)
    return 1.0


def sparsity_factor(step: int, total: int, warmup: float) -> float:
    """The sparsity penalty ramps linearly from 0 to its full weight over the first `warmup`
    fraction of steps, so early latents are not killed before they find a direction."""
    warm_steps = round(warmup * total)
    return 1.0 if warm_steps == 0 else min(1.0, (step + 1) / warm_steps)
