"""Kill torture: SIGKILL a `sae-train` command at random instants, rerun it, and check that
what it leaves equals an uninterrupted run's.

A torture of one scenario (`cache` or `train`) draws every kill instant from
`random.Random(seed)`, uniform from the start of the process over a window sized from the
uninterrupted reference run (`kill_window`) so that a chain of kills, each followed by the
same command that may itself be killed, covers the whole run on average and ends in a run
that completes. A run that completes before its kill instant is
compared with the reference and the chain starts over from nothing. After each kill the
output must already be valid (a store of whole shards, a loadable checkpoint), and where the
kill landed is read from what it left: a shard or checkpoint half written. The seed fixes the
instants; where they land also depends on the machine's speed.

Starting Python, torch and transformers costs seconds per command, more than the commands
themselves, so every run is a fork of a warm `multiprocessing` forkserver that has imported
the CLI: each run is a fresh process running `sae_train.cli.main()` with the command's
arguments, and 20 kills cost about what 20 partial runs cost.

Used by tests/test_faults.py (one seed per scenario, in CI) and by
benchmarks/kill_torture.py (N seeds).
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import random
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from sae_train.atomic import previous
from sae_train.data.sources import stdlib_root
from sae_train.sae import checkpoint as ckpt
from sae_train.store import ActivationStore


def _run_cli(argv: list[str], log: str) -> None:
    """The forked child: `sae-train <argv>` with stdout and stderr appended to `log`."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    from sae_train import cli

    sys.argv = ["sae-train", *argv]
    cli.main()


def _warm() -> None:
    """What every run would import anyway, done once at import: the forkserver preloads this
    module, so its forks start warm."""
    import transformers.models.llama.modeling_llama  # noqa: F401  (the tiny model's family)

    from sae_train import cli
    from sae_train.sae import kernels

    cli._stages()
    kernels.available()  # builds (once, cached on disk) and loads the C kernels


_warm()


class Launcher:
    """Runs CLI commands as forks of one warm forkserver process."""

    def __init__(self, log: Path) -> None:
        self.log = log
        self._ctx = multiprocessing.get_context("forkserver")
        self._ctx.set_forkserver_preload([__name__])
        warm = self._ctx.Process(target=time.sleep, args=(0,))  # starts the server: its imports are not a run's
        warm.start()
        warm.join()

    def start(self, argv: list[str]) -> multiprocessing.process.BaseProcess:
        proc = self._ctx.Process(target=_run_cli, args=(argv, str(self.log)))
        proc.start()
        return proc

    def run(self, argv: list[str], timeout: float = 300) -> float:
        """Run to completion; returns its wall time. Raises on failure (log included)."""
        started = time.perf_counter()
        proc = self.start(argv)
        proc.join(timeout)
        if proc.exitcode != 0:
            if proc.exitcode is None:
                proc.kill()
                proc.join()
            raise AssertionError(f"sae-train {' '.join(argv)} exited with {proc.exitcode}:\n{self.tail()}")
        return time.perf_counter() - started

    def tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


@dataclass
class Scenario:
    """A command to torture: how to run it, where kills land, what must hold after each kill,
    and what must equal the uninterrupted run at the end."""

    name: str
    argv: Callable[[Path], list[str]]
    """Output directory -> the command's arguments."""
    staging: Callable[[Path], dict[str, tuple[int, int]]]
    """Half-written files of the output (path -> (inode, mtime)), to tell where a kill landed."""
    landed: Callable[[dict[str, tuple[int, int]]], str]
    """Where a kill landed, from the half-written files that the killed run itself left."""
    check: Callable[[Path], None]
    """Raises unless the output is valid as a killed run left it (before any rerun tidies)."""
    result: Callable[[Path], dict[str, object]]
    """What must be identical to the uninterrupted run's."""


@dataclass
class Report:
    scenario: str
    seed: int
    kills: int = 0
    completions: int = 0
    """Runs that finished before their kill instant (each compared with the reference)."""
    landed: Counter = field(default_factory=Counter)
    different: list[str] = field(default_factory=list)
    """What differed from the uninterrupted run (files, tensors), over every completed run."""
    seconds: float = 0.0

    @property
    def identical(self) -> bool:
        return not self.different

    def line(self) -> str:
        where = ", ".join(f"{k} {v}" for k, v in sorted(self.landed.items()))
        outcome = "identical" if self.identical else f"DIFFERENT: {self.different[:5]}"
        return (
            f"{self.scenario} seed {self.seed}: {self.kills} kills ({where}), "
            f"{self.completions} early completions, {outcome}, {self.seconds:.1f} s"
        )


