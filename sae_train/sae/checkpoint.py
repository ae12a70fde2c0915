"""The checkpoint (DESIGN.md, Contract 2): its layout on disk, written and read in one place.

A training run's `out_dir` holds `run_state.json` (the committed step, data position and
config: what resume reads) and one directory per SAE, named after its tag. An SAE directory
holds the inference artifact — `sae.safetensors` (the architecture's `inference_tensors`:
W_enc [d_in, d_sae], W_dec [d_sae, d_out], b_enc [d_sae], b_dec [d_out], plus threshold where
it has one and W_skip [d_in, d_out] for a transcoder with a skip connection; fp32) and
`cfg.json` (the SAEConfig fields — `target` and `d_out` among them —, the caller's metadata
(`site`: the site read), normalization_scale, target_normalization_scale for a transcoder, and
sae_train_version; sorted keys) — whose weights always act on raw activations (only folded
SAEs, `SAE.fold`, are saved). An SAE computes f = act((x - b_dec) @ W_enc + b_enc), x_hat =
f @ W_dec + b_dec; a transcoder's encoder reads x itself: f = act(x @ W_enc + b_enc), y_hat =
f @ W_dec + b_dec [+ x @ W_skip], in raw units of its target site. Beside it lies the
training-only state: `training_weights.safetensors` (the unfolded weights and the dead-latent
counters), `optimizer.pt` (tensors and numbers only, read with weights_only=True) and
`trainer_state.json`. No pickle.

Several SAEs train together and must resume from the same step, so a save is a small
transaction: every SAE directory is first written complete under its hidden temporary name
(`staging_dir`, sae_train/atomic.py), then each is swapped in (the old one kept as its hidden
`.prev`), then `run_state.json` is replaced atomically — the commit point — and the `.prev`
copies are deleted. A crash at any instant leaves, for every SAE, a directory (or its `.prev`)
matching the committed step. Discovery (`find_checkpoints`) never reads hidden directories.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from sae_train import __version__
from sae_train.atomic import (
    drop_previous,
    previous,
    swap_dir,
    temporary,
    write_atomic,
    write_json_atomic,
    write_text_atomic,
)
from sae_train.errors import UserError
from sae_train.sae.base import SAE
from sae_train.sae.config import SAEConfig
from sae_train.sae.registry import ARCHITECTURES, load_folded
from sae_train.sae.saelens import WEIGHTS_FILE as SAELENS_WEIGHTS_FILE

WEIGHTS_FILE = "sae.safetensors"
CFG_FILE = "cfg.json"
# The trainer's training-only state beside the inference files. Not exported.
TRAINER_STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
TRAINING_WEIGHTS_FILE = "training_weights.safetensors"
TRAINING_FILES = (TRAINER_STATE_FILE, OPTIMIZER_FILE, TRAINING_WEIGHTS_FILE)
RUN_STATE_FILE = "run_state.json"
LEGACY_RUN_STATE_FILE = "train_state.json"
"""The run state's former name (two letters from trainer_state.json): still read, so runs written
under it resume; their next commit replaces it by RUN_STATE_FILE."""


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
    if sae.cfg.is_transcoder:
        meta["target_normalization_scale"] = sae.target_normalization_scale
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
        raise UserError(
            f"SAE checkpoint: {file} is unreadable or not valid JSON ({exc}). Re-export the checkpoint."
        ) from exc
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
    return load_folded(
        cfg,
        tensors,
        normalization_scale=meta.get("normalization_scale", 1.0),
        target_normalization_scale=meta.get("target_normalization_scale"),
        compute_dtype=compute_dtype,
        source=f"SAE checkpoint: {weights_file}",
    )


# ---------------------------------------------------------------------------------- discovery


def _is_checkpoint(directory: Path) -> bool:
    return (directory / WEIGHTS_FILE).is_file()


def _is_training_only(directory: Path) -> bool:
    return any((directory / f).is_file() for f in TRAINING_FILES) and not _is_checkpoint(directory)


def _staging(path: Path, root: Path) -> bool:
    """Hidden: a trainer's half-written next save, the copy it replaces, an export's staging."""
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def find_checkpoints(path: str) -> tuple[Path, list[Path]]:
    """(root, checkpoint directories at or below it, sorted); a UserError when there are none."""
    root = Path(path)
    expected = (
        f"a checkpoint directory written by sae-train train (it holds {WEIGHTS_FILE} and "
        f"{CFG_FILE}), or a directory of several (the train out_dir)"
    )
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
        raise UserError(
            f"checkpoint={path} is an export (SAELens layout), not a training checkpoint. It is "
            "already exported; load it with sae_train.hub.load_exported or sae_lens.SAE.load_from_disk."
        )
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
        raise UserError(
            f"checkpoint={path} holds no SAE checkpoint: no directory below it has {WEIGHTS_FILE}. "
            f"Point it at {expected}."
        )
    return root, found


@dataclass
class Checkpoint:
    """A loaded checkpoint directory: its SAE and the metadata that says where it belongs in the
    model (`site`, the site it reads; a transcoder writes `sae.cfg.target`)."""

    name: str
    """Label in the report: the path below the sweep directory (the trainer's tag), or for a
    single checkpoint its recorded tag."""
    path: Path
    meta: dict[str, Any]
    """The whole cfg.json: SAE config plus the trainer's metadata (site, source, provenance...)."""
    sae: SAE

    @property
    def site(self) -> str:
        return self.meta["site"]


def load_checkpoints(path: str) -> list[Checkpoint]:
    """Load every checkpoint at or below `path` (a missing or corrupt file is a UserError)."""
    root, directories = find_checkpoints(path)
    checkpoints = []
    for directory in directories:
        meta = load_sae_cfg(directory)
        sae = load_sae(directory)
        if not isinstance(meta.get("site"), str):
            raise UserError(
                f"Checkpoint {directory}: {CFG_FILE} records no activation site ('site'), so it cannot be "
                "spliced into the model. Checkpoints written by sae-train train always have one."
            )
        name = directory.relative_to(root).as_posix() if directory != root else str(meta.get("tag") or root.name)
        checkpoints.append(Checkpoint(name=name, path=directory, meta=meta, sae=sae))
    return checkpoints


def _model_key(model: dict[str, Any] | None) -> dict[str, Any] | None:
    """The parts of a recorded model identity that name the weights (dtype does not)."""
    return None if model is None else {k: model.get(k) for k in ("name", "hub_id", "revision")}


_DISAGREEMENT = {
    "model": ("different models", "Use checkpoints of different models in separate calls."),
    "data": (
        "different data sources",
        "Use them in separate calls, or pass data=... to use one source for all.",
    ),
    "text": ("different text settings", "Use them in separate calls."),
}


def recorded(checkpoints: list[Checkpoint], key: str) -> dict[str, Any] | None:
    """The `source[key]` ("model", "data" or "text") all checkpoints recorded; None when none did.

    Checkpoints that disagree cannot run against one model or on one text: an error.
    """
    values = {c.name: (c.meta.get("source") or {}).get(key) for c in checkpoints}
    compare = _model_key if key == "model" else (lambda v: v)
    distinct = {json.dumps(compare(v), sort_keys=True) for v in values.values()}
    if len(distinct) > 1:
        listing = "; ".join(f"{name}: {json.dumps(compare(v), sort_keys=True)}" for name, v in values.items())
        what, fix = _DISAGREEMENT[key]
        raise UserError(f"The checkpoints were trained on {what} ({listing}). {fix}")
    return next(iter(values.values()))


# ---------------------------------------------------------------------------------- training state


def write_training_state(directory: Path, tensors: dict[str, torch.Tensor], optimizer: dict, state: dict) -> None:
    """The training-only part of one SAE's checkpoint, into `directory` (its `staging_dir`)."""
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(directory / TRAINING_WEIGHTS_FILE))
    torch.save(optimizer, directory / OPTIMIZER_FILE)
    write_json_atomic(directory / TRAINER_STATE_FILE, state)


