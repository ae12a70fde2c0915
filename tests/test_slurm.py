"""slurm/ and the Hydra Slurm launcher on a real one-node Slurm cluster started by the tests.

The module's fixture installs Debian's slurm-wlm + munge when they are missing and apt works
(else the module is skipped), starts munged, slurmctld and slurmd as root in a temporary
directory (tests/slurm_cluster.py), and stops them afterwards; a cluster that is installed but
does not come up is an error, not a skip. Two Slurm tasks on one node stand in for two nodes:
each runs its own torchrun agent and they rendezvous exactly as agents on two machines would.
Every wait has a timeout, and a failing job's output is printed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.slurm_cluster import SlurmCluster, SlurmUnavailable

ROOT = Path(__file__).resolve().parent.parent
TRAIN_DDP = ROOT / "slurm" / "train_ddp.sbatch"
CACHE_ARRAY = ROOT / "slurm" / "cache_array.sbatch"
TINY_TRAIN = ["dtype=float32", "device=cpu", "progress=false", "sae.expansion_factor=4", "sae.k=4"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    if os.name != "posix" or sys.platform != "linux":
        pytest.skip("Slurm not available: the test cluster needs Linux")
    root = Path(tempfile.mkdtemp(prefix="sae-slurm-"))  # short: the munge socket path is limited
    try:
        c = SlurmCluster.start(root)
    except SlurmUnavailable as err:
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"Slurm not available: {err}")
    try:
        yield c
    finally:
        c.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def store(synthetic_store) -> Path:
    return synthetic_store(16_384, tokens_per_shard=4096)


def job_env(**extra: str) -> dict[str, str]:
    """What a user's shell would export at submit time: the interpreter to use, one thread."""
    return os.environ | {"PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"} | extra


def run_state(out: Path) -> dict:
    return json.loads((out / "run_state.json").read_text())


def two_agent_train(cluster, store: Path, out: Path, tmp_path: Path, *overrides: str, env: dict | None = None):
    """train_ddp.sbatch on one node with two agents (one worker each) for 16 steps of 512 tokens."""
    return cluster.run(
        [
            "--nodes=1",
            "--ntasks-per-node=2",
            "--time=10",  # more than the notice's 5 minutes (#SBATCH --signal=B:USR1@300), or it comes at once
            f"--chdir={tmp_path}",
            str(TRAIN_DDP),
            f"store={store}",
            f"out_dir={out}",
            "n_tokens=8192",
            "batch_size=512",
            *overrides,
            *TINY_TRAIN,
        ],
        env=env if env is not None else job_env(),
        log_dir=tmp_path,
        timeout=150,
    )


def test_train_ddp_two_agents_rendezvous_and_checkpoint(cluster, store, tmp_path):
    """--ntasks-per-node=2 on one node: two torchrun agents, one worker each, one gloo group."""
    out = tmp_path / "sae"
    job = two_agent_train(cluster, store, out, tmp_path, env=job_env(LOGLEVEL="INFO"))
    log = job.output()
    assert job.ok, job.log()
    assert "2 agent(s) x 1 worker(s)" in log, job.log()
    # torchrun's own account of the rendezvous: the two agents formed one world of two workers.
    assert "group_rank=1" in log and "global_world_sizes=[2]" in log, job.log()
    state = run_state(out)
    assert state["step"] == state["n_steps"] == 16
    assert {p.name for p in (out / "synthetic").iterdir()} >= {"sae.safetensors", "cfg.json", "trainer_state.json"}


def test_train_ddp_spreads_a_sweep_over_the_agents(cluster, store, tmp_path):
    """The README's spread sweep in small: three SAEs on two agents' workers, each training its
    own; rank 0 commits a checkpoint holding all three."""
    out = tmp_path / "sae"
    job = two_agent_train(cluster, store, out, tmp_path, "parallel.saes=true", "+sweep.expansion_factor=[2,4,8]")
    assert job.ok, job.log()
    state = run_state(out)
    assert state["step"] == state["n_steps"] == 16 and len(state["saes"]) == 3
    assert all((out / tag / "sae.safetensors").is_file() for tag in state["saes"])


def test_train_ddp_preemption_notice_checkpoints_requeues_and_resumes(cluster, store, tmp_path):
    """The time-limit notice (SIGUSR1 to the batch shell, sent here by hand) reaches every worker
    as SIGTERM; rank 0 checkpoints; the --requeue'd job restarts and resumes to the end."""
    out = tmp_path / "sae"
    job_id = cluster.submit(
        [
            "--nodes=1",
            "--ntasks-per-node=2",
            "--time=10",
            "--requeue",
            f"--chdir={tmp_path}",
            str(TRAIN_DDP),
            f"store={store}",
            f"out_dir={out}",
            "n_tokens=409600",
            "batch_size=256",
            "log_every=5",
            *TINY_TRAIN,
        ],
        env=job_env(),
        log_dir=tmp_path,
    )
    metrics, deadline = out / "metrics.jsonl", time.monotonic() + 90
    while time.monotonic() < deadline and not (metrics.exists() and metrics.stat().st_size):
        time.sleep(0.1)
    assert metrics.exists(), cluster.wait(job_id, log_dir=tmp_path, timeout=1).log()
    subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], env=cluster.env(), check=True, timeout=30)
    job = cluster.wait(job_id, log_dir=tmp_path, timeout=200)
    log = job.output()
    assert job.ok, job.log()
    assert job.records[0]["Restarts"] == "1", job.log()
    assert "preemption notice" in log and "requeueing job" in log, job.log()
    assert "a checkpoint was saved" in log, job.log()
    resumed = [line for line in log.splitlines() if line.startswith("resumed ")]
    assert resumed and 0 < int(resumed[0].split(" at step ")[1].split()[0]) < 1600, job.log()
    assert run_state(out)["step"] == 1600


