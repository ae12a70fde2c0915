"""Faults, with fixed seeds: SIGKILL at random instants (cache and training), a DDP rank killed
or hung, a full disk during a checkpoint. Each ends in a rerun of the same command that gives
what an uninterrupted run gives. `python benchmarks/kill_torture.py --seeds N` runs the
kill torture for more seeds."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

from sae_train.atomic import previous, temporary
from sae_train.errors import UserError
from sae_train.sae import SAEConfig
from sae_train.sae import checkpoint as ckpt
from sae_train.train import TrainConfig, run
from tests import torture
from tests.test_train_ddp import ENV, train_cmd

KILLS = 20


@pytest.fixture(scope="module")
def launcher(tmp_path_factory) -> torture.Launcher:
    return torture.Launcher(tmp_path_factory.mktemp("torture") / "runs.log")


@pytest.fixture(scope="module")
def store(synthetic_store) -> Path:
    return synthetic_store(32_768, tokens_per_shard=4096)


def _torture(scenario: torture.Scenario, launcher: torture.Launcher, work: Path, seed: int) -> None:
    ref = torture.reference(scenario, launcher, work / "ref")
    report = torture.torture(scenario, launcher, ref, work / "out", seed, KILLS)
    print(report.line())
    assert report.kills == KILLS
    assert report.identical, report.line()


def test_cache_killed_20_times_then_rerun_is_byte_identical(tiny_model_dir, launcher, tmp_path):
    """Every file of the store (shards, manifest, parts) equals an uninterrupted run's."""
    scenario = torture.cache_scenario(tiny_model_dir("llama"), torture.write_corpus(tmp_path / "corpus"))
    _torture(scenario, launcher, tmp_path, seed=20261125)


def test_training_killed_20_times_then_rerun_equals_uninterrupted(store, launcher, tmp_path):
    """Two SAEs checkpointed every 4 steps; weights, optimizer moments and data position equal
    bit for bit."""
    _torture(torture.train_scenario(store), launcher, tmp_path, seed=20261126)


# ---- DDP ------------------------------------------------------------------------------------
def _workers(launcher_pid: int) -> dict[int, int]:
    """rank -> pid of torchrun's workers."""
    pids = subprocess.run(["pgrep", "-P", str(launcher_pid)], capture_output=True, text=True).stdout.split()
    ranks = {}
    for pid in map(int, pids):
        env = dict(v.split(b"=", 1) for v in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in v)
        ranks[int(env[b"RANK"])] = pid
    return ranks


def _start_and_wait_for_a_checkpoint(cmd: list[str], out: Path) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / ckpt.RUN_STATE_FILE).exists():
        assert proc.poll() is None and time.time() < deadline, "no checkpoint was written"
        time.sleep(0.05)
    return proc


@pytest.mark.parametrize("victim", [0, 1])
def test_ddp_rank_killed_stops_the_others_clearly_and_rerun_resumes(store, tmp_path, victim):
    out = tmp_path / "out"
    cmd = train_cmd(store, out, "n_tokens=51200", "batch_size=256", "checkpoint_every_tokens=2560", ranks=2)
    proc = _start_and_wait_for_a_checkpoint(cmd, out)
    workers = _workers(proc.pid)
    assert sorted(workers) == [0, 1]
    os.kill(workers[victim], signal.SIGKILL)
    killed = time.time()
    _, stderr = proc.communicate(timeout=120)
    assert time.time() - killed < 30, "the surviving rank hung"
    assert proc.returncode != 0
    assert f"Rank {1 - victim} of 2 lost the other ranks" in stderr and "Rerun the same command" in stderr
    step = json.loads((out / ckpt.RUN_STATE_FILE).read_text())["step"]
    assert 0 < step < 200

    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"at step {step} " in done.stdout + done.stderr  # "resumed <out> at step N (...)"
    assert json.loads((out / ckpt.RUN_STATE_FILE).read_text())["step"] == 200


