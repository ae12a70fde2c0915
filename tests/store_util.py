"""Helpers for the store tests: deterministic shard content, directory snapshots, syscall
tripwires, and a writer that runs as a child process (`python tests/store_util.py ...`).

Shard `index` holds SIZES[index] rows; row r is tagged token_ids=index, position=r, so
every row in a store has a unique (token_id, position) tag.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from sae_train.store import StoreWriter, shardfile

SITES = {"blocks.0.hook_resid_post": 8, "blocks.1.hook_mlp_out": 4}
SPEC = {"model": {"name": "toy", "revision": "r1", "dtype": "float32"}, "context_size": 16, "seed": 0}
SIZES = [7, 13, 1, 20, 9, 16, 5, 11, 3, 14, 8, 2]  # uneven on purpose
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
HERE = Path(__file__).resolve()


def make_shard(index: int) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    n = SIZES[index % len(SIZES)]
    g = torch.Generator().manual_seed(index)
    acts = {site: torch.randn(n, d, generator=g) * 4 for site, d in SITES.items()}
    return acts, torch.full((n,), index, dtype=torch.int32), torch.arange(n, dtype=torch.int32)


def write_store(
    root: Path, n_shards: int, dtype: torch.dtype = torch.bfloat16, *, rank: int = 0, world_size: int = 1
) -> None:
    with StoreWriter(root, SPEC, SITES, dtype, rank=rank, world_size=world_size) as w:
        for i in range(rank, n_shards, world_size):
            if i not in w.done:
                w.write_shard(i, *make_shard(i))


def overwrite_rows(path: Path, site: str, rows: range, value: float) -> None:
    """Set rows of a float32 site in a shard file to `value` in place, as damage on disk would
    (same size, so the store still opens; the sha256 no longer matches)."""
    entry = shardfile.read_header(path)[site]
    d_in = entry.shape[1]
    with open(path, "r+b") as f:
        f.seek(entry.start + rows.start * d_in * 4)
        f.write(np.full((len(rows), d_in), value, dtype=np.float32).tobytes())


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under root (hidden ones included) by relative path."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def tags(batch: dict[str, torch.Tensor]) -> list[tuple[int, int]]:
    return list(zip(batch["token_ids"].tolist(), batch["position"].tolist()))


class Tripwire:
    """Calls `action` just before the `occurrence`-th os.<op> touching a path containing
    `pattern` (op: write, fsync, replace). Installs itself by patching `os`; `setattr` lets a
    test route the patching through pytest's monkeypatch so it is undone afterwards."""

    def __init__(
        self,
        op: str,
        pattern: str,
        occurrence: int,
        action: Callable[[], None],
        setattr: Callable[[object, str, object], None] = setattr,
    ) -> None:
        self.op, self.pattern, self.occurrence, self.action = op, pattern, occurrence, action
        self.count, self.paths = 0, {}
        real = {name: getattr(os, name) for name in ("open", "write", "fsync", "replace")}

        def opened(path, *args, **kwargs):
            fd = real["open"](path, *args, **kwargs)
            self.paths[fd] = os.fspath(path)
            return fd

        setattr(os, "open", opened)
        setattr(os, "write", lambda fd, data: self._check("write", self.paths.get(fd, ""), real["write"], fd, data))
        setattr(os, "fsync", lambda fd: self._check("fsync", self.paths.get(fd, ""), real["fsync"], fd))
        setattr(os, "replace", lambda src, dst: self._check("replace", os.fspath(src), real["replace"], src, dst))

    def _check(self, op: str, path: str, fn: Callable, *args: object) -> object:
        if op == self.op and self.pattern in path:
            self.count += 1
            if self.count == self.occurrence:
                self.action()
        return fn(*args)


def spawn_writer(
    root: Path,
    n_shards: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    kill_at: tuple[str, str, int] | None = None,
    wait: bool = False,
) -> subprocess.Popen:
    """Start a child that writes its shards of 0..n_shards-1 into root (resuming), printing
    "ready" once the writer is open; with wait=True it then waits for a line on stdin."""
    cmd = [sys.executable, str(HERE), str(root), str(n_shards), str(rank), str(world_size)]
    if kill_at:
        cmd += ["--kill-at", *map(str, kill_at)]
    if wait:
        cmd.append("--wait")
    return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def _child() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("root", type=Path)
    p.add_argument("n_shards", type=int)
    p.add_argument("rank", type=int)
    p.add_argument("world_size", type=int)
    p.add_argument("--kill-at", nargs=3)
    p.add_argument("--wait", action="store_true")
    a = p.parse_args()
    if a.kill_at:
        op, pattern, occurrence = a.kill_at
        Tripwire(op, pattern, int(occurrence), lambda: os.kill(os.getpid(), signal.SIGKILL))
    with StoreWriter(a.root, SPEC, SITES, torch.bfloat16, rank=a.rank, world_size=a.world_size) as w:
        print("ready", flush=True)
        if a.wait:
            sys.stdin.readline()
        for i in range(a.rank, a.n_shards, a.world_size):
            if i not in w.done:
                w.write_shard(i, *make_shard(i))


if __name__ == "__main__":
    _child()
