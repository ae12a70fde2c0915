"""The dictionaries a steer call uses: loaded, matched to the features named, and the units of
their values (raw, or multiples of `sae-train inspect`'s act_max)."""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sae_train.errors import UserError
from sae_train.sae.checkpoint import Checkpoint, load_checkpoints
from sae_train.steer.config import FeatureSpec

INSPECT_RECORDS = "features"
"""The folder of an inspect out_dir's per-latent records, below a folder named after each
checkpoint: `*.jsonl.gz` / `*.jsonl` shards (one JSON record a line) or `*.json` files (one
record each); every record has the latent's `index` and its `act_max`."""


def load(checkpoint: str | os.PathLike) -> Checkpoint:
    """The SAE or transcoder in checkpoint directory `checkpoint` (folded: it acts on raw
    activations), with the metadata saying which site it reads (`.site`)."""
    found = load_checkpoints(str(checkpoint))
    if len(found) > 1:
        listing = ", ".join(str(c.path) for c in found[:5])
        raise UserError(f"{checkpoint} holds {len(found)} checkpoints ({listing}); load one of them.")
    return found[0]


def load_all(paths: list[str]) -> list[Checkpoint]:
    """Every checkpoint at or below each path, with distinct names."""
    checkpoints = [c for path in paths for c in load_checkpoints(path)]
    names = [c.name for c in checkpoints]
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash:
        raise UserError(
            f"Several checkpoints are named {', '.join(clash)} ({', '.join(str(c.path) for c in checkpoints)}); "
            "pass the training out_dir that holds them all, so each is named by its folder, or steer them one at a time."
        )
    return checkpoints


def select(checkpoints: list[Checkpoint], spec: FeatureSpec) -> list[tuple[Checkpoint, dict[int, float] | list[int]]]:
    """(checkpoint, its latents) for each key of a parsed `features` setting: "" = the only
    checkpoint; else a checkpoint's name, or the site exactly one checkpoint reads."""
    names = ", ".join(f"{c.name} (site {c.site})" for c in checkpoints)
    chosen = []
    for key, latents in spec.items():
        if key == "":
            if len(checkpoints) != 1:
                raise UserError(
                    f"features names latents but {len(checkpoints)} checkpoints are loaded ({names}); key them by "
                    "checkpoint name or site: features='{<name>: {123: 4.0}}'."
                )
            chosen.append((checkpoints[0], latents))
            continue
        by_name = [c for c in checkpoints if c.name == key]
        by_site = [c for c in checkpoints if c.site == key]
        matches = by_name or by_site
        if len(matches) != 1:
            problem = "no checkpoint" if not matches else f"{len(matches)} checkpoints"
            raise UserError(f"features names '{key}', which matches {problem}; the checkpoints are: {names}.")
        chosen.append((matches[0], latents))
    return chosen


def _records(path: Path) -> Iterator[dict[str, Any]]:
    """The records in one file of an inspect features folder (other files: none)."""
    name = path.name
    if name.endswith(".jsonl.gz"):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            yield from (json.loads(line) for line in f if line.strip())
    elif name.endswith(".jsonl"):
        with path.open(encoding="utf-8") as f:
            yield from (json.loads(line) for line in f if line.strip())
    elif name.endswith(".json"):
        yield json.loads(path.read_text(encoding="utf-8"))


def act_max(inspect_dir: str, checkpoint: Checkpoint, latents: list[int]) -> dict[int, float]:
    """Each latent's act_max (its largest activation over the inspected tokens) from an
    `sae-train inspect` out_dir (`INSPECT_RECORDS`; inspect_dir may also be the checkpoint's own
    folder in it); a UserError when a record is missing, unreadable, or has no positive act_max."""
    root = Path(inspect_dir) / checkpoint.name
    folder = (root if root.is_dir() else Path(inspect_dir)) / INSPECT_RECORDS
    if not folder.is_dir():
        raise UserError(
            f"inspect_dir={inspect_dir} holds no inspect records of {checkpoint.name} (no {root / INSPECT_RECORDS}). "
            f"Run sae-train inspect checkpoint={checkpoint.path} out_dir={inspect_dir}, or leave inspect_dir empty "
            "to give values in raw activation units."
        )
    wanted, found = set(latents), {}
    try:
        for path in sorted(folder.iterdir()):
            for record in _records(path):
                if isinstance(record, dict) and record.get("index") in wanted:
                    found[record["index"]] = record.get("act_max")
            if wanted <= found.keys():
                break
    except (OSError, EOFError, ValueError) as err:
        raise UserError(f"{folder} holds an unreadable inspect record ({err}); rerun sae-train inspect.") from err
    out = {}
    for latent in latents:
        if latent not in found:
            raise UserError(
                f"{folder} has no record of latent {latent} of {checkpoint.name}; inspect it again with this "
                "checkpoint, or leave inspect_dir empty to give values in raw activation units."
            )
        value = found[latent]
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise UserError(
                f"{folder} gives act_max={value!r} for latent {latent} of {checkpoint.name}: it never fired in the "
                "inspected tokens, so values in its units are undefined. Steer it in raw units (leave inspect_dir empty)."
            )
        out[latent] = float(value)
    return out
