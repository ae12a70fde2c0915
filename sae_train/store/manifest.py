"""The store's manifest: records, JSON form, per-rank parts and their merge.

Each writer rank owns one part file, `manifest.d/r{rank:03d}.json`, listing the shards it
wrote. `manifest.json` is rebuilt from all parts under an exclusive lock after every shard,
so it is always the union of finished shards whichever ranks are running, and ranks never
need to talk to each other. Everything is written with sorted keys and contains nothing
time- or machine-dependent: an interrupted then resumed run leaves the same bytes as an
uninterrupted one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from sae_train import __version__
from sae_train.atomic import write_bytes_atomic
from sae_train.errors import UserError
from sae_train.store import locks

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PARTS_DIR = "manifest.d"
LOCK = "lock"
RESERVED = ("token_ids", "position")  # tensors every shard holds besides the sites
DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class SiteInfo:
    """One activation site: its name, width and the dtype it is stored in."""

    name: str
    d_in: int
    dtype: str  # a key of DTYPES

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


@dataclass(frozen=True)
class ShardInfo:
    """One finished shard. `index` is global; `rank` is only the provenance of the file."""

    file: str
    index: int
    rank: int
    n_tokens: int
    n_bytes: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """What a store holds. `spec` is the caller's opaque description of everything that
    determines the content (model, data, context size, seed...)."""

    spec: dict[str, Any]
    sites: tuple[SiteInfo, ...]
    shards: tuple[ShardInfo, ...]
    package_version: str = __version__
    format_version: int = FORMAT_VERSION

    @property
    def n_tokens(self) -> int:
        return sum(s.n_tokens for s in self.shards)

    @property
    def n_bytes(self) -> int:
        return sum(s.n_bytes for s in self.shards)

    @property
    def n_shards(self) -> int:
        return len(self.shards)

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "package_version": self.package_version,
            "spec": self.spec,
            "sites": [asdict(s) for s in self.sites],
            "shards": [asdict(s) for s in self.shards],
            "totals": {"n_tokens": self.n_tokens, "n_shards": self.n_shards, "n_bytes": self.n_bytes},
        }

    @classmethod
    def from_json(cls, data: Any, source: Path) -> Manifest:
        """Parse and check the JSON form; UserError naming `source` if malformed."""
        if not isinstance(data, dict) or "format_version" not in data:
            raise UserError(f"{source} is not an activation-store manifest (no format_version field).")
        if data["format_version"] != FORMAT_VERSION:
            raise UserError(
                f"{source} has format_version {data['format_version']!r}; this sae_train "
                f"({__version__}) reads format_version {FORMAT_VERSION} only. Use the sae_train "
                "version that wrote the store, or recreate it with `sae-train cache`."
            )
        try:
            sites = tuple(SiteInfo(str(s["name"]), int(s["d_in"]), str(s["dtype"])) for s in data["sites"])
            shards = tuple(
                ShardInfo(
                    str(s["file"]),
                    int(s["index"]),
                    int(s["rank"]),
                    int(s["n_tokens"]),
                    int(s["n_bytes"]),
                    str(s["sha256"]),
                )
                for s in data["shards"]
            )
            manifest = cls(dict(data["spec"]), sites, shards, str(data.get("package_version", "")))
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(
                f"{source} is malformed ({type(e).__name__}: {e}); recreate the store with `sae-train cache`."
            ) from None
        bad = [s.dtype for s in sites if s.dtype not in DTYPES]
        if bad:
            raise UserError(f"{source} lists site dtype {bad[0]!r}; expected one of {sorted(DTYPES)}.")
        return manifest


def dumps(data: Mapping[str, Any]) -> bytes:
    """The one JSON encoding used for every manifest file (deterministic bytes)."""
    return (json.dumps(data, sort_keys=True, indent=2, allow_nan=False) + "\n").encode()


def load_json(path: Path) -> Any:
    """Read a manifest-like JSON file; UserError naming it if unreadable."""
    try:
        return json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(
            f"{path} is not valid JSON ({e}); it may have been edited by hand. Restore it or recreate the store."
        ) from None


def header(m: Mapping[str, Any]) -> dict[str, Any]:
    """The fields that must agree between a store and whoever writes into it."""
    return {
        "format_version": m["format_version"],
        "spec": m["spec"],
        "sites": {s["name"]: {"d_in": s["d_in"], "dtype": s["dtype"]} for s in m["sites"]},
    }


def diff(stored: Any, requested: Any, path: str = "") -> list[str]:
    """Every differing leaf as 'dotted.path: stored X vs requested Y'."""
    if isinstance(stored, dict) and isinstance(requested, dict):
        out = []
        for key in sorted(set(stored) | set(requested), key=str):
            sub = f"{path}.{key}" if path else str(key)
            out += diff(stored.get(key, _ABSENT), requested.get(key, _ABSENT), sub)
        return out
    if isinstance(stored, list) and isinstance(requested, list) and len(stored) == len(requested):
        return [line for i, (a, b) in enumerate(zip(stored, requested)) for line in diff(a, b, f"{path}.{i}")]
    return [] if stored == requested else [f"{path}: stored {stored!r} vs requested {requested!r}"]


class _Absent:
    def __repr__(self) -> str:
        return "<absent>"


_ABSENT = _Absent()


def read_parts(root: Path) -> list[tuple[Path, dict[str, Any]]]:
    """All rank parts, in rank order. Parts are replaced atomically, so no lock is needed."""
    parts_dir = root / PARTS_DIR
    if not parts_dir.is_dir():
        return []
    return [(p, load_json(p)) for p in sorted(parts_dir.glob("r*.json"))]


def merge_manifests(root: str | Path) -> Manifest:
    """Rebuild `manifest.json` from all rank parts, under the store's lock, and return it.

    A global index claimed by several parts (possible only after the world size changed
    between runs) is taken from the lowest rank whose file is intact.
    """
    root = Path(root)
    if not (root / PARTS_DIR).is_dir():
        raise UserError(f"{root} has no {PARTS_DIR}/ directory: it is not a store written by StoreWriter.")
    with locks.locked(root / PARTS_DIR / LOCK):
        parts = read_parts(root)
        if not parts:
            raise UserError(f"{root}/{PARTS_DIR} holds no rank parts: no writer ever opened this store.")
        first_path, first = parts[0]
        meta = Manifest.from_json(first, first_path)  # checks the fields before header() reads them
        first_header = header(first)
        shard_lists = [meta.shards]
        for path, part in parts[1:]:
            shard_lists.append(Manifest.from_json(part, path).shards)
            lines = diff(first_header, header(part))
            if lines:
                raise UserError(
                    f"Manifest parts {first_path} and {path} disagree ({'; '.join(lines)}): two "
                    f"different cache runs wrote into {root}. Remove the store and recreate it."
                )
        claims: dict[int, list[ShardInfo]] = {}
        for part_shards in shard_lists:
            for s in part_shards:
                claims.setdefault(s.index, []).append(s)
        shards = tuple(_pick(root, claims[i]) for i in sorted(claims))
        manifest = Manifest(meta.spec, meta.sites, shards)
        data = dumps(manifest.to_json())
        target = root / MANIFEST
        if not target.is_file() or target.read_bytes() != data:
            write_bytes_atomic(target, [data])
        return manifest


def _pick(root: Path, claims: list[ShardInfo]) -> ShardInfo:
    if len(claims) == 1:
        return claims[0]
    intact = [s for s in claims if is_intact(root, s)]
    return min(intact or claims, key=lambda s: s.rank)


def is_intact(root: Path, shard: ShardInfo) -> bool:
    """The shard's file exists with the recorded size (the cheap check; sha256 is verify's job)."""
    try:
        return os.stat(root / shard.file).st_size == shard.n_bytes
    except FileNotFoundError:
        return False
