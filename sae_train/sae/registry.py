"""Architecture name -> class, and the traits the other rooms read through it.

Adding an architecture is one module (an `SAE` subclass that sets its traits, sae/base.py) and
one `register` call: the built-in ones are registered below, a plug-in registers itself the
same way before its config is built.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor

from sae_train.errors import UserError
from sae_train.sae.base import SAE
from sae_train.sae.batchtopk import BatchTopKSAE
from sae_train.sae.clt import CrossLayerTranscoder
from sae_train.sae.config import SAEConfig
from sae_train.sae.jumprelu import JumpReLUSAE
from sae_train.sae.matryoshka import MatryoshkaSAE
from sae_train.sae.relu import ReLUSAE
from sae_train.sae.topk import TopKSAE

ARCHITECTURES: dict[str, type[SAE]] = {}


def register(cls: type[SAE]) -> type[SAE]:
    """Make `cls` available as `sae.architecture=<cls.architecture>`; returns cls (a decorator too)."""
    existing = ARCHITECTURES.get(cls.architecture)
    if existing is not None and existing is not cls:
        raise ValueError(f"architecture {cls.architecture!r} is already registered ({existing.__name__})")
    ARCHITECTURES[cls.architecture] = cls
    return cls


for _builtin in (ReLUSAE, TopKSAE, BatchTopKSAE, MatryoshkaSAE, JumpReLUSAE, CrossLayerTranscoder):
    register(_builtin)


def for_saelens(saelens_architecture: str) -> type[SAE] | None:
    """Our architecture that a SAELens SAE of `saelens_architecture` loads as (None: none runs it)."""
    return next(
        (
            cls
            for cls in ARCHITECTURES.values()
            if cls.saelens_architecture == cls.saelens_training_architecture == saelens_architecture
        ),
        None,
    )


def create_sae(cfg: SAEConfig, *, compute_dtype: torch.dtype = torch.float32) -> SAE:
    """A freshly initialised SAE for a resolved config (call init_from_data next)."""
    return ARCHITECTURES[cfg.architecture](cfg, compute_dtype=compute_dtype)


def load_folded(
    cfg: SAEConfig,
    tensors: Mapping[str, Tensor],
    *,
    normalization_scale: float | Sequence[float] = 1.0,
    target_normalization_scale: float | Sequence[float] | None = None,
    compute_dtype: torch.dtype = torch.float32,
    source: str = "SAE weights",
) -> SAE:
    """The inference SAE (acting on raw activations, DESIGN.md Contract 2) with resolved config
    `cfg` and weights `tensors`: exactly its architecture's `inference_tensors` (plus W_skip for
    a transcoder with a skip connection), in the shapes cfg implies. Every reader of a folded SAE
    (checkpoint, SAELens export) builds it here; `source` names the weights in errors. The
    scales are records only (what was folded in); target_normalization_scale defaults to
    normalization_scale (an SAE's one scale)."""
    if not cfg.is_resolved:
        raise UserError(f"{source}: the SAE config has no d_in; the file is incomplete.")
    sae = create_sae(cfg, compute_dtype=compute_dtype)
    load_weights(sae, tensors, sae.inference_tensors, source=source)
    sae.folded = True
    sae.normalization_scale = _scale(normalization_scale)
    sae.target_normalization_scale = _scale(
        normalization_scale if target_normalization_scale is None else target_normalization_scale
    )
    return sae


def _scale(value: float | Sequence[float]) -> float | list[float]:
    """A recorded normalisation scale: one number, or one per layer (a cross-layer transcoder)."""
    return [float(v) for v in value] if isinstance(value, Sequence) else float(value)


@torch.no_grad()
def load_weights(sae: SAE, tensors: Mapping[str, Tensor], names: Iterable[str], *, source: str) -> None:
    """Copy `tensors` into the parameters and buffers `names` of `sae`; a UserError naming
    `source` unless the names and every shape match exactly."""
    names = sorted(names)
    if sorted(tensors) != names:
        raise UserError(
            f"{source} holds tensors {sorted(tensors)}; a {sae.cfg.architecture} SAE needs exactly {names}."
        )
    state = sae.state_dict()
    for name in names:
        target, value = state[name], tensors[name]
        if value.shape != target.shape:
            raise UserError(
                f"{source} has {name} of shape {tuple(value.shape)}, but the SAE's config (d_in={sae.cfg.d_in}, "
                f"d_sae={sae.cfg.d_sae}, d_out={sae.cfg.d_out}) implies {tuple(target.shape)}."
            )
        target.copy_(value)
