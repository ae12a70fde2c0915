"""Building and loading the C kernels where things go wrong: an unwritable cache, a broken
cached library, a compiler that refuses -march=native; and which builds "auto" uses.

Most tests compile with a stand-in compiler (a script copying the library this process
already built), so they run in milliseconds; the -march=native test compiles for real, once.
"""

from __future__ import annotations

import os
import shutil
import stat
import sys
import tempfile
from pathlib import Path

import pytest

from sae_train.sae import kernels
from sae_train.sae.kernels import build

pytestmark = pytest.mark.skipif(
    not kernels.available(), reason="kernels unavailable (no C compiler, or SAE_TRAIN_KERNELS=torch)"
)

SYMBOLS = list(kernels._SIGNATURES)


def _script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


@pytest.fixture
def env(tmp_path, monkeypatch):
    """A fresh cache (XDG_CACHE_HOME) and temporary directory (TMPDIR) for this test, and a
    stand-in compiler `fakecc` that writes a copy of the working library to its -o argument
    and logs each call's arguments to calls.log."""
    built = Path(kernels._lib_or_raise()._name)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    monkeypatch.delenv(build.CFLAGS_VAR, raising=False)
    log = tmp_path / "calls.log"
    cc = _script(
        tmp_path / "fakecc",
        f"""
[ "$1" = --version ] && {{ echo fakecc 1; exit 0; }}
echo "$@" >> {log}
while [ $# -gt 1 ]; do [ "$1" = -o ] && cp {built} "$2"; shift; done
""",
    )
    monkeypatch.setenv("CC", str(cc))
    return tmp_path


def _calls(tmp_path: Path) -> list[str]:
    log = tmp_path / "calls.log"
    return log.read_text().splitlines() if log.exists() else []


def _unwritable(tmp_path: Path) -> Path:
    """A cache directory that cannot be created: read-only for a normal user; root ignores
    permissions, so under a regular file there."""
    if os.geteuid() != 0:
        ro = tmp_path / "readonly"
        ro.mkdir()
        ro.chmod(0o555)
        return ro / "cache"
    (tmp_path / "a-file").write_text("")
    return tmp_path / "a-file" / "cache"


def _name() -> str:
    return build.library_name(os.environ["CC"], "fakecc 1\n")


def test_unwritable_cache_falls_back_to_the_temporary_directory(env, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(_unwritable(env)))
    lib = build.load(SYMBOLS)
    fallback = env / "tmp" / f"sae_train-{os.getuid()}" / "kernels" / _name()
    assert Path(lib._name) == fallback and lib.sae_vector_width() >= 1
    assert len(_calls(env)) == 1
    build.load(SYMBOLS)  # the next process finds it there: no second build
    assert len(_calls(env)) == 1


def test_an_intact_library_in_a_read_only_cache_is_used(env, monkeypatch):
    """A cache an administrator filled (read-only to users) is used as it is."""
    first = Path(build.load(SYMBOLS)._name)
    monkeypatch.setattr(build, "compile_to", lambda *a: pytest.fail("rebuilt an intact library"))
    assert Path(build.load(SYMBOLS)._name) == first


