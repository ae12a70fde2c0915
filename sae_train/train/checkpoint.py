"""Training checkpoints (Contract 2): the inference SAE plus the state to resume exactly.

Each SAE's directory holds the folded inference copy (`sae.safetensors`, `cfg.json`, written
by `sae.io`) and, beside it, the training-only state: `training_weights.safetensors` (the
unfolded weights and the dead-latent counters), `optimizer.pt` (tensors and numbers only, read
with weights_only=True) and `trainer_state.json`.

Several SAEs train together and must resume from the same step, so a save is a small
transaction: every SAE directory is first written complete under a temporary name, then each
is swapped in (the old one kept as `.prev`), then the run-level `train_state.json` is replaced
atomically — the commit point — and the `.prev` copies are deleted. A crash at any instant
leaves, for every SAE, a directory (or its `.prev`) matching the committed step. A write that
fails (full disk, quota) stops training with a `UserError` and leaves the committed checkpoint
as it was.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sae_train.atomic import fsync_dir, write_text_atomic
from sae_train.errors import UserError
from sae_train.sae.io import OPTIMIZER_FILE, TRAINER_STATE_FILE, TRAINING_WEIGHTS_FILE

RUN_STATE = "train_state.json"
SAE_STATE, WEIGHTS, OPTIMIZER = TRAINER_STATE_FILE, TRAINING_WEIGHTS_FILE, OPTIMIZER_FILE


def write_json(path: Path, data: dict) -> None:
    """Atomic JSON write (temp file, fsync, rename)."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def _prev(directory: Path) -> Path:
    return directory.with_name(directory.name + ".prev")


def _tmp(directory: Path) -> Path:
    return directory.with_name(directory.name + ".tmp")


def write_training_state(directory: Path, tensors: dict[str, torch.Tensor], optimizer: dict, state: dict) -> None:
    """The training-only part of one SAE's checkpoint, into `directory` (a fresh temp dir)."""
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(directory / WEIGHTS))
    torch.save(optimizer, directory / OPTIMIZER)
    write_json(directory / SAE_STATE, state)


def commit(out_dir: Path, sae_dirs: list[Path], run_state: dict) -> None:
    """Swap in every `<dir>.tmp` written for this save, then commit `run_state`."""
    for directory in sae_dirs:
        for path in _tmp(directory).iterdir():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        if directory.exists():
            if _prev(directory).exists():
                shutil.rmtree(_prev(directory))
            os.replace(directory, _prev(directory))
        os.replace(_tmp(directory), directory)
        fsync_dir(directory.parent)
    write_json(out_dir / RUN_STATE, run_state)
    fsync_dir(out_dir)
    for directory in sae_dirs:
        if _prev(directory).exists():
            shutil.rmtree(_prev(directory))


WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)
"""What the writers raise when a write fails: Python's files OSError, torch.save RuntimeError,
safetensors SafetensorError."""


@contextlib.contextmanager
def failed_writes_stop(out_dir: Path, sae_dirs: list[Path], step: int) -> Iterator[None]:
    """Around one save: a failed write removes this save's half-written staging directories
    and becomes a UserError; the committed checkpoint stays loadable (an SAE already swapped
    in has its `.prev`, which resuming restores)."""
    try:
        yield
    except WRITE_ERRORS as err:
        for directory in sae_dirs:
            shutil.rmtree(_tmp(directory), ignore_errors=True)
        free = shutil.disk_usage(out_dir).free if out_dir.exists() else 0
        raise UserError(
            f"Could not write the checkpoint of step {step} into {out_dir} ({err}; {free / 2**20:,.0f} MiB free "
            "there). Training stopped; the previous checkpoint is intact. Free disk space (or fix the directory's "
            "permissions), then rerun the same command to resume from it."
        ) from err


def staging_dir(directory: Path) -> Path:
    """A clean `<dir>.tmp` to write one SAE's next checkpoint into."""
    tmp = _tmp(directory)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def remove_stale(out_dir: Path, sae_dirs: list[Path]) -> None:
    """Remove what a save killed midway left: staging directories and the run state's temp files
    (uniquely named, so no later save replaces them)."""
    for directory in sae_dirs:
        shutil.rmtree(_tmp(directory), ignore_errors=True)
    for path in out_dir.glob(f".{RUN_STATE}.*.tmp"):
        path.unlink(missing_ok=True)


def read_run_state(out_dir: Path) -> dict | None:
    path = out_dir / RUN_STATE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is corrupt ({err}); remove it to start over, or restore a copy.") from err


def restore_committed(directory: Path, step: int) -> None:
    """Make `directory` hold its checkpoint of the committed `step` again.

    After a crash between swapping SAE directories and committing, the committed copy of some
    SAEs is their `.prev`; it is moved back into place so the next save starts from a clean state.
    After a crash between committing and removing the `.prev` copies, they are removed.
    """
    def step_of(candidate: Path) -> int | None:
        state_file = candidate / SAE_STATE
        return json.loads(state_file.read_text()).get("step") if state_file.exists() else None

    if step_of(directory) == step:
        shutil.rmtree(_prev(directory), ignore_errors=True)  # a crash after the commit, while removing it
        return
    if step_of(_prev(directory)) == step:
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(_prev(directory), directory)
        return
    raise UserError(
        f"No checkpoint of step {step} in {directory} (or {_prev(directory).name}) although {RUN_STATE} "
        "records it; the run directory was modified. Remove it to start over."
    )


def read_training_state(directory: Path) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(tensors, optimizer state, trainer state) of one SAE's checkpoint."""
    try:
        tensors = load_file(str(directory / WEIGHTS))
        optimizer = torch.load(directory / OPTIMIZER, weights_only=True, map_location="cpu")
        state = json.loads((directory / SAE_STATE).read_text())
    except (OSError, RuntimeError, ValueError) as err:
        raise UserError(f"Checkpoint in {directory} is unreadable ({err}). Remove the run directory to start over.") from err
    return tensors, optimizer, state


def comparable(config: dict[str, Any]) -> dict[str, Any]:
    """The config fields a resumed run must share with the original (the rest may change)."""
    free = {"progress", "log_every", "checkpoint_every_tokens", "wandb", "resume", "out_dir", "device",
            "dist_timeout_s"}
    return {k: v for k, v in config.items() if k not in free}
