"""DDP through real torchrun (gloo on CPU): equals one process, never hangs, survives SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sae_train.sae.checkpoint import RUN_STATE_FILE, TRAINING_WEIGHTS_FILE
from sae_train.store import StoreWriter
from tests.synthetic import sample, true_directions

SITE = "synthetic"
ENV = os.environ | {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def train_cmd(store: Path, out: Path, *extra: str, ranks: int = 1) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    return launcher + [
        "-m",
        "sae_train.cli",
        "train",
        f"store={store}",
        f"out_dir={out}",
        "dtype=float32",
        "progress=false",
        "sae.expansion_factor=4",
        "sae.k=4",
        *extra,
    ]


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / SITE / TRAINING_WEIGHTS_FILE))


@pytest.fixture(scope="module")
def store(synthetic_store) -> Path:
    return synthetic_store(32_768, tokens_per_shard=4096)


@pytest.mark.parametrize(
    "arch, kernels", [("topk", "auto"), ("relu", "auto"), ("batchtopk", "auto"), ("batchtopk", "torch")]
)
def test_two_ranks_equal_one_process(store, tmp_path, arch, kernels):
    """BatchTopK too: its selection is global across ranks (the C path and the PyTorch path)."""
    args = ("n_tokens=8192", "batch_size=512", f"sae={arch}", "sae.l1_coefficient=0.05")
    env = ENV | {"SAE_TRAIN_KERNELS": kernels}
    subprocess.run(
        train_cmd(store, tmp_path / "one", *args, ranks=1), check=True, env=env, capture_output=True, timeout=300
    )
    subprocess.run(
        train_cmd(store, tmp_path / "two", *args, ranks=2), check=True, env=env, capture_output=True, timeout=300
    )
    one, two = weights(tmp_path / "one"), weights(tmp_path / "two")
    for key in one:
        torch.testing.assert_close(two[key].float(), one[key].float(), rtol=1e-4, atol=1e-5, msg=key)
    # Different global batches would drift apart: the comparison is meaningful.
    assert not torch.equal(one["W_dec"], torch.zeros_like(one["W_dec"]))


def test_uneven_shards_across_ranks_do_not_hang(tmp_path):
    """A store whose ranks wrote 3 and 1 shards of different sizes; training on 2 ranks finishes."""
    dirs, gen = true_directions(16, 32), torch.Generator().manual_seed(1)
    writers = [
        StoreWriter(tmp_path / "store", {"uneven": 1}, {SITE: 32}, torch.float32, rank=r, world_size=2) for r in (0, 1)
    ]
    for index, n in enumerate([3000, 700, 2500, 0, 1800]):
        if index == 3:
            continue
        writers[index % 2].write_shard(
            index,
            {SITE: sample(n, dirs, 0.1, 0.01, gen)},
            torch.zeros(n, dtype=torch.int32),
            torch.zeros(n, dtype=torch.int32),
        )
    for w in writers:
        w.close()
    result = subprocess.run(
        train_cmd(tmp_path / "store", tmp_path / "out", "n_tokens=20480", "batch_size=256", ranks=2),
        env=ENV,
        capture_output=True,
        timeout=300,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((tmp_path / "out" / RUN_STATE_FILE).read_text())["step"] == 80


@pytest.mark.parametrize("targets", ["one rank", "every rank"])
def test_sigterm_leaves_a_resumable_checkpoint(store, tmp_path, targets):
    """One rank (a node-local preemption) or all of them (Slurm preempting the job)."""
    cmd = train_cmd(store, tmp_path / "out", "n_tokens=409600", "batch_size=256", "log_every=5", ranks=2)
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "out" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.stat().st_size):
        time.sleep(0.05)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2, workers
    for pid in workers if targets == "every rank" else workers[-1:]:
        os.kill(int(pid), signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "stopped by SIGTERM" in stderr and "SIGPWR" not in stderr
    state = json.loads((tmp_path / "out" / RUN_STATE_FILE).read_text())
    assert 0 < state["step"] < 1600
    done = subprocess.run(cmd, env=ENV, capture_output=True, timeout=600, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((tmp_path / "out" / RUN_STATE_FILE).read_text())["step"] == 1600


def _collectives_of_one_step(rank: int, store: Path, out: Path, init: Path) -> None:
    """Rank `rank` of 2: one training step with every all-reduce recorded (dtype, size, and
    whether it reduced a parameter's own gradient tensor)."""
    import torch.distributed as tdist

    from sae_train.sae import SAEConfig
    from sae_train.train import TrainConfig, Trainer
    from sae_train.train.dist import Dist
    from sae_train.train.sources import StoreSource

    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    cfg = TrainConfig(
        store=str(store),
        out_dir=str(out / f"r{rank}"),
        n_tokens=4096,
        batch_size=512,
        dtype="float32",
        progress=False,
        sae=SAEConfig(architecture="topk", k=4, expansion_factor=4),
    )
    dist = Dist(rank=rank, world_size=2)
    trainer = Trainer(cfg, StoreSource(cfg.store, [], cfg.batch_size, dist, seed=0, window_shards=2), dist)
    batch = next(trainer.source.batches(0))
    seen: list[tuple[str, int, bool]] = []
    reduce, params = tdist.all_reduce, trainer.runs[0].params

    def recording(tensor, *args, **kwargs):
        seen.append((str(tensor.dtype), tensor.numel(), any(tensor is p.grad for p in params)))
        return reduce(tensor, *args, **kwargs)

    tdist.all_reduce = recording
    try:
        trainer.train_step(batch, 0)
    finally:
        tdist.all_reduce = reduce
    (out / f"r{rank}.json").write_text(json.dumps(seen))
    tdist.destroy_process_group()


def test_gradients_are_reduced_in_fp32_in_place_and_statistics_apart(store, tmp_path):
    """Per step: one fp32 all-reduce per parameter, on its gradient itself (no flat copy, no
    fp64), and one small fp64 all-reduce of statistics; the same list on both ranks."""
    import torch.multiprocessing as mp

    mp.spawn(_collectives_of_one_step, args=(store, tmp_path, tmp_path / "init"), nprocs=2)
    calls = [json.loads((tmp_path / f"r{r}.json").read_text()) for r in (0, 1)]
    assert calls[0] == calls[1]
    d_in, d_sae = 32, 128
    grads, stats = calls[0][:-1], calls[0][-1]
    assert sorted(n for _, n, _ in grads) == sorted([d_in * d_sae, d_sae * d_in, d_sae, d_in])
    assert all(dtype == "torch.float32" and is_grad for dtype, _, is_grad in grads)
    assert stats[0] == "torch.float64" and stats[1] < 2 * d_sae and not stats[2]


def _live_run_threads(rank: int, model: Path, corpus: Path, out: Path, port: int) -> None:
    """Rank `rank` of 2 as torchrun starts it: a live run (the model loaded after the process
    group exists), then the names of the threads left in the process, to out/r{rank}.json."""
    from sae_train.sae import SAEConfig
    from sae_train.train import run
    from tests.tiny import live_train_cfg

    env = {"RANK": rank, "LOCAL_RANK": rank, "WORLD_SIZE": 2, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
    os.environ.update({name: str(value) for name, value in env.items()})
    torch.set_num_threads(1)
    sae = SAEConfig(architecture="topk", k=4, expansion_factor=2)
    run(
        live_train_cfg(
            model, corpus, out / "run", ["blocks.1.hook_resid_post"], sae, n_tokens=1024, live_buffer_tokens=512
        )
    )
    threads = [(task / "comm").read_text().strip() for task in Path("/proc/self/task").iterdir()]
    (out / f"r{rank}.json").write_text(json.dumps(threads))


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="lists threads through /proc (Linux)")
def test_a_finished_run_leaves_no_process_group_threads(tiny_model_dir, tmp_path):
    """Loading a Hugging Face model after init_process_group imports torch.distributed.nn, whose
    functions would keep the world group (default arguments); then its gloo threads outlived
    `shutdown` and, running while the interpreter exited, now and then aborted a rank
    ("terminate called without an active exception")."""
    import socket

    import torch.multiprocessing as mp

    from tests.tiny import write_corpus

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = (tiny_model_dir("llama"), write_corpus(tmp_path / "corpus"), tmp_path, port)
    mp.spawn(_live_run_threads, args=args, nprocs=2)
    for rank in (0, 1):
        threads = json.loads((tmp_path / f"r{rank}.json").read_text())
        assert not [name for name in threads if "gloo" in name], threads
