"""Crash-safe writes shared by every stage: a file or a directory appears whole or not at all.

A file's new content goes to its temporary `.<name>.tmp` in the target's directory, is
fsynced and renamed over the target, and the directory is fsynced, so a SIGKILL or power loss
at any instant leaves either the old file or the new one; on an error the temporary is removed
and the target left as it was. A directory is built complete under `.<name>.tmp` and swapped
in by `swap_dir`, the old one kept as `.<name>.prev` until the caller's commit point.

The temporary names are fixed, so a crash's leftover is overwritten by the next write of the
same target (and easy to find: `temporary`). One writer per target at a time: the store's
locks, rank 0 for checkpoints, one process per eval or export out_dir; targets that several
processes may write at once say so (`concurrent=True`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path


def temporary(target: Path) -> Path:
    """Where the next version of `target` (file or directory) is written before it is renamed."""
    return target.with_name(f".{target.name}.tmp")


def previous(target: Path) -> Path:
    """Where `swap_dir` keeps the replaced version of directory `target` until it is deleted."""
    return target.with_name(f".{target.name}.prev")


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno != errno.EINVAL:  # some network filesystems cannot fsync a directory
            raise
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(target: Path, write: Callable[[Path], object], *, concurrent: bool = False) -> None:
    """Atomically and durably (re)place `target` with what `write(tmp_path)` writes to the path it is given.

    concurrent: several processes may write the same target at once (ranks compiling one kernel
    library): each writes its own temporary (pid-suffixed) and the last rename wins whole."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp") if concurrent else temporary(target)
    try:
        write(tmp)
        _fsync_file(tmp)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(target.parent)


def write_bytes_atomic(target: Path, chunks: Iterable[memoryview | bytes]) -> None:
    """`write_atomic` of the concatenated chunks, streamed (never all in memory at once)."""

    def write(tmp: Path) -> None:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for chunk in chunks:
                view = memoryview(chunk).cast("B")
                while view:  # a single os.write may be partial
                    view = view[os.write(fd, view) :]
        finally:
            os.close(fd)

    write_atomic(target, write)


def write_text_atomic(target: Path, text: str) -> None:
    """`write_atomic` for a text file."""
    write_bytes_atomic(target, [text.encode()])


def write_json_atomic(target: Path, data: dict) -> None:
    """`write_atomic` for a JSON document (indented, sorted keys)."""
    write_text_atomic(target, json.dumps(data, indent=2, sort_keys=True) + "\n")


def staging_dir(target: Path) -> Path:
    """A fresh, empty `temporary(target)` directory to build the next version of `target` in."""
    tmp = temporary(target)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def swap_dir(target: Path) -> None:
    """Move the complete `staging_dir(target)` into place: its files fsynced first, the old
    `target` (if any) kept as `previous(target)`, the parent fsynced. The caller deletes the
    previous copy (`drop_previous`) once the new version is committed."""
    tmp, prev = temporary(target), previous(target)
    for path in tmp.rglob("*"):
        if path.is_file():
            _fsync_file(path)
    if target.exists():
        if prev.exists():
            shutil.rmtree(prev)
        os.replace(target, prev)
    os.replace(tmp, target)
    fsync_dir(target.parent)


def drop_previous(target: Path) -> None:
    """Delete the copy of `target` that `swap_dir` kept, if any."""
    if previous(target).exists():
        shutil.rmtree(previous(target))
