"""Interventions through a dictionary on a Hugging Face model: add, clamp, ablate.

`steering(model, checkpoint, features, mode=..., positions=...)` is a context manager: every
forward pass inside it (a plain call or `model.generate`) sees the edited activation at the
checkpoint's site (a transcoder's: its target, the MLP output). Per steered token:

- add:    y' = y + sum_i value_i * W_dec[i]            (the decoder direction, raw units)
- clamp:  y' = y + sum_i (value_i - f_i(x)) * W_dec[i] = y + decode(f') - decode(f)
- ablate: clamp to 0

f = encode(x) reads the site itself (an SAE) or the transcoder's input site, so clamping keeps
the SAE's reconstruction error: a latent that is off and is ablated leaves the model exactly
unchanged, and only the chosen latents move.

Positions come from the KV cache: a forward pass that starts with an empty cache is the prompt
(its length is remembered), later cached passes are generated tokens. So `positions="generated"`
needs generation with the cache (what `generate` does by default); a pass without a cache
counts all its tokens as prompt.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import Tensor, nn

from sae_train.errors import UserError
from sae_train.lm import resolve_site, splice, splice_from
from sae_train.lm.sites import family_of
from sae_train.sae import SAE
from sae_train.sae.checkpoint import Checkpoint

Mode = Literal["add", "clamp", "ablate"]
Positions = Literal["prompt", "generated", "all"]
MODES = ("add", "clamp", "ablate")
POSITIONS = ("prompt", "generated", "all")
Features = Mapping[int, float] | Iterable[int]
"""Latent id -> value (add: strength, clamp: the latent's new activation), or latent ids alone
(ablate: each set to 0)."""


class _Tracker:
    """Which positions of the current forward pass are prompt and which are generated."""

    def __init__(self, positions: Positions):
        self.positions = positions
        self.offset = 0
        self.prompt_length = 0

    def before_forward(self, _module: nn.Module, _args: tuple, kwargs: dict[str, Any]) -> None:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        self.offset = int(cache.get_seq_length()) if cache is not None else 0

    def mask(self, length: int, device: torch.device) -> Tensor | None:
        """bool [length]: the tokens of this pass to steer (None: all of them)."""
        if self.offset == 0:
            self.prompt_length = length
        if self.positions == "all":
            return None
        index = torch.arange(self.offset, self.offset + length, device=device)
        return index < self.prompt_length if self.positions == "prompt" else index >= self.prompt_length


def feature_values(checkpoint: Checkpoint, features: Features, mode: str) -> tuple[list[int], list[float]]:
    """(latent ids, values) of `features` for `checkpoint`; a UserError for ids out of range,
    a bare list where values are needed, or values given to ablate."""
    if mode not in MODES:
        raise UserError(f"mode={mode!r} is not a steering mode; use one of {', '.join(MODES)}.")
    if isinstance(features, Mapping):
        latents, values = list(features), [float(v) for v in features.values()]
        if mode == "ablate" and any(values):
            raise UserError(
                f"mode=ablate sets latents to 0 and takes no values, but got {dict(features)}. Pass the latent "
                f"ids alone (features=[{', '.join(map(str, latents))}]), or use mode=clamp to set them to values."
            )
    else:
        latents = list(features)
        if mode != "ablate":
            raise UserError(
                f"mode={mode} needs a value per latent (features={{{latents[0] if latents else 123}: 4.0}}); "
                "a bare list of latents only suits mode=ablate."
            )
        values = [0.0] * len(latents)
    if not latents:
        raise UserError("features is empty; name at least one latent, e.g. features={123: 4.0}.")
    d_sae = checkpoint.sae.cfg.d_sae
    for latent in latents:
        if isinstance(latent, bool) or not isinstance(latent, int) or not 0 <= latent < d_sae:
            raise UserError(
                f"Latent {latent!r} does not exist in checkpoint {checkpoint.path}: it has d_sae={d_sae} latents, "
                f"ids 0..{d_sae - 1}."
            )
    return latents, values


def steering_delta(sae: SAE, x: Tensor, latents: Tensor, values: Tensor, mode: str) -> Tensor:
    """What the intervention adds to the site's rows [n, d_out] (fp32) given the rows x [n, d_in]
    the dictionary reads: a sum over the chosen latents of (new - current) * decoder row."""
    directions = sae.W_dec[latents].float()
    if mode == "add":
        return (values @ directions).expand(x.shape[0], -1)
    current = sae.encode(x)[:, latents]
    return (values - current) @ directions


@contextmanager
def steering(
    model: nn.Module,
    checkpoint: Checkpoint,
    features: Features,
    *,
    mode: Mode = "add",
    positions: Positions = "all",
) -> Iterator[None]:
    """Within the block, `model` runs with `features` of `checkpoint` (from `load`) steered.

    Values are in raw activation units (decoder rows are unit-norm: add raises the latent's
    contribution by `value`); scale them yourself, e.g. by `act_max`, for other units. Nest
    blocks to steer several dictionaries at once. The SAE moves to the model's device."""
    if positions not in POSITIONS:
        raise UserError(f"positions={positions!r}; use one of {', '.join(POSITIONS)}.")
    ids, vals = feature_values(checkpoint, features, mode)
    try:
        device = next(model.parameters()).device
        read = resolve_site(model, checkpoint.site)
        written = resolve_site(model, checkpoint.sae.cfg.target) if checkpoint.sae.cfg.is_transcoder else read
    except UserError as err:
        raise UserError(f"Checkpoint {checkpoint.path} cannot steer this model: {err}") from err
    sae = checkpoint.sae.to(device).eval()
    latents = torch.tensor(ids, device=device)
    values = torch.tensor(vals, device=device)
    tracker = _Tracker(positions)

    @torch.no_grad()
    def edit(x: Tensor, y: Tensor) -> Tensor:
        if (x.shape[-1], y.shape[-1]) != (sae.cfg.d_in, sae.cfg.d_out):
            raise UserError(
                f"Checkpoint {checkpoint.path} reads width {sae.cfg.d_in} and writes width {sae.cfg.d_out}, but the "
                f"model has widths {x.shape[-1]} and {y.shape[-1]} there: it was trained on another model."
            )
        steered = tracker.mask(y.shape[1], y.device)
        if steered is None:
            rows_x, rows_y = x.flatten(0, 1), y.flatten(0, 1)
        elif not bool(steered.any()):
            return y
        else:
            rows_x, rows_y = x[:, steered].flatten(0, 1), y[:, steered].flatten(0, 1)
        new = (rows_y.float() + steering_delta(sae, rows_x, latents, values, mode)).to(y.dtype)
        if steered is None:
            return new.view_as(y)
        out = y.clone()
        out[:, steered] = new.view(y.shape[0], -1, y.shape[2])
        return out

    base = model.get_submodule(family_of(model).layers.rpartition(".")[0])
    handle = base.register_forward_pre_hook(tracker.before_forward, with_kwargs=True)
    try:
        if written is read:
            with splice(model, read, lambda y: edit(y, y)):
                yield
        else:
            with splice_from(model, read, written, edit):
                yield
    finally:
        handle.remove()
