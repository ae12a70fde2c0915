"""Checkpoint io for the inference artifact (DESIGN.md, Contract 2).

A directory with `sae.safetensors` (W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_enc, b_dec,
and threshold for jumprelu/batchtopk; fp32) and `cfg.json` (the SAEConfig fields, the caller's
extra metadata, normalization_scale and sae_train_version; sorted keys). The weights always act
on raw activations: only folded SAEs (`SAE.fold`) are saved. Each file is written to a
temporary name, fsynced and renamed, so a crash never leaves a half-written file. No pickle.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sae_train import __version__
from sae_train.atomic import write_atomic, write_text_atomic
from sae_train.errors import UserError
from sae_train.sae.base import SAE
from sae_train.sae.config import SAEConfig
from sae_train.sae.registry import ARCHITECTURES, load_folded
from sae_train.sae.saelens import WEIGHTS_FILE as SAELENS_WEIGHTS_FILE


WEIGHTS_FILE = "sae.safetensors"
CFG_FILE = "cfg.json"
# The trainer's training-only state beside the inference files (Contract 2). Not exported.
TRAINER_STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
TRAINING_WEIGHTS_FILE = "training_weights.safetensors"
TRAINING_FILES = (TRAINER_STATE_FILE, OPTIMIZER_FILE, TRAINING_WEIGHTS_FILE)
# A trainer's half-written next save and the copy it replaces: never checkpoints to read.
STAGING_SUFFIXES = (".tmp", ".prev")


def save_sae(sae: SAE, path: str | os.PathLike, cfg_extra: dict[str, Any] | None = None) -> None:
    """Write a folded SAE to directory `path` (created if needed).

    cfg_extra: JSON-serialisable metadata merged into cfg.json (site, model, dataset, tokens
    trained, metrics...); it may not redefine SAEConfig fields.
    """
    if not sae.folded:
        raise ValueError(
            "save_sae writes the inference artifact, which acts on raw activations; "
            "save sae.fold(normalization_scale), not the training model"
        )
    extra = dict(cfg_extra or {})
    cfg = sae.cfg.to_dict()
    clash = sorted(set(extra) & set(cfg))
    if clash:
        raise ValueError(f"cfg_extra may not redefine SAE config fields: {clash}")
    if "normalization_scale" in extra and extra["normalization_scale"] != sae.normalization_scale:
        raise ValueError(
            f"cfg_extra normalization_scale={extra['normalization_scale']} disagrees with the "
            f"scale folded into this SAE ({sae.normalization_scale})"
        )
    meta = {**cfg, **extra, "normalization_scale": sae.normalization_scale, "sae_train_version": __version__}
    text = json.dumps(meta, sort_keys=True, indent=2) + "\n"
    tensors = {n: getattr(sae, n).detach().to("cpu", torch.float32).contiguous() for n in sae.inference_tensors}
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    write_atomic(directory / WEIGHTS_FILE, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    write_text_atomic(directory / CFG_FILE, text)


def load_sae_cfg(path: str | os.PathLike) -> dict[str, Any]:
    """The whole cfg.json of a checkpoint directory (config fields + metadata)."""
    file = Path(path) / CFG_FILE
    try:
        meta = json.loads(file.read_text())
    except FileNotFoundError:
        raise UserError(
            f"SAE checkpoint: {file} does not exist. Point to a directory written by "
            f"sae-train train (it holds {CFG_FILE} and {WEIGHTS_FILE})."
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"SAE checkpoint: {file} is unreadable or not valid JSON ({exc}). Re-export the checkpoint.") from exc
    if not isinstance(meta, dict):
        raise UserError(f"SAE checkpoint: {file} should hold a JSON object, got {type(meta).__name__}.")
    return meta


def load_sae(path: str | os.PathLike, *, compute_dtype: torch.dtype = torch.float32) -> SAE:
    """Read a checkpoint directory written by `save_sae`; the SAE acts on raw activations."""
    directory = Path(path)
    cfg_file, weights_file = directory / CFG_FILE, directory / WEIGHTS_FILE
    meta = load_sae_cfg(directory)
    arch = meta.get("architecture")
    if arch not in ARCHITECTURES:
        raise UserError(
            f"SAE checkpoint: {cfg_file} names architecture {arch!r}; this version of sae_train "
            f"knows {', '.join(sorted(ARCHITECTURES))}. Upgrade sae_train or fix the file."
        )
    cfg = SAEConfig.from_dict(meta, source=str(cfg_file))
    try:
        tensors = load_file(weights_file)
    except FileNotFoundError:
        raise UserError(f"SAE checkpoint: {weights_file} does not exist (the directory is incomplete).") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"SAE checkpoint: {weights_file} is corrupt or not a safetensors file ({exc}).") from exc
    return load_folded(cfg, tensors, normalization_scale=meta.get("normalization_scale", 1.0),
                       compute_dtype=compute_dtype, source=f"SAE checkpoint: {weights_file}")


# ---------------------------------------------------------------------------------- discovery


def _is_checkpoint(directory: Path) -> bool:
    return (directory / WEIGHTS_FILE).is_file()


def _is_training_only(directory: Path) -> bool:
    return any((directory / f).is_file() for f in TRAINING_FILES) and not _is_checkpoint(directory)


def _staging(path: Path, root: Path) -> bool:
    return any(part.endswith(STAGING_SUFFIXES) or part.startswith(".") for part in path.relative_to(root).parts)


def find_checkpoints(path: str) -> tuple[Path, list[Path]]:
    """(root, checkpoint directories at or below it, sorted); a UserError when there are none."""
    root = Path(path)
    expected = (f"a checkpoint directory written by sae-train train (it holds {WEIGHTS_FILE} and "
                f"{CFG_FILE}), or a directory of several (the train out_dir)")
    if not root.exists():
        raise UserError(f"checkpoint={path} does not exist. Point it at {expected}.")
    if not root.is_dir():
        raise UserError(f"checkpoint={path} is a file. Point it at {expected}.")
    if _is_checkpoint(root):
        return root, [root]
    if _is_training_only(root):
        raise UserError(
            f"checkpoint={path} holds only training state ({', '.join(f for f in TRAINING_FILES if (root / f).is_file())}) "
            f"and no inference checkpoint ({WEIGHTS_FILE}). Training state is not exported; point at a "
            "committed checkpoint directory (the trainer writes both at every save), not a staging copy."
        )
    if (root / SAELENS_WEIGHTS_FILE).is_file():
        raise UserError(f"checkpoint={path} is an export (SAELens layout), not a training checkpoint. It is "
                        "already exported; load it with sae_train.hub.load_exported or sae_lens.SAE.load_from_disk.")
    below = sorted({p.parent for p in root.rglob("*") if p.is_file() and not _staging(p.parent, root)})
    found = [d for d in below if _is_checkpoint(d)]
    training_only = [d for d in below if _is_training_only(d)]
    if training_only:
        listing = ", ".join(str(d) for d in training_only[:5])
        raise UserError(
            f"checkpoint={path}: {len(training_only)} directories below it hold training state but no inference "
            f"checkpoint ({WEIGHTS_FILE}): {listing}. They are incomplete or damaged; the trainer writes "
            "both at every save. Resume that training run to complete them, or point checkpoint= at the "
            "checkpoints you want to export."
        )
    if not found:
        raise UserError(f"checkpoint={path} holds no SAE checkpoint: no directory below it has {WEIGHTS_FILE}. "
                        f"Point it at {expected}.")
    return root, found
