"""What produced an artifact, and how to publish that record.

Checkpoints record the package version and source commit, and their `source`: model, data and
text settings, with local paths that later stages on this machine read back (eval loads the
recorded model). Exports and model cards are published: they carry the same record with
local paths replaced by names (`public_record`)."""

from __future__ import annotations

import subprocess
from functools import cache
from pathlib import Path, PurePath
from typing import Any

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
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return ""


def provenance() -> dict[str, str]:
    return {"package": "sae-train", "version": __version__, "commit": git_commit()}


def public_model_name(model: dict[str, Any]) -> str | None:
    """How a recorded model is named outside this machine: its hub id, a `pkg:` name, or a local
    model's file or directory name (its content hash is the recorded revision)."""
    name = model.get("name")
    if model.get("hub_id") or not name:
        return model.get("hub_id") or name
    return name if name.startswith("pkg:") else PurePath(name).name


def _is_local(path: str) -> bool:
    return PurePath(path).is_absolute() or path.startswith(("~", "."))


def public_source(source: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's `source` record as it may be published: what reproduces the run (model id
    and revision or content hash, data spec, text settings) without local paths. The store path
    is dropped (the store's model, data and text settings are recorded beside it); a local model
    or corpus keeps its file or directory name."""
    public = {k: v for k, v in source.items() if k != "store"}
    if isinstance(source.get("model"), dict):
        public["model"] = source["model"] | {"name": public_model_name(source["model"])}
    data = source.get("data")
    if isinstance(data, dict) and data.get("path") and (data.get("source") == "files" or _is_local(data["path"])):
        public["data"] = data | {"path": PurePath(data["path"]).name}
    return public


def public_record(meta: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's cfg.json as exports publish it: `source` made public (`public_source`)."""
    return meta | {"source": public_source(meta["source"])} if isinstance(meta.get("source"), dict) else meta
