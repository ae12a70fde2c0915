"""One shard file: a plain safetensors file, encoded here so its bytes are deterministic and
read back as zero-copy mmap views.

Layout (the safetensors spec): u64 little-endian header length, a JSON header padded with
spaces to a multiple of 8 bytes, then the tensors' raw bytes back to back. Tensors are laid
out by decreasing element size, then name (what `safetensors` itself does), so every tensor
starts aligned to its element size and numpy/torch can view it in place.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from math import prod
from pathlib import Path

import numpy as np
import torch

from sae_train.errors import UserError

# safetensors dtype code -> (torch dtype, numpy dtype used to view the bytes)
CODES: dict[str, tuple[torch.dtype, np.dtype]] = {
    "BF16": (torch.bfloat16, np.dtype(np.int16)),  # numpy has no bfloat16: view as int16
    "F16": (torch.float16, np.dtype(np.float16)),
    "F32": (torch.float32, np.dtype(np.float32)),
    "I32": (torch.int32, np.dtype(np.int32)),
}
CODE_OF: dict[torch.dtype, str] = {dt: code for code, (dt, _) in CODES.items()}
_MAX_HEADER = 100 * 2**20  # safetensors' own limit; guards against reading garbage lengths
FIX_HINT = (
    "Delete the file and rerun the same `sae-train cache` command: it rewrites missing or "
    "truncated shards and leaves the others alone."
)


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives in a shard file (absolute byte offsets)."""

    code: str
    shape: tuple[int, ...]
    start: int
    end: int


def encode(tensors: Mapping[str, torch.Tensor]) -> Iterator[memoryview | bytes]:
    """Yield the file's bytes: the header, then each tensor's buffer (no copies of the data)."""
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in order:
        t = tensors[name]
        size = t.numel() * t.element_size()
        header[name] = {"dtype": CODE_OF[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    yield struct.pack("<Q", len(raw)) + raw
    for name in order:
        t = tensors[name].contiguous()
        if t.dtype == torch.bfloat16:
            t = t.view(torch.int16)
        yield memoryview(t.numpy().reshape(-1).view(np.uint8))  # type: ignore[arg-type]  # ndarray is a buffer


def read_header(path: Path) -> dict[str, TensorEntry]:
    """Parse and check a shard's header; UserError naming the file if it is not sound."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise _corrupt(path, f"only {size} bytes, too short for a safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, _MAX_HEADER):
                raise _corrupt(path, f"header length {n} does not fit in the {size}-byte file")
            raw = f.read(n)
    except FileNotFoundError:
        raise UserError(f"Shard {path} is missing. Rerun the same `sae-train cache` command to rewrite it.") from None
    try:
        header = json.loads(raw)
        header.pop("__metadata__", None)
        entries = {
            name: TensorEntry(
                e["dtype"],
                tuple(int(s) for s in e["shape"]),
                8 + n + int(e["data_offsets"][0]),
                8 + n + int(e["data_offsets"][1]),
            )
            for name, e in header.items()
        }
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as err:
        raise _corrupt(path, f"unreadable header ({type(err).__name__}: {err})") from None
    cursor = 8 + n
    for name, e in sorted(entries.items(), key=lambda kv: kv[1].start):
        if e.code not in CODES:
            raise _corrupt(path, f"tensor {name!r} has unsupported dtype {e.code!r}")
        expected = prod(e.shape) * CODES[e.code][1].itemsize
        if e.start != cursor or e.end - e.start != expected:
            raise _corrupt(path, f"tensor {name!r} has inconsistent data offsets")
        cursor = e.end
    if cursor != size:
        raise _corrupt(path, f"the tensors cover {cursor} bytes but the file has {size}")
    return entries


def open_tensors(path: Path, entries: Mapping[str, TensorEntry]) -> dict[str, torch.Tensor]:
    """Zero-copy views of a shard's tensors over one copy-on-write mmap of the file.

    Copy-on-write (`mode="c"`) makes the views writable for torch, yet nothing a caller does
    to them can ever reach the file. The kernel is asked to start reading the whole file now:
    shuffled reads touch all of it soon, and random page faults on a cold disk are slow.
    """
    if hasattr(os, "posix_fadvise"):  # Linux; elsewhere pages simply come in on first touch
        with open(path, "rb") as f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_WILLNEED)
    mm = np.memmap(path, dtype=np.uint8, mode="c")
    out = {}
    for name, e in entries.items():
        dtype, np_dtype = CODES[e.code]
        t = torch.from_numpy(mm[e.start : e.end].view(np_dtype).reshape(e.shape))
        out[name] = t.view(dtype) if dtype == torch.bfloat16 else t
    return out


def _corrupt(path: Path, what: str) -> UserError:
    return UserError(f"Shard {path} is corrupt: {what}. {FIX_HINT}")
