"""The writer: round trip, manifest, refusal of bad input, full disk."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import safetensors.torch
import torch

from sae_train.errors import UserError
from sae_train.store import ActivationStore, StoreWriter, merge_manifests
from tests.store_util import DTYPES, SITES, SIZES, SPEC, Tripwire, make_shard, snapshot, write_store


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_round_trip_every_dtype(tmp_path: Path, dtype: torch.dtype) -> None:
    write_store(tmp_path, 5, dtype)
    store = ActivationStore(tmp_path)
    store.verify(checksums=True)
    assert store.n_tokens == sum(SIZES[:5]) and store.n_shards == 5
    assert {s.name: (s.d_in, s.torch_dtype) for s in store.sites.values()} == {k: (d, dtype) for k, d in SITES.items()}
    for i in range(5):
        acts, ids, pos = make_shard(i)
        got = store.shard(i)
        assert set(got) == {*SITES, "token_ids", "position"}
        for site in SITES:
            assert got[site].dtype == dtype and torch.equal(got[site], acts[site].to(dtype))
        assert torch.equal(got["token_ids"], ids) and torch.equal(got["position"], pos)
        # The files are plain safetensors: the reference loader agrees with our mmap views.
        ref = safetensors.torch.load_file(tmp_path / store.manifest.shards[i].file)
        assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)

    data = json.loads((tmp_path / "manifest.json").read_text())
    files = sorted(tmp_path.glob("shard-*.safetensors"))
    n_bytes = sum(f.stat().st_size for f in files)
    assert data["totals"] == {"n_tokens": sum(SIZES[:5]), "n_shards": 5, "n_bytes": n_bytes}
    assert data["spec"] == SPEC and data["format_version"] == 1
    assert [s["index"] for s in data["shards"]] == list(range(5))
    assert (tmp_path / "manifest.json").read_text() == json.dumps(data, sort_keys=True, indent=2) + "\n"


def test_views_are_zero_copy_and_never_write_the_file(tmp_path: Path) -> None:
    write_store(tmp_path, 1)
    store = ActivationStore(tmp_path)
    before = snapshot(tmp_path)
    view = store.shard(0)["blocks.0.hook_resid_post"]
    view.zero_()  # copy-on-write mapping: allowed, private to this process
    assert snapshot(tmp_path) == before
    assert not store.shard(0)["blocks.0.hook_resid_post"].eq(0).all()


def test_done_and_resume_skip_finished_shards(tmp_path: Path) -> None:
    with StoreWriter(tmp_path, SPEC, SITES, torch.float16) as w:
        assert w.done == set()
        for i in (0, 2):
            w.write_shard(i, *make_shard(i))
        assert w.done == {0, 2}
    (tmp_path / "shard-r000-000002.safetensors").write_bytes(b"trunc")  # damaged: not done any more
    with StoreWriter(tmp_path, SPEC, SITES, torch.float16) as w:
        assert w.done == {0}
        w.write_shard(2, *make_shard(2))
        assert w.done == {0, 2}
    ActivationStore(tmp_path).verify(checksums=True)


def test_resume_with_another_world_size_keeps_what_other_ranks_wrote(tmp_path: Path) -> None:
    for rank in (0, 1):
        write_store(tmp_path, 4, rank=rank, world_size=2)
    write_store(tmp_path, 6)  # one process now: writes 4 and 5 only
    shards = ActivationStore(tmp_path).manifest.shards
    assert [(s.index, s.rank) for s in shards] == [(0, 0), (1, 1), (2, 0), (3, 1), (4, 0), (5, 0)]
    with pytest.raises(UserError, match="no manifest.d/"):
        merge_manifests(tmp_path / "shard-r000-000000.safetensors")


def test_root_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "acts").write_text("x")
    with pytest.raises(UserError, match=r"acts exists and is a file"):
        StoreWriter(tmp_path / "acts", SPEC, SITES, torch.bfloat16)


def test_foreign_non_empty_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not an activation store"):
        StoreWriter(tmp_path, SPEC, SITES, torch.bfloat16)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_other_settings_are_refused_and_nothing_touched(tmp_path: Path) -> None:
    write_store(tmp_path, 2)
    before = snapshot(tmp_path)
    spec = {**SPEC, "model": {**SPEC["model"], "revision": "r2"}, "context_size": 32}
    sites = {**SITES, "blocks.1.hook_mlp_out": 5}
    with pytest.raises(UserError) as e:
        StoreWriter(tmp_path, spec, sites, torch.float16)
    msg = str(e.value)
    assert "spec.model.revision: stored 'r1' vs requested 'r2'" in msg
    assert "spec.context_size: stored 16 vs requested 32" in msg
    assert "sites.blocks.1.hook_mlp_out.d_in: stored 4 vs requested 5" in msg
    assert "sites.blocks.0.hook_resid_post.dtype: stored 'bfloat16' vs requested 'float16'" in msg
    assert "original settings" in msg and "new out_dir" in msg
    assert snapshot(tmp_path) == before


def test_same_rank_twice_is_refused(tmp_path: Path) -> None:
    with StoreWriter(tmp_path, SPEC, SITES, torch.bfloat16):
        with pytest.raises(UserError, match="already writing rank 0"):
            StoreWriter(tmp_path, SPEC, SITES, torch.bfloat16)
        StoreWriter(tmp_path, SPEC, SITES, torch.bfloat16, rank=1, world_size=2).close()


R, M = "blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"
BAD_SHARDS = {  # name: (damage to make_shard(0)'s (acts, token_ids, positions), expected message)
    "nan": (lambda a, i, p: a[M].__setitem__((3, 1), float("nan")), rf"'{M}' in shard 0 .*NaN or inf"),
    "inf": (lambda a, i, p: a[R].__setitem__((0, 0), float("-inf")), rf"'{R}' in shard 0 .*NaN or inf"),
    "d_in": (lambda a, i, p: a.__setitem__(R, torch.zeros(7, 9)), r"shape \(7, 9\); expected \(7, 8\)"),
    "rows": (lambda a, i, p: a.__setitem__(R, torch.zeros(6, 8)), r"shape \(6, 8\); expected \(7, 8\)"),
    "missing-site": (lambda a, i, p: a.pop(M), rf"have sites \['{R}'\]"),
    "extra-site": (lambda a, i, p: a.__setitem__("extra", torch.zeros(7, 2)), "Pass exactly the store's sites"),
    "positions-length": (lambda a, i, p: p.resize_(3), r"position for shard 0 .* 1-d integer tensor"),
    "negative-id": (lambda a, i, p: i.__setitem__(0, -5), r"token_ids for shard 0 .* \[0, 2\*\*31\)"),
}


@pytest.mark.parametrize("case", BAD_SHARDS)
def test_bad_shard_is_refused_and_nothing_written(tmp_path: Path, case: str) -> None:
    damage, message = BAD_SHARDS[case]
    w = StoreWriter(tmp_path, SPEC, SITES, torch.bfloat16)
    before = snapshot(tmp_path)
    acts, ids, pos = make_shard(0)
    damage(acts, ids, pos)
    with pytest.raises(UserError, match=message):
        w.write_shard(0, acts, ids, pos)
    assert snapshot(tmp_path) == before
    w.close()


def test_float16_overflow_is_named(tmp_path: Path) -> None:
    acts, ids, pos = make_shard(0)
    acts[R][1, 1] = 1e6
    with StoreWriter(tmp_path, SPEC, SITES, torch.float16) as w:
        with pytest.raises(UserError, match=f"'{R}' in shard 0 .*overflow torch.float16"):
            w.write_shard(0, acts, ids, pos)


def test_bad_writer_settings(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not supported"):
        StoreWriter(tmp_path, SPEC, SITES, torch.int8)
    with pytest.raises(UserError, match="reserved"):
        StoreWriter(tmp_path, SPEC, {"token_ids": 3}, torch.float32)
    with pytest.raises(UserError, match="positive integer"):
        StoreWriter(tmp_path, SPEC, {"a": 0}, torch.float32)
    with pytest.raises(UserError, match="plain JSON"):
        StoreWriter(tmp_path, {"x": object()}, SITES, torch.float32)
    with pytest.raises(UserError, match="outside world_size"):
        StoreWriter(tmp_path, SPEC, SITES, torch.float32, rank=2, world_size=2)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "op, pattern",
    [
        ("write", ".shard-r000-000002.safetensors.tmp"),
        ("fsync", ".shard-r000-000002.safetensors.tmp"),
        ("replace", ".shard-r000-000002.safetensors.tmp"),
        ("write", ".r000.json.tmp"),
        ("replace", ".r000.json.tmp"),
    ],
)
def test_full_disk_keeps_the_store_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, op: str, pattern: str
) -> None:
    w = StoreWriter(tmp_path, SPEC, SITES, torch.bfloat16)
    for i in range(2):
        w.write_shard(i, *make_shard(i))
    before = snapshot(tmp_path)

    def full() -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    Tripwire(op, pattern, 1, full, setattr=monkeypatch.setattr)
    with pytest.raises(UserError) as e:
        w.write_shard(2, *make_shard(2))
    monkeypatch.undo()
    msg = str(e.value)
    assert str(tmp_path) in msg and "disk is full" in msg
    assert "2 whole shard(s)" in msg and "rerun the same command" in msg
    assert snapshot(tmp_path) == before  # shards, parts, manifest: byte-identical, no temp file
    w.write_shard(2, *make_shard(2))  # once there is space again, writing goes on
    assert w.close().n_tokens == sum(SIZES[:3])


def test_full_disk_while_merging_keeps_manifest_and_recovers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    w = StoreWriter(tmp_path, SPEC, SITES, torch.bfloat16)
    w.write_shard(0, *make_shard(0))
    manifest = (tmp_path / "manifest.json").read_bytes()

    def full() -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    Tripwire("write", ".manifest.json.tmp", 1, full, setattr=monkeypatch.setattr)
    with pytest.raises(UserError, match="recorded in manifest.d/"):
        w.write_shard(1, *make_shard(1))
    monkeypatch.undo()
    assert (tmp_path / "manifest.json").read_bytes() == manifest
    assert not list(tmp_path.glob(".*.tmp"))
    assert ActivationStore(tmp_path).n_shards == 1
    assert merge_manifests(tmp_path).n_shards == 2  # the next merge picks the shard up
    w.close()
