"""Opening and verifying a store: every kind of damage is a UserError naming the file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sae_train.errors import UserError
from sae_train.store import ActivationStore
from tests.store_util import write_store

SHARD = "shard-r000-000001.safetensors"


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    write_store(tmp_path, 3)
    return tmp_path


def test_missing_dir_and_not_a_store(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        ActivationStore(tmp_path / "nope")
    with pytest.raises(UserError, match="not an activation store: it has no manifest.json. Create one with `sae-train"):
        ActivationStore(tmp_path)


def test_unknown_format_version(store_dir: Path) -> None:
    data = json.loads((store_dir / "manifest.json").read_text())
    (store_dir / "manifest.json").write_text(json.dumps({**data, "format_version": 7}))
    with pytest.raises(UserError, match="format_version 7"):
        ActivationStore(store_dir)


def test_truncated_shard(store_dir: Path) -> None:
    path = store_dir / SHARD
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(UserError, match=f"{SHARD} .*truncated"):
        ActivationStore(store_dir)


def test_missing_shard(store_dir: Path) -> None:
    (store_dir / SHARD).unlink()
    with pytest.raises(UserError, match=f"{SHARD}, listed in manifest.json, is missing"):
        ActivationStore(store_dir)


def test_flipped_byte_needs_checksums(store_dir: Path) -> None:
    path = store_dir / SHARD
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40  # in the tensor data: sizes and header still fine
    path.write_bytes(bytes(data))
    store = ActivationStore(store_dir)
    store.verify()
    with pytest.raises(UserError, match=f"{SHARD} .*sha256"):
        store.verify(checksums=True)


@pytest.mark.parametrize("offset, value", [(8, b"X"), (0, b"\xff\xff\xff\xff")], ids=["json", "length"])
def test_corrupt_header(store_dir: Path, offset: int, value: bytes) -> None:
    path = store_dir / SHARD
    data = bytearray(path.read_bytes())
    data[offset : offset + len(value)] = value
    path.write_bytes(bytes(data))
    store = ActivationStore(store_dir)  # same size: only the header check can tell
    with pytest.raises(UserError, match=f"{SHARD} is corrupt"):
        store.verify()
    with pytest.raises(UserError, match=f"{SHARD} is corrupt"):
        store.shard(1)


def test_header_that_disagrees_with_the_manifest(store_dir: Path) -> None:
    path = store_dir / SHARD
    data = path.read_bytes()
    patched = data.replace(b'"blocks.1.hook_mlp_out"', b'"blocks.1.hook_mlp_in_"')
    assert patched != data and len(patched) == len(data)
    path.write_bytes(patched)
    with pytest.raises(UserError, match=f"{SHARD} does not match .*holds tensors"):
        ActivationStore(store_dir).verify()


def test_malformed_manifest(store_dir: Path) -> None:
    (store_dir / "manifest.json").write_text("{not json")
    with pytest.raises(UserError, match="manifest.json is not valid JSON"):
        ActivationStore(store_dir)
    (store_dir / "manifest.json").write_text(json.dumps({"format_version": 1, "spec": {}}))
    with pytest.raises(UserError, match="manifest.json is malformed"):
        ActivationStore(store_dir)
