"""Locks between the processes that write one store: `fcntl.flock` on small lock files, which
works between unrelated processes (Slurm array tasks) on local disks and on shared filesystems
that support it. (Crash-safe file writes are sae_train/atomic.py.)
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from sae_train.errors import UserError


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
