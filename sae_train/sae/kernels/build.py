"""Compile sae_kernels.c on first use, cache the library, and load it robustly.

- Where: `$XDG_CACHE_HOME/sae_train/kernels` (default `~/.cache/...`); where that cannot be
  written (read-only home on HPC nodes, containers), a private `sae_train-<uid>/kernels` under
  the temporary directory (`$TMPDIR`). An intact library already in either is reused, so an
  administrator may pre-build into a read-only cache.
- Name: `sae_kernels-<key>.so`, the key hashing the source, the compiler and its version, the
  extra flags and the CPU's feature flags: a home directory shared by a heterogeneous cluster
  never loads a library built for another CPU.
- How: `-march=native` first; a compiler that rejects it gets the CPU's vector extensions by
  name (`-mavx2 -mfma`, AVX-512 where present), then no target flags at all (portable C).
  `SAE_TRAIN_CFLAGS` is appended to each attempt (`-mno-avx512f` forces the AVX2 build).
- Integrity: a build is written to a temporary name and renamed into place, so a concurrent
  rank sees the old file or the whole new one. A cached library that is truncated (which
  `dlopen` would survive, then crash on with SIGBUS), garbage, or for another architecture is
  rebuilt over.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from functools import partial
from pathlib import Path

from sae_train.atomic import write_atomic

CFLAGS_VAR = "SAE_TRAIN_CFLAGS"
SOURCE = Path(__file__).with_name("sae_kernels.c")
_BASE_FLAGS = ["-O3", "-fno-math-errno", "-shared", "-fPIC"]  # no errno: sqrtf vectorises
# /proc/cpuinfo flag -> the compiler flag enabling that extension (used when -march=native is refused)
_X86_ISA = {
    "avx2": "-mavx2",
    "fma": "-mfma",
    "f16c": "-mf16c",
    "avx512f": "-mavx512f",
    "avx512bw": "-mavx512bw",
    "avx512vl": "-mavx512vl",
    "avx512dq": "-mavx512dq",
    "avx512_bf16": "-mavx512bf16",
}


def cpu_flags() -> str:
    """The CPU's feature-flag line (x86 `flags`, Arm `Features`), or a platform description."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() + platform.machine()