def test_no_writable_directory_warns_once_naming_them_and_the_variable(env, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(_unwritable(env)))
    monkeypatch.setattr(tempfile, "tempdir", str(_unwritable(env / "tmp")))
    monkeypatch.setattr(kernels, "_lib", None)
    monkeypatch.setattr(kernels, "_load_failed", False)
    with pytest.warns(RuntimeWarning) as record:
        assert not kernels.available() and not kernels.available()
    assert len(record) == 1
    message = str(record[0].message)
    assert "XDG_CACHE_HOME" in message and str(build.cache_dirs()[0]) in message and "falling back" in message


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "other-architecture"])
def test_a_broken_cached_library_is_rebuilt(env, damage):
    target = build.cache_dirs()[0] / _name()
    target.parent.mkdir(parents=True)
    good = Path(kernels._lib_or_raise()._name).read_bytes()
    broken = {
        "truncated": good[: len(good) // 2],  # dlopen accepts it, the first call dies of SIGBUS
        "garbage": os.urandom(len(good)),
        "empty": b"",
        "other-architecture": good[:18] + (183 if good[18] != 183 else 62).to_bytes(2, "little") + good[20:],
    }[damage]
    target.write_bytes(broken)
    lib = build.load(SYMBOLS)
    assert Path(lib._name) == target and target.read_bytes() == good and len(_calls(env)) == 1
    assert [p.name for p in target.parent.iterdir()] == [target.name]  # no temporary left behind


def test_intact_sees_truncation_anywhere(tmp_path):
    good = Path(kernels._lib_or_raise()._name)
    data = good.read_bytes()
    assert build.intact(good)
    for cut in (10, 64, len(data) // 3, len(data) - 1):
        (tmp_path / "part.so").write_bytes(data[:cut])
        assert not build.intact(tmp_path / "part.so"), cut


def test_a_compiler_refusing_march_native_still_gives_a_vectorised_build(tmp_path, monkeypatch):
    """Compiles for real, through a wrapper that rejects -march=native as some compilers do."""
    real = shutil.which(os.environ.get("CC", "cc"))
    log = tmp_path / "calls.log"
    cc = _script(
        tmp_path / "picky-cc",
        f"""
[ "$1" = --version ] || echo "$@" >> {log}
for a in "$@"; do
  [ "$a" = -march=native ] && {{ echo "error: unknown target CPU 'native'" >&2; exit 1; }}
done
exec {real} "$@"
""",
    )
    monkeypatch.setenv("CC", str(cc))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv(build.CFLAGS_VAR, raising=False)
    lib = build.load(SYMBOLS)
    second = build.target_flag_sets()[1]  # the CPU's extensions by name, or none
    calls = [c.split() for c in _calls(tmp_path)]
    assert len(calls) == 2 and "-march=native" in calls[0] and "-march=native" not in calls[1]
    assert f" {' '.join(second)} " in f" {' '.join(calls[1])} "
    assert (lib.sae_vector_width() >= kernels.MIN_WIDTH) == bool(second)
    if "avx512f" in build.cpu_flags().split():
        assert lib.sae_vector_width() == 16  # the AVX-512 path, by named extensions


def test_a_compiler_failing_every_target_reports_each_attempt(env, monkeypatch):
    cc = _script(
        env / "broken-cc", '[ "$1" = --version ] && { echo broken 1; exit 0; }\necho "no such luck" >&2; exit 1\n'
    )
    monkeypatch.setenv("CC", str(cc))
    with pytest.raises(RuntimeError, match="no such luck") as err:
        build.load(SYMBOLS)
    assert str(err.value).count("$ ") == len(build.target_flag_sets())
    assert not any(build.cache_dirs()[0].iterdir())  # nothing half-written left


def test_ranks_building_at_once_each_load_a_whole_library(env):
    """Four processes start on an empty cache at once, with a compiler that writes its output
    in two halves a moment apart: none may load (or crash on) a half-written file."""
    import subprocess

    built = Path(kernels._lib_or_raise()._name)
    half = built.stat().st_size // 2
    _script(
        env / "fakecc",
        f"""
[ "$1" = --version ] && {{ echo fakecc 1; exit 0; }}
while [ $# -gt 1 ]; do
  if [ "$1" = -o ]; then head -c {half} {built} > "$2"; sleep 0.5; tail -c +{half + 1} {built} >> "$2"; fi
  shift
done
""",
    )
    code = (  # build.py by path: importing the package would import torch, seconds per process here
        f"import importlib.util as u; s = u.spec_from_file_location('build', {build.__file__!r}); b = u.module_from_spec(s); "
        f"s.loader.exec_module(b); print(b.load({SYMBOLS!r}).sae_vector_width())"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-500:] for _, err in outs]
    assert {out.strip() for out, _ in outs} == {str(kernels._width)}
    target = build.cache_dirs()[0] / _name()
    assert target.read_bytes() == built.read_bytes() and [p.name for p in target.parent.iterdir()] == [target.name]


@pytest.mark.parametrize(
    "flags, expected",
    [
        (
            "flags : fpu sse2 avx avx2 fma f16c avx512f avx512bw avx512vl avx512dq",
            [
                ["-march=native"],
                ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"],
                [],
            ],
        ),
        ("flags : fpu sse2 avx avx2 fma f16c", [["-march=native"], ["-mavx2", "-mfma", "-mf16c"], []]),
        ("flags : fpu sse2 avx", [["-march=native"], []]),  # no AVX2+FMA: nothing worth naming
        ("Features : fp asimd evtstrm aes crc32", [["-march=native"], []]),  # Arm
    ],
)
def test_target_flags_follow_the_cpu(flags, expected):
    assert build.target_flag_sets(flags) == expected


@pytest.mark.parametrize(
    "width, mode, used",
    [
        (16, "auto", True),
        (8, "auto", True),
        (4, "auto", False),
        (1, "auto", False),
        (4, "c", True),
        (16, "torch", False),
    ],
)
def test_auto_uses_only_builds_with_wide_vectors(monkeypatch, width, mode, used):
    monkeypatch.setattr(kernels, "_width", width)
    monkeypatch.setenv(kernels.ENV_VAR, mode)
    assert kernels.available() == used
    assert kernels.describe().startswith("C kernels" if used else "PyTorch")


@pytest.mark.skipif(
    sys.platform != "linux" or not {"avx2", "fma"} <= set(build.cpu_flags().split()),
    reason="needs an x86 CPU with AVX2 and FMA",
)
def test_an_sse_only_build_keeps_to_pytorch(tmp_path):
    """A real build without AVX2 reports 4-float vectors, and "auto" then uses PyTorch (the
    AVX2 build, reporting 8, is test_sae_kernels.py's portable-build test)."""
    import subprocess

    res = subprocess.run(
        [
            sys.executable,
            "-c",
            "from sae_train.sae import kernels; print(kernels._lib_or_raise().sae_vector_width(), kernels.available(), kernels.describe())",
        ],
        env={**os.environ, build.CFLAGS_VAR: "-mno-avx2", "XDG_CACHE_HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        check=True,
    )
    width, used, why = res.stdout.split(" ", 2)
    assert width == "4" and used == "False" and why.startswith("PyTorch (the C build has 4-float vectors")
