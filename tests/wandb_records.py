"""Read back what W&B logged offline (wandb >= 0.19 has no Python reader for .wandb files).

A .wandb file is a 7-byte header followed by LevelDB-log framed blocks of 32 KiB holding
protobuf `Record`s; history records carry the logged metrics.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterator
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

_BLOCK, _HEADER = 32768, 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def records(path: Path) -> Iterator[pb.Record]:
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, pending = _HEADER, b""
    while pos + _HEADER <= len(data):
        if _BLOCK - pos % _BLOCK < _HEADER:  # block trailer too small for a header: padding
            pos += _BLOCK - pos % _BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        pos += _HEADER
        if kind == 0:
            return
        pending += data[pos : pos + length]
        pos += length
        if kind in (_FULL, _LAST):
            record = pb.Record()
            record.ParseFromString(pending)
            yield record
            pending = b""


def history(run_dir: Path) -> list[dict]:
    """Every logged history row of every offline run under `run_dir` (a wandb/ directory)."""
    rows = []
    for path in sorted(run_dir.glob("offline-run-*/run-*.wandb")):
        for record in records(path):
            if record.WhichOneof("record_type") == "history":
                rows.append(
                    {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
                )
    return rows


def run_ids(run_dir: Path) -> set[str]:
    """Run ids of the offline run directories: offline-run-<date>_<time>-<id>[-<n>] (wandb adds
    -<n> when two segments of a run start within the same second)."""
    return {re.match(r"offline-run-\d+_\d+-([^-]+)", p.name).group(1) for p in run_dir.glob("offline-run-*")}