def commit(out_dir: Path, sae_dirs: list[Path], run_state: dict) -> None:
    """Swap in every SAE directory staged for this save, then commit `run_state`."""
    for directory in sae_dirs:
        swap_dir(directory)
    write_json_atomic(out_dir / RUN_STATE_FILE, run_state)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(out_dir / LEGACY_RUN_STATE_FILE)
    for directory in sae_dirs:
        drop_previous(directory)


WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)
"""What the writers raise when a write fails (full disk, quota): Python's files OSError,
torch.save RuntimeError, safetensors SafetensorError."""


@contextlib.contextmanager
def failed_writes_stop(out_dir: Path, sae_dirs: list[Path], step: int) -> Iterator[None]:
    """Around one save: a failed write removes this save's half-written staging directories
    and becomes a UserError; the committed checkpoint stays loadable (an SAE already swapped
    in has its previous copy, which resuming restores)."""
    try:
        yield
    except WRITE_ERRORS as err:
        for directory in sae_dirs:
            shutil.rmtree(temporary(directory), ignore_errors=True)
        free = shutil.disk_usage(out_dir).free if out_dir.exists() else 0
        raise UserError(
            f"Could not write the checkpoint of step {step} into {out_dir} ({err}; {free / 2**20:,.0f} MiB free "
            "there). Training stopped; the previous checkpoint is intact. Free disk space (or fix the directory's "
            "permissions), then rerun the same command to resume from it."
        ) from err