def test_ddp_hung_rank_fails_the_others_after_dist_timeout(store, tmp_path):
    """A rank that stops answering (SIGSTOP: a hung process, a lost node) cannot be told from a
    slow one except by time: the others wait dist_timeout_s, then stop with the same error."""
    out = tmp_path / "out"
    cmd = train_cmd(
        store, out, "n_tokens=51200", "batch_size=256", "checkpoint_every_tokens=2560", "dist_timeout_s=8", ranks=2
    )
    proc = _start_and_wait_for_a_checkpoint(cmd, out)
    workers = _workers(proc.pid)
    os.kill(workers[1], signal.SIGSTOP)
    stopped = time.time()
    try:
        while Path(f"/proc/{workers[0]}").exists() and "zombie" not in Path(f"/proc/{workers[0]}/status").read_text():
            assert time.time() - stopped < 60, "rank 0 still waits for the hung rank"
            time.sleep(0.1)
        waited = time.time() - stopped
    finally:
        os.kill(workers[1], signal.SIGKILL)  # torchrun would, after its own grace period
    _, stderr = proc.communicate(timeout=120)
    assert 7 <= waited < 40  # rank 0 may have been waiting already when rank 1 stopped
    assert "Rank 0 of 2 lost the other ranks" in stderr and "dist_timeout_s" in stderr


# ---- full disk --------------------------------------------------------------------------------
def _disk_full_on(monkeypatch, what: str, occurrence: int) -> None:
    """The `occurrence`-th checkpoint write of `what` leaves a partial file and fails the way
    its writer fails on a full disk."""
    count = {"n": 0}

    def failing(real, exc: Exception, path_arg: int):
        def write(*args, **kwargs):
            count["n"] += 1
            if count["n"] == occurrence:
                Path(args[path_arg]).write_bytes(b"\0" * 7)
                raise exc
            return real(*args, **kwargs)

        return write

    if what == "weights":
        monkeypatch.setattr(
            ckpt,
            "save_file",
            failing(
                ckpt.save_file,
                SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
                1,
            ),
        )
    elif what == "optimizer":
        monkeypatch.setattr(
            torch,
            "save",
            failing(
                torch.save, RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"), 1
            ),
        )
    else:  # the run state: the commit point, written after the SAE directories were swapped in
        real = ckpt.write_json_atomic

        def write_json_atomic(target: Path, data: dict) -> None:
            if target.name == ckpt.RUN_STATE_FILE:
                count["n"] += 1
                if count["n"] == occurrence:
                    raise OSError(errno.ENOSPC, "No space left on device")
            real(target, data)

        monkeypatch.setattr(ckpt, "write_json_atomic", write_json_atomic)


@pytest.mark.parametrize("what", ["weights", "optimizer", "run state"])
def test_disk_full_during_a_checkpoint_keeps_the_previous_one(store, tmp_path, monkeypatch, what):
    def config(out: Path) -> TrainConfig:
        return TrainConfig(
            store=str(store),
            out_dir=str(out),
            n_tokens=8192,
            batch_size=512,
            dtype="float32",
            progress=False,
            checkpoint_every_tokens=2048,
            sweep={"k": [4, 8]},
            sae=SAEConfig(architecture="topk", k=4, expansion_factor=4),
        )

    whole = config(tmp_path / "whole")
    run(whole)
    out = tmp_path / "out"
    # Checkpoints at steps 4, 8, 12: writes of the second SAE (or the second commit) at step 8 fail;
    # each SAE writes two safetensors files (inference and training weights) and one torch.save.
    _disk_full_on(monkeypatch, what, occurrence={"weights": 8, "optimizer": 4, "run state": 2}[what])
    with pytest.raises(UserError, match="checkpoint of step 8.*No space left|checkpoint of step 8.*unexpected pos"):
        run(config(out))
    monkeypatch.undo()
    assert json.loads((out / ckpt.RUN_STATE_FILE).read_text())["step"] == 4
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]  # half-written copies removed
    torture.train_scenario(store).check(out)  # the step-4 checkpoint loads

    run(config(out))
    got, expected = torture.train_scenario(store).result(out), torture.train_scenario(store).result(tmp_path / "whole")
    assert not torture.differences(got, expected)


def test_rerun_removes_what_a_killed_save_left(store, tmp_path):
    """A kill inside a save leaves a staging directory, a uniquely named temp file of the run
    state, or (after the commit) the previous checkpoint's `.prev` copy; when the save was the
    last one no later save replaces them, so resuming removes them (the kill torture found
    these)."""
    config = TrainConfig(
        store=str(store),
        out_dir=str(tmp_path),
        n_tokens=4096,
        batch_size=512,
        dtype="float32",
        progress=False,
        sae=SAEConfig(architecture="topk", k=4, expansion_factor=4),
    )
    run(config)
    shutil.copytree(tmp_path / "synthetic", previous(tmp_path / "synthetic"))  # killed after the commit
    staging = temporary(tmp_path / "synthetic")
    staging.mkdir()
    (staging / "sae.safetensors").write_bytes(b"\0" * 7)
    temporary(tmp_path / ckpt.RUN_STATE_FILE).write_text("{")
    run(config)
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith((".tmp", ".prev"))]
