"""What produced an artifact: package version and source commit, recorded in checkpoints and exports."""

from __future__ import annotations

import subprocess
from functools import cache
from pathlib import Path

from sae_train import __version__


@cache
def git_commit() -> str:
    """The commit of the source tree this package runs from ('' outside a git checkout),
    with '+dirty' when it has uncommitted changes."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        if commit.returncode != 0:
            return ""
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5)
        return commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return ""


def provenance() -> dict[str, str]:
    return {"package": "sae-train", "version": __version__, "commit": git_commit()}
