"""Open an activation store for reading: checks on open, zero-copy shard views.

Nothing here loads a whole store: shards are mmapped on demand and the page cache, not the
process, holds their bytes, so memory stays bounded whatever the store's size.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from sae_train.errors import UserError
from sae_train.store import shardfile
from sae_train.store.manifest import MANIFEST, RESERVED, Manifest, ShardInfo, SiteInfo, load_json


class ActivationStore:
    """A finished (or still growing) store, as listed by its `manifest.json` when opened.

    Opening checks that every listed shard exists with its recorded size; `verify` checks
    headers (and checksums on request). Shards are addressed by their position in
    `manifest.shards` (sorted by global index; equal to the index in a complete store).
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            what = "is a file" if self.root.exists() else "does not exist"
            raise UserError(f"Activation store {self.root} {what}; expected a directory made by `sae-train cache`.")
        path = self.root / MANIFEST
        if not path.is_file():
            raise UserError(
                f"{self.root} is not an activation store: it has no {MANIFEST}. Create one with "
                f"`sae-train cache ... out_dir={self.root}`."
            )
        self.manifest: Manifest = Manifest.from_json(load_json(path), path)
        self.sites: dict[str, SiteInfo] = {s.name: s for s in self.manifest.sites}
        self.n_tokens: int = self.manifest.n_tokens
        for s in self.manifest.shards:
            self._check_size(s)

    @property
    def n_shards(self) -> int:
        return self.manifest.n_shards

    def shard(self, i: int) -> dict[str, torch.Tensor]:
        """Shard i's tensors (sites, `token_ids`, `position`) as zero-copy mmap views.

        The views are copy-on-write: writing to them is allowed and never reaches the file.
        """
        info = self.manifest.shards[i]
        return shardfile.open_tensors(self.root / info.file, shardfile.read_header(self.root / info.file))

    def nonfinite_rows(self, i: int, site: str, rows: np.ndarray | None = None) -> np.ndarray:
        """The rows of shard i (among `rows`, sorted; all when None) whose `site` activation
        holds a NaN or an inf, sorted. Reads those rows only."""
        x = self.shard(i)[site]
        if rows is not None:
            x = x[torch.from_numpy(rows)]
        bad = ~torch.isfinite(x).all(dim=1)
        picked = np.arange(len(x)) if rows is None else rows
        return picked[bad.numpy()]

    def damaged(self, i: int) -> bool:
        """Shard i's bytes differ from those written (its sha256 is not the manifest's)."""
        info = self.manifest.shards[i]
        return _sha256(self.root / info.file) != info.sha256

    def verify(self, checksums: bool = False) -> None:
        """Check every shard's size, header, tensor names, shapes and dtypes; sha256 if asked."""
        expected: dict[str, tuple[int | None, torch.dtype]] = {
            name: (s.d_in, s.torch_dtype) for name, s in self.sites.items()
        }
        expected.update({name: (None, torch.int32) for name in RESERVED})
        for i, info in enumerate(self.manifest.shards):
            path = self.root / info.file
            self._check_size(info)
            entries = shardfile.read_header(path)
            if set(entries) != set(expected):
                raise _mismatch(path, f"it holds tensors {sorted(entries)}, the manifest expects {sorted(expected)}")
            for name, (d_in, dtype) in expected.items():
                e = entries[name]
                shape = (info.n_tokens,) if d_in is None else (info.n_tokens, d_in)
                if e.shape != shape or shardfile.CODES[e.code][0] != dtype:
                    found, wanted = f"{e.code}{list(e.shape)}", f"{dtype}{list(shape)}"
                    raise _mismatch(path, f"tensor {name!r} is {found}, the manifest expects {wanted}")
            if checksums and self.damaged(i):
                raise _mismatch(path, "its sha256 checksum differs from the manifest's (the bytes are damaged)")

    def _check_size(self, info: ShardInfo) -> None:
        path = self.root / info.file
        if not path.is_file():
            raise UserError(
                f"Shard {path}, listed in {MANIFEST}, is missing. Rerun the same `sae-train cache` "
                "command to rewrite it."
            )
        size = path.stat().st_size
        if size != info.n_bytes:
            raise UserError(
                f"Shard {path} has {size} bytes but {MANIFEST} records {info.n_bytes}: it is truncated "
                "or damaged. Rerun the same `sae-train cache` command to rewrite it."
            )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _mismatch(path: Path, what: str) -> UserError:
    return UserError(f"Shard {path} does not match the store's {MANIFEST}: {what}. {shardfile.FIX_HINT}")