def remove_stale(out_dir: Path, sae_dirs: list[Path]) -> None:
    """Remove what a save killed midway left and no later save would replace when it was the
    last one: staging directories and the run state's temporaries."""
    for directory in sae_dirs:
        shutil.rmtree(temporary(directory), ignore_errors=True)
    for name in (RUN_STATE_FILE, LEGACY_RUN_STATE_FILE):
        for path in out_dir.glob(f".{name}.*tmp"):
            path.unlink(missing_ok=True)


def read_run_state(out_dir: Path) -> dict | None:
    """The committed run state of a training out_dir (None: no run was committed there)."""
    path = out_dir / RUN_STATE_FILE
    if not path.exists():
        path = out_dir / LEGACY_RUN_STATE_FILE
        if not path.exists():
            return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is corrupt ({err}); remove it to start over, or restore a copy.") from err


def restore_committed(directory: Path, step: int) -> None:
    """Make `directory` hold its checkpoint of the committed `step` again.

    After a crash between swapping SAE directories and committing, the committed copy of some
    SAEs is their previous one; it is moved back into place so the next save starts clean.
    After a crash between committing and deleting the previous copies, they are deleted.
    """

    def step_of(candidate: Path) -> int | None:
        state_file = candidate / TRAINER_STATE_FILE
        return json.loads(state_file.read_text()).get("step") if state_file.exists() else None

    if step_of(directory) == step:
        drop_previous(directory)
        return
    if step_of(previous(directory)) == step:
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(previous(directory), directory)
        return
    raise UserError(
        f"No checkpoint of step {step} in {directory} (or {previous(directory).name}) although the run state "
        "records it; the run directory was modified. Remove it to start over."
    )


def read_training_tensor(directory: Path, name: str) -> torch.Tensor:
    """One tensor of an SAE's training weights (e.g. its dead-latent counters), read alone."""
    try:
        with safe_open(str(directory / TRAINING_WEIGHTS_FILE), "pt") as weights:
            return weights.get_tensor(name)
    except (OSError, RuntimeError, ValueError, SafetensorError) as err:
        raise UserError(
            f"Checkpoint in {directory} is unreadable ({err}). Remove the run directory to start over."
        ) from err


def read_training_state(
    directory: Path, select: Callable[[str, tuple[int, ...]], tuple[slice, ...] | None] | None = None
) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(tensors, optimizer state, trainer state) of one SAE's checkpoint.

    select(name, shape): the part of a training tensor to read (None: all of it). With it, only
    those bytes are read, and the optimizer state is memory-mapped, not read: a latent shard
    resuming takes its range of a checkpoint much larger than its memory."""
    try:
        if select is None:
            tensors = load_file(str(directory / TRAINING_WEIGHTS_FILE))
        else:
            tensors = {}
            with safe_open(str(directory / TRAINING_WEIGHTS_FILE), framework="pt") as f:
                for name in f.keys():
                    part = f.get_slice(name)
                    index = select(name, tuple(part.get_shape()))
                    tensors[name] = f.get_tensor(name) if index is None else part[index]
        optimizer = torch.load(
            directory / OPTIMIZER_FILE, weights_only=True, map_location="cpu", mmap=select is not None
        )
        state = json.loads((directory / TRAINER_STATE_FILE).read_text())
    except (OSError, RuntimeError, ValueError) as err:
        raise UserError(
            f"Checkpoint in {directory} is unreadable ({err}). Remove the run directory to start over."
        ) from err
    return tensors, optimizer, state
