"""Crash-safe file primitives: every file the store publishes appears whole or not at all.

A file is written under a temporary name in its final directory, fsynced, renamed over the
final name and the directory fsynced, so a SIGKILL or power loss at any instant leaves either
the old file or the new one. Locks are `fcntl.flock` on small lock files, which works between
unrelated processes (Slurm array tasks) on local disks and on shared filesystems that support it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from sae_train.atomic import fsync_dir
from sae_train.errors import UserError


def write_all(fd: int, data: memoryview | bytes) -> None:
    """os.write until everything is written (a single write may be partial)."""
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view) :]


def publish(final: Path, tmp: Path, chunks: Iterable[memoryview | bytes]) -> None:
    """Atomically (re)place `final` with the concatenated chunks, via `tmp` in the same dir.

    On any error the temp file is removed and `final` is left as it was.
    """
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for chunk in chunks:
                write_all(fd, chunk)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(final.parent)


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if needed), waiting for other holders."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        _flock(fd, path, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def try_lock(path: Path) -> int | None:
    """Take an exclusive lock without waiting; the open descriptor holds it, None if busy."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        _flock(fd, path, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _flock(fd: int, path: Path, how: int) -> None:
    try:
        fcntl.flock(fd, how)
    except OSError as e:
        if e.errno not in (errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP):
            raise
        raise UserError(
            f"The filesystem holding {path} does not support file locks (flock: {e.strerror}), which "
            "the activation store needs to let several ranks write safely. Use a directory on a "
            "filesystem with locking (on Lustre, one mounted with -o flock) for out_dir."
        ) from e
