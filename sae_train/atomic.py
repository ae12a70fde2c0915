"""Crash-safe file writes shared by every stage: a file appears whole or not at all.

The new content goes to a unique temporary name in the target's directory, is fsynced and
renamed over the target; on any error the temporary is removed and the target is left as it
was. `fsync_dir` then makes the rename itself durable where a caller needs that (commit
points: a checkpoint's run state, a store's manifest).
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


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


def write_atomic(target: Path, write: Callable[[Path], object]) -> None:
    """Atomically (re)place `target` with what `write(tmp_path)` writes to the path it is given."""
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(target: Path, text: str) -> None:
    """`write_atomic` for a text file."""
    write_atomic(target, lambda tmp: tmp.write_text(text))