def cache_dirs() -> list[Path]:
    """Where compiled libraries live, in order of preference."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    user = f"sae_train-{os.getuid()}" if hasattr(os, "getuid") else "sae_train"
    return [Path(base) / "sae_train" / "kernels", Path(tempfile.gettempdir()) / user / "kernels"]


def target_flag_sets(flags: str | None = None) -> list[list[str]]:
    """Target flags to try in order: -march=native, the CPU's x86 vector extensions by name
    (when it has AVX2 and FMA), none."""
    have = set((cpu_flags() if flags is None else flags).split())
    named = [flag for name, flag in _X86_ISA.items() if name in have] if {"avx2", "fma"} <= have else []
    return [["-march=native"], *([named] if named else []), []]


def _compiler() -> tuple[str, str]:
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        raise RuntimeError(f"no C compiler ({cc!r}) on PATH; install one (cc/gcc) or set CC")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    return cc, version


def _extra_flags() -> list[str]:
    return shlex.split(os.environ.get(CFLAGS_VAR, ""))


def library_name(cc: str, version: str) -> str:
    key = hashlib.sha256(
        "\0".join([SOURCE.read_text(), cc, version, " ".join(_BASE_FLAGS + _extra_flags()), cpu_flags()]).encode()
    ).hexdigest()[:20]
    return f"sae_kernels-{key}.so"


def intact(path: Path) -> bool:
    """Whether `path` holds a whole ELF file: every loadable segment and the section-header
    table lie within it (a truncated library passes `dlopen` and crashes on first use)."""
    try:
        data = path.read_bytes()
    except OSError:
        return False
    if sys.platform == "darwin":  # Mach-O: no cheap structural check; dlopen validates more
        return len(data) > 0
    if len(data) < 64 or data[:4] != b"\x7fELF" or data[4] not in (1, 2) or data[5] not in (1, 2):
        return False
    wide, end = data[4] == 2, "<" if data[5] == 1 else ">"
    if wide:
        phoff, shoff = struct.unpack_from(end + "QQ", data, 32)
        phentsize, phnum, shentsize, shnum = struct.unpack_from(end + "HHHH", data, 54)
    else:
        phoff, shoff = struct.unpack_from(end + "II", data, 28)
        phentsize, phnum, shentsize, shnum = struct.unpack_from(end + "HHHH", data, 42)
    if phoff + phnum * phentsize > len(data) or shoff + shnum * shentsize > len(data):
        return False
    for i in range(phnum):
        at = phoff + i * phentsize
        if wide:
            p_type, _, p_offset, _, _, p_filesz = struct.unpack_from(end + "IIQQQQ", data, at)
        else:
            p_type, p_offset, _, _, p_filesz = struct.unpack_from(end + "IIIII", data, at)
        if p_type == 1 and p_offset + p_filesz > len(data):  # PT_LOAD past the end
            return False
    return True


def _open(path: Path, symbols: Iterable[str]) -> ctypes.CDLL | None:
    """The library at `path` when it is intact, loads and exports every symbol; else None."""
    if not intact(path):
        return None
    try:
        lib = ctypes.CDLL(str(path))
        for name in symbols:
            getattr(lib, name)
    except (OSError, AttributeError):
        return None
    return lib


class _CompileFailed(Exception):
    pass


def _run_compiler(cmd: list[str], out: Path) -> None:
    res = subprocess.run([*cmd, "-o", str(out), "-lpthread", "-lm"], capture_output=True, text=True, timeout=300)
    if res.returncode != 0:
        raise _CompileFailed(f"$ {shlex.join(cmd)}\n{res.stderr.strip()[-2000:]}")


def compile_to(cc: str, target: Path) -> list[str]:
    """Compile the source into `target` (atomically), trying `target_flag_sets` in order.
    Returns the target flags that worked; raises RuntimeError with every compiler's complaint."""
    errors = []
    for arch in target_flag_sets():
        cmd = [cc, *_BASE_FLAGS, *arch, *_extra_flags(), str(SOURCE)]
        try:
            write_atomic(target, partial(_run_compiler, cmd), concurrent=True)
            return arch
        except _CompileFailed as exc:
            errors.append(str(exc))
    raise RuntimeError("the C compiler failed:\n" + "\n".join(errors))


def load(symbols: Iterable[str]) -> ctypes.CDLL:
    """The compiled kernels: an intact cached build if one loads, else a fresh build in the
    first cache directory that can be written. Raises RuntimeError saying why neither worked."""
    symbols = list(symbols)
    cc, version = _compiler()
    name = library_name(cc, version)
    dirs = cache_dirs()
    for d in dirs:
        lib = _open(d / name, symbols) if _private_enough(d) else None
        if lib is not None:
            return lib
    unwritable = []
    for d in dirs:
        try:
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
            if not _private_enough(d):
                raise PermissionError(f"{d.parent} belongs to another user")
            compile_to(cc, d / name)  # replaces a broken library of that name, atomically
        except OSError as exc:
            unwritable.append(f"{d} ({exc.strerror or exc})")
            continue
        lib = _open(d / name, symbols)
        if lib is None:
            raise RuntimeError(f"the freshly built {d / name} does not load")
        return lib
    raise RuntimeError(
        f"no writable directory for the compiled kernels: {'; '.join(unwritable)}. Set XDG_CACHE_HOME "
        f"(or TMPDIR) to a writable directory"
    )


def _private_enough(d: Path) -> bool:
    """The temporary-directory fallback is shared with other users: use it only when this user
    owns it (nobody else could have planted a library there)."""
    if d == cache_dirs()[0] or not hasattr(os, "getuid"):
        return True
    try:
        return d.parent.stat().st_uid == os.getuid()
    except FileNotFoundError:
        return True  # created by us (mode 0700) before use
    except OSError:
        return False
