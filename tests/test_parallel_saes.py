"""SAEs spread over ranks (parallel.saes=true), gloo on CPU: every SAE ends with the weights one
process training them all gives it, and no rank waits forever (uneven data, SIGTERM on one rank,
a failed write on one rank, a checkpoint where only one rank has metrics to log)."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from sae_train.errors import UserError
from sae_train.sae import SAEConfig
from sae_train.sae import checkpoint as ckpt
from sae_train.sae.checkpoint import RUN_STATE_FILE, TRAINING_WEIGHTS_FILE
from sae_train.train import Preempted, StepInfo, TrainConfig, Trainer, build_source, run
from sae_train.train.config import ParallelConfig
from sae_train.train.dist import Dist
from tests.store_util import write_store
from tests.test_train_ddp import ENV, train_cmd
from tests.tiny import write_corpus

SWEEP = "+sweep.expansion_factor"
TIMEOUT_S = 300


def _weights(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    """{SAE tag: its training weights} of a run directory."""
    state = json.loads((out / RUN_STATE_FILE).read_text())
    return {tag: load_file(str(out / tag / TRAINING_WEIGHTS_FILE)) for tag in state["saes"]}


def _assert_same_saes(one: Path, spread: Path) -> None:
    expected, got = _weights(one), _weights(spread)
    assert sorted(got) == sorted(expected) and len(got) > 1
    for tag, tensors in expected.items():
        for key, value in tensors.items():
            torch.testing.assert_close(got[tag][key].float(), value.float(), rtol=1e-4, atol=1e-5, msg=f"{tag} {key}")
        assert not torch.equal(tensors["W_dec"], torch.zeros_like(tensors["W_dec"]))


def _train(store: Path | str, out: Path, *args: str, ranks: int) -> None:
    result = subprocess.run(
        train_cmd(store, out, *args, ranks=ranks), env=ENV, capture_output=True, timeout=TIMEOUT_S, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def store(synthetic_store) -> Path:
    return synthetic_store(32_768, tokens_per_shard=4096)


@pytest.mark.parametrize(
    "ranks, arch, widths",
    [
        (2, "topk", "[2,4,8]"),  # fewer ranks than SAEs: one rank trains the two small ones
        (3, "batchtopk", "[2,8]"),  # more ranks than SAEs: the big one on a data-parallel pair
    ],
)
def test_spread_equals_one_process(store, tmp_path, ranks, arch, widths):
    """SAEs of unequal widths; BatchTopK's selection spans exactly the pair that trains it.
    Rank 0 logs every SAE, the ones it does not train included."""
    args = ("n_tokens=4608", "batch_size=576", "log_every=4", f"sae={arch}", f"{SWEEP}={widths}")
    _train(store, tmp_path / "one", *args, ranks=1)
    _train(store, tmp_path / "spread", *args, "parallel.saes=true", ranks=ranks)
    _assert_same_saes(tmp_path / "one", tmp_path / "spread")
    lines = [json.loads(line) for line in (tmp_path / "spread" / "metrics.jsonl").read_text().splitlines()]
    expected = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert [(m["step"], m["sae"]) for m in lines] == [(m["step"], m["sae"]) for m in expected]
    for got, want in zip(lines, expected):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-4) and got["lr"] == want["lr"]


def test_uneven_data_across_ranks_and_sites(tmp_path):
    """A store whose two writer ranks wrote 33 and 76 rows, two sites of different widths and
    four SAEs on three ranks: every SAE's rows reach its owner, the run finishes and matches
    one process (ReLU, resampling dead latents on the owners)."""
    for rank in (0, 1):
        write_store(tmp_path / "store", 12, rank=rank, world_size=2)
    args = (
        "n_tokens=2880",
        "batch_size=48",
        "sae=relu",
        "sae.l1_coefficient=1",
        "dead_after_tokens=240",  # latents die and are resampled (steps 15, 30, 45)
        f"{SWEEP}=[2,4]",
    )
    _train(tmp_path / "store", tmp_path / "one", *args, ranks=1)
    _train(tmp_path / "store", tmp_path / "spread", *args, "parallel.saes=true", ranks=3)
    _assert_same_saes(tmp_path / "one", tmp_path / "spread")


def test_live_transcoders_spread_equal_data_parallel(tiny_model_dir, tmp_path):
    """source=live, each rank running the model on its own windows: two transcoders (the rows
    of their source and target sites both routed) spread over two ranks end as under plain DDP
    on two ranks (live data depends on the world size, so the reference is DDP, not one process)."""
    args = (
        "source=live",
        f"model.name={tiny_model_dir('llama')}",
        "model.dtype=float32",
        "data.source=files",
        f"data.path={write_corpus(tmp_path / 'corpus')}",
        "text.context_size=32",
        "live_buffer_tokens=1024",
        "sites=[blocks.1.mlp.hook_in]",
        "sae.target=blocks.1.hook_mlp_out",
        "sae=relu",
        "n_tokens=2048",
        "batch_size=256",
        f"{SWEEP}=[2,4]",
    )
    _train("", tmp_path / "ddp", *args, ranks=2)
    _train("", tmp_path / "spread", *args, "parallel.saes=true", ranks=2)
    _assert_same_saes(tmp_path / "ddp", tmp_path / "spread")


def _cfg(store: Path, out: Path, **fields) -> TrainConfig:
    return TrainConfig(
        store=str(store),
        out_dir=str(out),
        n_tokens=512 * 12,
        batch_size=512,
        dtype="float32",
        progress=False,
        log_every=4,
        sae=SAEConfig(architecture="topk", k=4, expansion_factor=4),
        sweep={"expansion_factor": [2, 4, 8]},
        **fields,
    )


def _faults(rank: int, store: Path, tmp: Path, init: Path) -> None:
    """Rank `rank` of 2, three SAEs spread over both: (1) rank 1's disk fills up during the
    second checkpoint; (2) a checkpoint at step 3, where only rank 1 has metrics to log (a
    callback's), then SIGTERM on rank 1 at step 5; (3) the same run resumed. Writes what each
    rank saw to tmp/r{rank}.json."""
    import torch.distributed as tdist

    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    dist, report = Dist(rank=rank, world_size=2), {}

    def trainer(out: Path, callbacks=(), **fields) -> Trainer:
        cfg = _cfg(store, out, parallel=ParallelConfig(saes=True), checkpoint_every_tokens=512 * 3, **fields)
        return Trainer(cfg, build_source(cfg, dist), dist, callbacks)

    full = trainer(tmp / "full")
    report["trains"] = [r.tag for r in full.runs]
    report["tracks"] = [s.tag for s in full.slots]
    report["parameters"] = sum(p.numel() for r in full.runs for p in r.sae.parameters())
    write, calls = ckpt.write_training_state, []

    def disk_full(*args) -> None:
        calls.append(args)
        if rank == 1 and len(calls) > len(full.runs):
            raise OSError(28, "No space left on device")
        write(*args)

    ckpt.write_training_state = disk_full
    try:
        full.fit()
    except UserError as err:
        report["full"] = str(err)
    finally:
        ckpt.write_training_state = write

    def callback(info: StepInfo) -> dict[str, dict[str, float]] | None:
        if rank == 1 and info.step == 3:
            return {run.tag: {"probe": 1.0} for run in info.runs}
        if rank == 1 and info.step == 5:
            signal.raise_signal(signal.SIGTERM)
        return None

    try:
        trainer(tmp / "split", [callback]).fit()
    except Preempted as stop:
        report["preempted"] = stop.step
    report["resumed"] = trainer(tmp / "split").fit().new_steps
    (tmp / f"r{rank}.json").write_text(json.dumps(report))
    tdist.destroy_process_group()


def test_faults_on_one_rank_stop_or_resume_every_rank(store, tmp_path):
    context = mp.spawn(_faults, args=(store, tmp_path, tmp_path / "init"), nprocs=2, join=False)
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("a rank hung")
    r0, r1 = (json.loads((tmp_path / f"r{rank}.json").read_text()) for rank in (0, 1))
    # The biggest SAE on rank 0, the two others on rank 1: parameters balanced, each held once.
    assert r0["trains"] == ["synthetic/expansion_factor=8"]
    assert r1["trains"] == ["synthetic/expansion_factor=2", "synthetic/expansion_factor=4"]
    assert r0["tracks"] == r1["tracks"] and len(r0["tracks"]) == 3
    assert r0["parameters"] > r1["parameters"] > 0.7 * r0["parameters"]
    # (1) Every rank stops; the previous checkpoint is committed, nothing half-written is left.
    assert "Could not write the checkpoint of step 6" in r1["full"]
    assert "Another rank could not write its part of the checkpoint of step 6" in r0["full"]
    assert json.loads((tmp_path / "full" / RUN_STATE_FILE).read_text())["step"] == 3
    assert not list((tmp_path / "full" / "synthetic").glob(".*"))
    # (2) + (3): both ranks stop at the same step, and resuming ends where one process does.
    assert r0["preempted"] == r1["preempted"] and 5 <= r0["preempted"] < 12
    assert r0["resumed"] == r1["resumed"] == 12 - r0["preempted"]
    run(_cfg(store, tmp_path / "one"))
    _assert_same_saes(tmp_path / "one", tmp_path / "split")