def cache_args(model: Path, out: Path) -> list[str]:
    return [
        f"model.name={model}",
        "model.dtype=float32",
        "model.device=cpu",
        "data=python-stdlib",
        "sites=[blocks.1.hook_resid_post]",
        "n_tokens=6144",
        "text.context_size=64",
        "tokens_per_shard=512",
        "batch_size=4",
        "store_dtype=float32",
        "progress=false",
        f"out_dir={out}",
    ]


def test_cache_array_writes_one_store_equal_to_a_single_process(cluster, tiny_model_dir, tmp_path):
    model = tiny_model_dir("llama")
    job = cluster.run(
        ["--array=0-2", "--time=5", f"--chdir={tmp_path}", str(CACHE_ARRAY), *cache_args(model, tmp_path / "array")],
        env=job_env(),
        log_dir=tmp_path,
        timeout=180,
    )
    assert job.ok and len(job.records) == 3, job.log()
    single = subprocess.run(
        [sys.executable, "-m", "sae_train.cli", "cache", *cache_args(model, tmp_path / "single")],
        env=job_env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert single.returncode == 0, single.stderr[-3000:]

    array = json.loads((tmp_path / "array" / "manifest.json").read_text())
    one = json.loads((tmp_path / "single" / "manifest.json").read_text())
    assert len(one["shards"]) == 12
    assert [s["sha256"] for s in array["shards"]] == [s["sha256"] for s in one["shards"]]
    assert array["totals"] == one["totals"]
    assert {s["file"].split("-")[1] for s in array["shards"]} == {"r000", "r001", "r002"}
    assert all((tmp_path / "array" / s["file"]).is_file() for s in array["shards"])


def test_cache_array_refuses_an_array_that_is_not_0_to_n(cluster, tiny_model_dir, tmp_path):
    job = cluster.run(
        [
            "--array=1-2",
            "--time=5",
            f"--chdir={tmp_path}",
            str(CACHE_ARRAY),
            *cache_args(tiny_model_dir("llama"), tmp_path / "acts"),
        ],
        env=job_env(),
        log_dir=tmp_path,
        timeout=60,
    )
    assert [state for state, _ in job.states] == ["FAILED", "FAILED"] and "NUM_RANKS" in job.output(), job.log()
    assert not (tmp_path / "acts").exists()


def test_hydra_multirun_submits_one_slurm_job_per_sweep_point(cluster, store, tmp_path):
    out = tmp_path / "sweep"
    cmd = [
        sys.executable,
        "-m",
        "sae_train.cli",
        "-m",
        "train",
        "hydra/launcher=slurm",
        "hydra.launcher.gpus_per_node=0",
        "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.mem_gb=1",
        "hydra.launcher.timeout_min=5",
        f"store={store}",
        f"out_dir={out}",
        "n_tokens=4096",
        "batch_size=512",
        *TINY_TRAIN[:-1],
        "sae.k=4,8",
    ]
    try:
        done = subprocess.run(
            cmd, env=cluster.env(job_env()), cwd=tmp_path, capture_output=True, text=True, timeout=180
        )
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"the sweep did not finish in 180 s:\n{(err.stderr or b'')[-3000:]!r}\n{_submitit_logs(out)}")
    assert done.returncode == 0, f"{done.stderr[-3000:]}\n{_submitit_logs(out)}"

    runs = sorted(p for p in out.iterdir() if (p / "run_state.json").exists())
    assert [p.name.rsplit("sae.k=", 1)[1] for p in runs] == ["4", "8"], [p.name for p in out.iterdir()]
    for run in runs:
        assert run_state(run)["step"] == 8
        assert (run / "synthetic" / "sae.safetensors").is_file()
        assert json.loads((run / "synthetic" / "cfg.json").read_text())["k"] == int(run.name.rsplit("=", 1)[1])
    # One array of two Slurm jobs, with the trainer's checkpoint signal instead of submitit's.
    scripts = list((out / ".submitit").glob("*/*_submission.sh"))
    assert len(scripts) == 1, scripts
    script = scripts[0].read_text()
    assert "#SBATCH --array=0-1" in script and "#SBATCH --signal=TERM@120" in script, script


def _submitit_logs(out: Path) -> str:
    return "\n".join(
        f"--- {p} ---\n{p.read_text(errors='replace')[-2000:]}" for p in sorted(out.glob(".submitit/*/*.out"))
    )