def _new_entries(before: dict, after: dict) -> dict:
    return {path: stat for path, stat in after.items() if before.get(path) != stat}


@dataclass
class Reference:
    """An uninterrupted run: what it left and how long it took."""

    path: Path
    expected: dict[str, object]
    duration: float
    startup: float
    """Time of the same command rerun on its finished output (start-up only)."""


def reference(scenario: Scenario, launcher: Launcher, ref: Path) -> Reference:
    """Run the command twice into `ref` and once more into a second directory: a rerun of a
    finished command must change nothing, and two uninterrupted runs must agree. The faster
    full run sets the duration (a busy machine only slows one down)."""
    again = ref.with_name(ref.name + "-again")
    for path in (ref, again):
        shutil.rmtree(path, ignore_errors=True)
    duration = launcher.run(scenario.argv(ref))
    expected = scenario.result(ref)
    startup = launcher.run(scenario.argv(ref))
    duration = min(duration, launcher.run(scenario.argv(again)))
    for path, what in ((ref, "rerunning a finished command changed"), (again, "a second uninterrupted run differs in")):
        changed = differences(scenario.result(path), expected)
        if changed:
            raise AssertionError(f"{scenario.name}: {what} {changed}")
    shutil.rmtree(again)
    return Reference(ref, expected, duration, startup)


def kill_window(startup: float, work: float, kills: int) -> float:
    """The span after a run's start that its kill instant is drawn from, uniformly: its start-up
    `s` plus `w` of work, where w solves w^2 / (2 (s + w)) = work / kills (the mean of
    max(0, instant - s)), so that on average a chain of `kills` runs covers the work once."""
    s, share = startup, work / kills
    return s + share + math.sqrt(share * share + 2 * share * s)


def torture(scenario: Scenario, launcher: Launcher, ref: Reference, out: Path, seed: int, kills: int = 20) -> Report:
    """`kills` kills of the command writing into `out` (emptied first), each followed by a rerun."""
    started = time.perf_counter()
    report = Report(scenario.name, seed)
    shutil.rmtree(out, ignore_errors=True)
    expected = ref.expected
    # The machine's speed drifts (other jobs): time the start-up again and scale the work with it.
    startup = launcher.run(scenario.argv(ref.path))
    window = kill_window(startup, max(ref.duration - ref.startup, 0.0) * startup / ref.startup, kills)
    rng = random.Random(seed)
    while report.kills < kills:
        before = scenario.staging(out)
        proc = launcher.start(scenario.argv(out))
        proc.join(rng.uniform(0, window))  # the kill instant, unless the run ends first
        if proc.exitcode is None:
            proc.kill()
            proc.join()
            report.kills += 1
            report.landed[scenario.landed(_new_entries(before, scenario.staging(out)))] += 1
            scenario.check(out)
            continue
        if proc.exitcode != 0:
            raise AssertionError(f"{scenario.name}: a rerun exited with {proc.exitcode}:\n{launcher.tail()}")
        report.completions += 1
        report.different += differences(scenario.result(out), expected)
        shutil.rmtree(out)
    launcher.run(scenario.argv(out))
    report.different += differences(scenario.result(out), expected)
    report.seconds = time.perf_counter() - started
    return report


def differences(got: dict[str, object], expected: dict[str, object]) -> list[str]:
    """The keys whose values differ (tensors: dtype and every bit), missing or extra."""
    out = sorted(set(got) ^ set(expected))
    for key in sorted(set(got) & set(expected)):
        value, other = expected[key], got[key]
        if isinstance(value, torch.Tensor):
            if not (isinstance(other, torch.Tensor) and other.dtype == value.dtype and torch.equal(other, value)):
                out.append(key)
        elif other != value:
            out.append(key)
    return out


