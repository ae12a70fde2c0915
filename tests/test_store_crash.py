"""Crash safety and concurrent ranks, with real processes: SIGKILL at chosen and random
instants, then resume; two ranks writing into one directory at once."""

from __future__ import annotations

import random
import signal
import time
from pathlib import Path

import torch

from sae_train.store import ActivationStore, StoreWriter
from sae_train.store.manifest import Manifest, load_json
from tests.store_util import SITES, SPEC, make_shard, snapshot, spawn_writer, write_store

N = 6


def check_valid(root: Path) -> list[int]:
    """The store opens, every listed shard is whole and holds exactly its content."""
    store = ActivationStore(root)
    store.verify(checksums=True)
    for i, info in enumerate(store.manifest.shards):
        acts, ids, pos = make_shard(info.index)
        got = store.shard(i)
        assert torch.equal(got["token_ids"], ids) and torch.equal(got["position"], pos)
        for site in SITES:
            assert torch.equal(got[site], acts[site].to(torch.bfloat16))
    return [s.index for s in store.manifest.shards]


def killed(root: Path, kill_at: tuple[str, str, int]) -> None:
    proc = spawn_writer(root, N, kill_at=kill_at)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"the tripwire {kill_at} never fired"


def reopen(root: Path) -> None:
    """Opening a writer cleans up after the crash: only the manifest's shards remain."""
    StoreWriter(root, SPEC, SITES, torch.bfloat16).close()
    files = {p.name for p in root.iterdir() if p.is_file()}
    assert files == {"manifest.json", *(s.file for s in ActivationStore(root).manifest.shards)}
    assert {p.name for p in (root / "manifest.d").iterdir()} == {"lock", "r000.lock", "r000.json"}


def listed(path: Path) -> list[int]:
    return [s.index for s in Manifest.from_json(load_json(path), path).shards]


def test_sigkill_anywhere_then_resume_is_byte_identical(tmp_path: Path) -> None:
    ref, root = tmp_path / "ref", tmp_path / "store"
    write_store(ref, N)

    # Mid-shard: the temp file of shard 0 holds the header and one tensor.
    killed(root, ("write", ".shard-r000-000000.safetensors.tmp", 3))
    assert (root / ".shard-r000-000000.safetensors.tmp").is_file()
    assert check_valid(root) == []
    reopen(root)

    # Shard 1 complete in its temp file, not yet renamed.
    killed(root, ("replace", ".shard-r000-000001.safetensors.tmp", 1))
    assert (root / ".shard-r000-000001.safetensors.tmp").is_file()
    assert check_valid(root) == [0]
    reopen(root)

    # Shard 1 renamed into place but not recorded in the rank's part: not in the store.
    killed(root, ("replace", ".r000.json.tmp", 1))
    assert (root / "shard-r000-000001.safetensors").is_file()
    assert check_valid(root) == [0]
    reopen(root)

    # Part updated, manifest.json not yet: readers still see the old union.
    killed(root, ("replace", ".manifest.json.tmp", 1))
    assert (root / ".manifest.json.tmp").is_file()
    assert listed(root / "manifest.d" / "r000.json") == [0, 1]
    assert check_valid(root) == [0]
    reopen(root)
    assert check_valid(root) == [0, 1]

    # Random instants, wherever they land.
    rng = random.Random(1234)
    for _ in range(2):
        proc = spawn_writer(root, N)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0, 0.02))  # picks an instant; correctness must not depend on it
        proc.kill()
        proc.wait(timeout=60)
        assert set(check_valid(root)) <= set(range(N))
        reopen(root)

    write_store(root, N)
    assert check_valid(root) == list(range(N))
    assert snapshot(root) == snapshot(ref)  # every file, manifest and parts included; no temp left


def test_two_ranks_writing_at_once_merge_into_one_manifest(tmp_path: Path) -> None:
    ref, root = tmp_path / "ref", tmp_path / "store"
    write_store(ref, N, rank=0, world_size=2)
    write_store(ref, N, rank=1, world_size=2)

    procs = [spawn_writer(root, N, rank=r, world_size=2, wait=True) for r in (0, 1)]
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    for p in procs:  # both writers are open: let them write at the same time
        p.stdin.write("go\n")
        p.stdin.flush()
    for p in procs:
        p.communicate(timeout=60)
        assert p.returncode == 0

    assert check_valid(root) == list(range(N))
    assert {s.rank for s in ActivationStore(root).manifest.shards} == {0, 1}
    assert snapshot(root) == snapshot(ref)
