"""Write an activation store: shards published atomically, one manifest part per rank.

The cache stage decides what shard `index` contains; the writer only makes sure that a
shard is either wholly in the store or absent, whatever happens (SIGKILL, full disk), and
that rerunning the same command resumes: `done` says which indices are already there.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import asdict
from pathlib import Path

import torch

from sae_train.atomic import temporary, write_bytes_atomic
from sae_train.errors import UserError
from sae_train.store import locks, shardfile
from sae_train.store.manifest import (
    DTYPES,
    FORMAT_VERSION,
    LOCK,
    MANIFEST,
    PARTS_DIR,
    RESERVED,
    Manifest,
    ShardInfo,
    SiteInfo,
    diff,
    dumps,
    header,
    is_intact,
    load_json,
    merge_manifests,
    read_parts,
)


def shard_name(rank: int, index: int) -> str:
    return f"shard-r{rank:03d}-{index:06d}.safetensors"


class StoreWriter:
    """Writes the shards of one rank into a store directory shared with any other ranks.

    Rank `rank` of `world_size` writes the global indices with `index % world_size == rank`.
    Ranks may be separate processes on separate machines that never talk to each other;
    they meet only through `flock` on `manifest.d/lock`. Two writers with the same rank at
    once are refused. Stale temp files of this rank (from a crash) are removed on open.
    """

    def __init__(
        self,
        root: str | Path,
        spec: dict,
        sites: Mapping[str, int],
        dtype: torch.dtype,
        *,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.root = Path(root)
        self.rank, self.world_size = rank, world_size
        if not 0 <= rank < world_size:
            raise UserError(
                f"Store writer rank {rank} is outside world_size {world_size}; expected 0 <= rank < world_size."
            )
        name = next((k for k, v in DTYPES.items() if v == dtype), None)
        if name is None:
            raise UserError(f"Store dtype {dtype} is not supported; use one of {sorted(DTYPES)}.")
        self.dtype = dtype
        self.sites = tuple(SiteInfo(s, _check_site(s, d), name) for s, d in sorted(sites.items()))
        if not self.sites:
            raise UserError("A store needs at least one activation site; `sites` is empty.")
        self.spec = _normalise_spec(spec)
        self._parts = self.root / PARTS_DIR
        self._part = self._parts / f"r{rank:03d}.json"
        self._check_root()
        self._rank_lock: int | None = None
        try:
            self._parts.mkdir(parents=True, exist_ok=True)
            self._rank_lock = locks.try_lock(self._parts / f"r{rank:03d}.lock")
            if self._rank_lock is None:
                raise UserError(
                    f"Another process is already writing rank {rank} into {self.root}. Wait for it "
                    "to finish (or stop it) before starting this one; two writers of one rank would clash."
                )
            self._shards = self._open()
        except OSError as e:
            self._release()
            raise UserError(
                f"Cannot write the activation store {self.root}: {e}. Check that the directory is "
                "writable and the disk has space, then rerun the same command."
            ) from e
        except BaseException:
            self._release()
            raise

    # -- public -------------------------------------------------------------------------

    @property
    def done(self) -> set[int]:
        """Global indices already in the store (any rank) whose file exists with the recorded size."""
        done = set()
        for path, part in read_parts(self.root):
            done |= {s.index for s in Manifest.from_json(part, path).shards if is_intact(self.root, s)}
        return done

    def write_shard(
        self, index: int, acts: Mapping[str, torch.Tensor], token_ids: torch.Tensor, positions: torch.Tensor
    ) -> ShardInfo:
        """Convert, check and publish shard `index`, then update this rank's part and the manifest."""
        if self._rank_lock is None:
            raise RuntimeError("StoreWriter.write_shard called after close()")
        if index < 0 or index % self.world_size != self.rank:
            raise ValueError(f"shard {index} does not belong to rank {self.rank} of {self.world_size}")
        tensors = self._check_inputs(index, acts, token_ids, positions)
        name = shard_name(self.rank, index)
        final = self.root / name
        previous = self._shards.get(index)
        digest = hashlib.sha256()

        def chunks() -> Iterator[memoryview | bytes]:
            for chunk in shardfile.encode(tensors):
                digest.update(chunk)
                yield chunk

        try:
            write_bytes_atomic(final, chunks())
            info = ShardInfo(name, index, self.rank, len(token_ids), final.stat().st_size, digest.hexdigest())
            self._publish_part({**self._shards, index: info})
        except OSError as e:
            if previous is None:  # the file is not referenced by any part: take it back
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(final)
            raise self._write_error(name, e, "Nothing of the failed shard was kept.") from e
        self._shards[index] = info
        try:
            merge_manifests(self.root)
        except OSError as e:
            raise self._write_error(
                name,
                e,
                f"The shard itself is whole and recorded in {PARTS_DIR}/; {MANIFEST} "
                "still lists the shards before it and will include it at the next write.",
            ) from e
        return info

    def close(self) -> Manifest:
        """Merge the manifest one last time, release this rank, return the merged manifest."""
        try:
            return merge_manifests(self.root)
        except OSError as e:
            raise UserError(
                f"Could not rebuild {MANIFEST} in the activation store {self.root}: {e}. Every "
                f"finished shard is recorded in {PARTS_DIR}/; fix the problem (free some space) and "
                "rerun the same command to finish the store."
            ) from e
        finally:
            self._release()

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._rank_lock is not None:
            self.close()

    # -- internals ----------------------------------------------------------------------

    def _requested_header(self) -> dict:
        return header({"format_version": FORMAT_VERSION, "spec": self.spec, "sites": [asdict(s) for s in self.sites]})

    def _check_root(self) -> None:
        """Refuse a file, a foreign directory or a store made with other settings; touch nothing."""
        root = self.root
        if root.exists() and not root.is_dir():
            raise UserError(f"Store path {root} exists and is a file, not a directory. Choose another out_dir.")
        if not root.exists():
            return
        manifests = [root / MANIFEST] if (root / MANIFEST).is_file() else []
        manifests += [p for p, _ in read_parts(root)]
        if not manifests and not (root / PARTS_DIR).is_dir() and any(root.iterdir()):
            raise UserError(
                f"{root} already exists, is not empty and is not an activation store (no "
                f"{MANIFEST}). Choose a new out_dir or an empty directory."
            )
        for path in manifests:
            data = load_json(path)
            Manifest.from_json(data, path)  # format version and fields are sound
            lines = diff(header(data), self._requested_header())
            if lines:
                raise UserError(
                    f"The activation store {root} was made with other settings ({path.name} "
                    f"differs in: {'; '.join(lines)}). Rerun with the original settings to resume "
                    "it, or choose a new out_dir. Nothing was changed on disk."
                )

    def _open(self) -> dict[int, ShardInfo]:
        """Under the store lock: recheck settings, clean up after a crash, publish our part."""
        with locks.locked(self._parts / LOCK):
            self._check_root()
            stale = list(self.root.glob(f".shard-r{self.rank:03d}-*.tmp"))
            stale += [temporary(self.root / MANIFEST), temporary(self._part)]
            for p in stale:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
            shards = {}
            if self._part.is_file():
                shards = {s.index: s for s in Manifest.from_json(load_json(self._part), self._part).shards}
            known = {s.file for s in shards.values()}
            for p in self.root.glob(f"shard-r{self.rank:03d}-*.safetensors"):
                if p.name not in known:  # finished but never recorded: only this rank names such files
                    p.unlink()
            self._publish_part(shards)
        merge_manifests(self.root)
        return shards

    def _publish_part(self, shards: Mapping[int, ShardInfo]) -> None:
        part = Manifest(self.spec, self.sites, tuple(shards[i] for i in sorted(shards))).to_json()
        data = dumps({**part, "rank": self.rank})
        if not self._part.is_file() or self._part.read_bytes() != data:
            write_bytes_atomic(self._part, [data])

    def _check_inputs(
        self, index: int, acts: Mapping[str, torch.Tensor], token_ids: torch.Tensor, positions: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        where = f"shard {index} for {self.root}"
        expected = {s.name for s in self.sites}
        if set(acts) != expected:
            raise UserError(
                f"Activations for {where} have sites {sorted(acts)}; the store holds "
                f"{sorted(expected)}. Pass exactly the store's sites."
            )
        n = token_ids.shape[0] if token_ids.dim() == 1 else -1
        out: dict[str, torch.Tensor] = {}
        for key, t in (("token_ids", token_ids), ("position", positions)):
            if t.dim() != 1 or len(t) != n or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
                raise UserError(
                    f"{key} for {where} must be a 1-d integer tensor with one entry per token, "
                    f"as long as token_ids; got dtype {t.dtype} and shape {tuple(t.shape)}."
                )
            if n and (int(t.min()) < 0 or int(t.max()) > 2**31 - 1):
                raise UserError(
                    f"{key} for {where} must lie in [0, 2**31); got values in [{int(t.min())}, {int(t.max())}]."
                )
            out[key] = t.detach().to("cpu", torch.int32).contiguous()
        for s in self.sites:
            t = acts[s.name].detach()
            if t.shape != (n, s.d_in):
                raise UserError(
                    f"Activations for site {s.name!r} in {where} have shape {tuple(t.shape)}; "
                    f"expected ({n}, {s.d_in}): one row of d_in={s.d_in} per token."
                )
            if not t.is_floating_point():
                raise UserError(
                    f"Activations for site {s.name!r} in {where} have dtype {t.dtype}; expected a float dtype."
                )
            stored = t.to("cpu", self.dtype).contiguous()
            if not bool(torch.isfinite(stored).all()):
                if bool(torch.isfinite(t).all()):
                    why = f"overflow {self.dtype} (values beyond its range)"
                else:
                    why = "contain NaN or inf values"
                raise UserError(
                    f"Activations for site {s.name!r} in {where} {why}. Non-finite activations are "
                    "never stored: check the model dtype (float16 overflows easily; use bfloat16 "
                    "or float32) and the input data."
                )
            out[s.name] = stored
        return out

    def _write_error(self, name: str, e: OSError, kept: str) -> UserError:
        space = " The disk is full." if e.errno in (errno.ENOSPC, errno.EDQUOT) else ""
        return UserError(
            f"Could not write {name} into the activation store {self.root}: {e.strerror or e}."
            f"{space} The store is intact and holds {len(self.done)} whole shard(s). {kept} Fix "
            "the problem (free some space) and rerun the same command: it resumes where it stopped."
        )

    def _release(self) -> None:
        if self._rank_lock is not None:
            os.close(self._rank_lock)
            self._rank_lock = None


def _check_site(name: str, d_in: int) -> int:
    if name in RESERVED:
        raise UserError(f"Site name {name!r} is reserved for the store's own tensors {RESERVED}; rename the site.")
    if isinstance(d_in, bool) or not isinstance(d_in, int) or d_in <= 0:
        raise UserError(f"Site {name!r} has d_in={d_in!r}; expected a positive integer width.")
    return d_in


def _normalise_spec(spec: dict) -> dict:
    """The spec as it will read back from JSON (tuples become lists...), so comparisons are exact."""
    if not isinstance(spec, dict):
        raise UserError(f"The store spec must be a dict describing the cache run; got {type(spec).__name__}.")
    try:
        return json.loads(json.dumps(spec, sort_keys=True, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise UserError(f"The store spec must be plain JSON (str/int/float/bool/None/list/dict); {e}.") from None