def _stats(paths: list[Path], root: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for path in paths:
        try:
            st = path.stat()
        except FileNotFoundError:  # pragma: no cover - listed, then removed by a run still tidying
            continue
        out[str(path.relative_to(root))] = (st.st_ino, st.st_mtime_ns)
    return out


# ---- the cache scenario ---------------------------------------------------------------------
CORPUS = ["difflib.py", "textwrap.py", "heapq.py", "bisect.py", "colorsys.py", "shlex.py", "fnmatch.py", "glob.py"]
"""Standard-library files the cache scenario reads: a few files, so that every rerun's start-up
(finding and tokenizing the text it skips) stays short, unlike a walk of the whole library."""


def write_corpus(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name in CORPUS:
        shutil.copyfile(stdlib_root() / name, directory / name)
    return directory


def cache_scenario(model_dir: Path, corpus: Path) -> Scenario:
    """A 32-shard cache run of a tiny model, two sites, over the files in `corpus`."""

    def argv(out: Path) -> list[str]:
        return [
            "cache",
            f"model.name={model_dir}",
            "model.dtype=float32",
            "model.device=cpu",
            "data.source=files",
            f"data.path={corpus}",
            "sites=[blocks.2.hook_resid_post,blocks.1.hook_mlp_out]",
            "n_tokens=16384",
            "text.context_size=32",
            "tokens_per_shard=512",
            "batch_size=64",
            f"out_dir={out}",
            "progress=false",
        ]

    def staging(out: Path) -> dict[str, tuple[int, int]]:
        if not out.is_dir():
            return {}
        return _stats([p for p in out.rglob("*") if p.name.endswith(".tmp")] + list(out.glob("shard-*")), out)

    def landed(new: dict[str, tuple[int, int]]) -> str:
        names = [Path(p).name for p in new]
        if any(n.startswith(".shard-") for n in names):
            return "mid-shard"
        if any(n.endswith(".json.tmp") for n in names):
            return "mid-manifest"
        if any(n.startswith("shard-") for n in names):
            return "shard-unlisted"  # published, not yet in the manifest: rerun rewrites it
        return "between-writes"

    def check(out: Path) -> None:
        if (out / "manifest.json").exists():
            ActivationStore(out).verify(checksums=True)

    def result(out: Path) -> dict[str, object]:
        return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}

    return Scenario("cache", argv, staging, landed, check, result)


# ---- the training scenario ------------------------------------------------------------------
def train_scenario(store: Path) -> Scenario:
    """Two SAEs of a sweep trained together on a synthetic store, a checkpoint every 4 steps."""

    def argv(out: Path) -> list[str]:
        return [
            "train",
            f"store={store}",
            f"out_dir={out}",
            "dtype=float32",
            "device=cpu",
            "progress=false",
            "sae=topk",
            "sae.expansion_factor=4",
            "+sweep.k=[4,8]",
            "n_tokens=16384",
            "batch_size=256",
            "checkpoint_every_tokens=1024",
            "log_every=1",
            "init_tokens=2048",
        ]

    def staging(out: Path) -> dict[str, tuple[int, int]]:
        if not out.is_dir():
            return {}
        paths = [p for p in out.rglob("*") if p.name.endswith((".tmp", ".prev"))]
        return _stats(paths, out)

    def landed(new: dict[str, tuple[int, int]]) -> str:
        return "mid-checkpoint" if new else "between-checkpoints"

    def check(out: Path) -> None:
        """The committed checkpoint loads, reading (not repairing) what the kill left."""
        state = ckpt.read_run_state(out)
        if state is None:
            return
        for tag in state["saes"]:
            directory = out / tag
            candidates = [directory, previous(directory)]
            found = [
                d
                for d in candidates
                if (d / ckpt.TRAINER_STATE_FILE).exists()
                and json.loads((d / ckpt.TRAINER_STATE_FILE).read_text())["step"] == state["step"]
            ]
            assert found, f"{tag}: no checkpoint of the committed step {state['step']}"
            ckpt.read_training_state(found[0])

    def result(out: Path) -> dict[str, object]:
        state = json.loads((out / ckpt.RUN_STATE_FILE).read_text())
        got: dict[str, object] = {"state": {k: state[k] for k in ("step", "tokens", "position", "saes")}}
        for tag in state["saes"]:
            tensors, optimizer, _ = ckpt.read_training_state(out / tag)
            got |= {f"{tag}/{k}": v for k, v in tensors.items()}
            got |= {f"{tag}/inference/{k}": v for k, v in load_file(str(out / tag / "sae.safetensors")).items()}
            for index, moments in optimizer["state"].items():
                got |= {f"{tag}/adam/{index}/{k}": v for k, v in moments.items()}
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        got["logged"] = [(row["step"], row["sae"]) for row in rows]  # each step once, in order
        leftovers = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.name.endswith((".tmp", ".prev")))
        got["leftovers"] = leftovers
        return got

    return Scenario("train", argv, staging, landed, check, result)
