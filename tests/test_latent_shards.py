"""Latent sharding (parallel.latent_shards): the merge math and the sharded step in process (a
threaded fake communicator), then real torchrun runs (gloo) against one process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sae_train.errors import UserError
from sae_train.export import ExportConfig, run
from sae_train.sae import SAEConfig, create_sae, kernels, sparse
from sae_train.sae.base import SAE
from sae_train.sae.checkpoint import (
    OPTIMIZER_FILE,
    RUN_STATE_FILE,
    TRAINING_WEIGHTS_FILE,
    WEIGHTS_FILE,
    load_checkpoints,
)
from sae_train.sae.shard import LatentShard, shard_of
from sae_train.train import update
from sae_train.train.config import ParallelConfig, TrainConfig
from sae_train.train.dist import Dist
from sae_train.train.latent_shards import check_config, data_view, shard_config
from tests.test_train_ddp import ENV, SITE, train_cmd
from tests.tiny import write_corpus


class _Hub:
    """What N threads (one per shard) exchange: each puts its tensor, all read every one."""

    def __init__(self, n: int) -> None:
        self.barrier, self.slots = threading.Barrier(n, timeout=60), [torch.empty(0)] * n

    def exchange(self, rank: int, tensor: torch.Tensor) -> list[torch.Tensor]:
        self.slots[rank] = tensor.clone()
        self.barrier.wait()
        parts = list(self.slots)
        self.barrier.wait()
        return parts


class ThreadComm:
    """`LatentComm` between threads of one process: N shards, one data rank."""

    data_ranks = 1

    def __init__(self, hub: _Hub, rank: int, size: int) -> None:
        self.hub, self.rank, self.size = hub, rank, size

    def all_reduce_sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        parts = self.hub.exchange(self.rank, tensor)
        total = parts[0]
        for part in parts[1:]:
            total = total + part  # the same order on every shard: identical sums
        return tensor.copy_(total)

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return torch.stack(self.hub.exchange(self.rank, tensor))

    def batch_gather(self, tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
        return self.all_gather(tensor), self.rank


def shards_of(full: SAE, n: int) -> list[SAE]:
    """The n latent shards of `full` (its weights sliced), each with a ThreadComm attached."""
    hub, out = _Hub(n), []
    for s in range(n):
        cfg = SAEConfig(**{**full.cfg.to_dict(), "d_sae": full.cfg.d_sae // n})
        shard = create_sae(cfg, compute_dtype=full.compute_dtype)
        state = {
            name: shard_of(t, full.latent_axes[name], n, s) if name in full.latent_axes else t
            for name, t in full.state_dict().items()
        }
        shard.load_state_dict(state)
        shard.shard = LatentShard(ThreadComm(hub, s, n), full.cfg.d_sae)
        out.append(shard)
    return out


def in_threads(fns: list[Callable[[], object]]) -> list[object]:
    results: list[object] = [None] * len(fns)
    errors: list[BaseException] = []

    def go(i: int) -> None:
        try:
            results[i] = fns[i]()
        except BaseException as err:  # noqa: BLE001 - re-raised in the main thread
            errors.append(err)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    if errors:
        raise errors[0]
    return results


# ---------------------------------------------------------------------------------- the merge


@pytest.mark.parametrize("n", [2, 4])
def test_merged_candidates_are_the_global_topk_ties_included(n):
    """Each shard's k best per token, merged, keep exactly one process's top k -- with integer
    values, so ties, which go to the lower global latent id as in one process (tie groups within
    the selection's margin, where one process's selection is exact too)."""
    B, d_sae, k = 64, 48, 5
    z = torch.randint(-12, 13, (B, d_sae), generator=torch.Generator().manual_seed(0)).float()
    bias = torch.zeros(d_sae)
    want_ids, _ = sparse.topk_rows(z, bias, k)
    cands = [sparse.topk_rows(shard_of(z, 1, n, s), shard_of(bias, 0, n, s), k) for s in range(n)]
    every = torch.stack([vals for _, vals in cands]).transpose(0, 1)  # [B, n, k]
    kept = sparse.cut_mask(every, k)
    got = torch.cat([torch.where(kept[:, s], ids + s * (d_sae // n), -1) for s, (ids, _) in enumerate(cands)], 1)
    got = got.sort(1).values[:, -k:]  # the kept ids (the -1s sort first)
    assert torch.equal(kept.sum((1, 2)), torch.full((B,), k))
    assert torch.equal(got, want_ids.sort(1).values)


def test_global_cut_pads_a_short_candidate_list():
    """A block with fewer entries than the global n_keep (a narrow shard) still cuts right."""
    blocks = [torch.tensor([5.0, 3.0, 1.0]), torch.tensor([4.0, 2.0, 2.0, 0.5, 0.1])]
    every = torch.stack([torch.cat([b, b.new_full((5 - len(b),), float("-inf"))]) for b in blocks])
    for rank, block in enumerate(blocks):
        n, min_kept = sparse.global_cut(block, 5, lambda t, r=rank: (every, r))
        assert int(n) == [2, 3][rank] and float(min_kept) == 2.0


# ---------------------------------------------------------------------------------- the step, in process


def _full(arch: str, **extra) -> SAE:
    cfg = SAEConfig(architecture=arch, k=4, d_sae=64, l1_coefficient=0.05, l0_coefficient=0.01, **extra)
    sae = create_sae(cfg.resolved(16))
    sae.impl = "torch"
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # every parameter non-trivial, so each gradient path shows
        sae.b_enc.normal_(0, 0.1, generator=gen)
        sae.b_dec.normal_(0, 0.3, generator=gen)
        if hasattr(sae, "threshold"):
            sae.threshold.uniform_(0.0, 0.2, generator=gen)
    return sae


def _join(full: SAE, parts: list[torch.Tensor | None], name: str) -> torch.Tensor:
    """A sharded gradient put together: concatenated along the latent axis; a replicated
    tensor's summed over the shards (b_dec: its decoder part lives on shard 0 -- a transcoder's
    other shards have none, which the trainer reduces as zeros)."""
    assert parts[0] is not None, name
    grads = [torch.zeros_like(parts[0]) if p is None else p for p in parts]
    if name in full.latent_axes:
        return torch.cat(grads, full.latent_axes[name])
    return torch.stack(grads).sum(0)


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "relu", "jumprelu"])
@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("dead", [False, True])
def test_sharded_step_equals_one_process(arch, n, dead):
    """Reconstruction, every loss term, the selection (which latents fired) and every gradient
    of N shards equal one process's; with dead latents, AuxK's selection spans the shards."""
    if dead and arch not in ("topk", "batchtopk"):
        pytest.skip("AuxK is the TopK family's")
    full = _full(arch)
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(4))
    mask = (torch.arange(64) % 3 == 0) if dead else None
    out = full(x, dead_mask=mask, sparsity_scale=0.7)
    out.losses["loss"].backward()
    shards = shards_of(full, n)

    def step(s: SAE, i: int) -> Callable[[], object]:
        def run():
            m = None if mask is None else shard_of(mask, 0, n, i)
            o = s(x, dead_mask=m, sparsity_scale=0.7)
            o.losses["loss"].backward()
            return o

        return run

    outs = in_threads([step(s, i) for i, s in enumerate(shards)])
    for o in outs:
        torch.testing.assert_close(o.x_hat, out.x_hat, rtol=1e-5, atol=1e-6)
        for key, value in out.losses.items():
            torch.testing.assert_close(o.losses[key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert torch.equal(torch.cat([o.fired for o in outs]), out.fired)
    torch.testing.assert_close(sum(o.l0 for o in outs), out.l0)  # each shard counts its own latents
    if dead:
        assert float(out.losses["auxk"].detach()) > 0
    for name, p in full.named_parameters():
        got = _join(full, [dict(s.named_parameters())[name].grad for s in shards], name)
        torch.testing.assert_close(got, p.grad, rtol=1e-4, atol=1e-6, msg=name)


# ---------------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    "overrides, says",
    [
        ({"sae": SAEConfig(architecture="matryoshka")}, "cannot be split by latent"),
        ({"sae": SAEConfig(architecture="clt", target="blocks.{layer}.hook_mlp_out")}, "clt cannot be split by latent"),
        ({"sae": SAEConfig(architecture="relu")}, "resample_every=0"),
        ({"eval_every_tokens": 4096}, "eval_every_tokens=0"),
    ],
)
def test_what_sharding_cannot_train_is_refused_up_front(tmp_path, overrides, says):
    cfg = TrainConfig(store=str(tmp_path), parallel=ParallelConfig(latent_shards=2), **overrides)
    with pytest.raises(UserError, match=says):
        check_config(cfg)


def test_world_and_widths_must_split():
    with pytest.raises(UserError, match="multiple of it"):
        data_view(Dist(rank=0, world_size=3), 2)
    assert data_view(Dist(rank=5, world_size=6), 2) == Dist(rank=2, world_size=3)
    with pytest.raises(UserError, match="latent_shards"):
        ParallelConfig(latent_shards=0)
    with pytest.raises(UserError, match="equal ranges"):
        shard_config(SAEConfig(d_sae=100).resolved(16), 3)
    with pytest.raises(UserError, match="picks its k best"):
        shard_config(SAEConfig(k=32, d_sae=96).resolved(16), 4)
    assert shard_config(SAEConfig(k=8, d_sae=96).resolved(16), 4).d_sae == 24


# ---------------------------------------------------------------------------------- torchrun (gloo)

ARCHS = ("topk", "batchtopk", "relu")
"""JumpReLU is pinned in process above: its step is discontinuous in the rounding of z (which
tokens fall in a threshold's window), so runs that sum in another order drift apart by design."""
RUN = (
    "n_tokens=8192",
    "batch_size=256",
    "resample_every=0",
    "dead_after_tokens=1024",  # latents die within the run: AuxK's merged selection is exercised
    "sae.l1_coefficient=0.05",
    # Adam's first steps move an entry by ~lr whatever its gradient's size: eps above the rounding
    # noise of gradients that are ~0 keeps the runs comparable entry by entry
    "adam_eps=1e-6",
    "log_every=1",
    f"+sweep.architecture=[{','.join(ARCHS)}]",
)


def _tag(arch: str) -> str:
    return f"{SITE}/architecture={arch}"


def _launch(store: Path, out: Path, ranks: int, shards: int) -> list[str]:
    return train_cmd(store, out, *RUN, f"parallel.latent_shards={shards}", ranks=ranks)


def _train(store: Path, out: Path, ranks: int, shards: int) -> None:
    done = subprocess.run(_launch(store, out, ranks, shards), env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(synthetic_store, tmp_path_factory) -> dict[str, Path]:
    """One torchrun per layout, each training the three architectures at once (a sweep):
    one process; 2 latent shards; 2 data ranks (plain DDP); 2 data x 2 latent; and 2 shards
    stopped by SIGTERM early, resumed on 4 shards (the checkpoint re-split)."""
    store, root = synthetic_store(16_384, tokens_per_shard=4096), tmp_path_factory.mktemp("latent-shards")
    out = {name: root / name for name in ("one", "two", "ddp", "grid", "resumed")}
    _train(store, out["one"], 1, 1)
    _train(store, out["two"], 2, 2)
    _train(store, out["ddp"], 2, 1)
    _train(store, out["grid"], 4, 2)
    proc = subprocess.Popen(
        _launch(store, out["resumed"], 2, 2), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    metrics, deadline = out["resumed"] / "metrics.jsonl", time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.stat().st_size):
        time.sleep(0.02)
    for pid in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split():
        os.kill(int(pid), signal.SIGTERM)
    proc.communicate(timeout=120)
    state = json.loads((out["resumed"] / RUN_STATE_FILE).read_text())
    assert 0 < state["step"] < 32, state["step"]  # stopped midway: the resume below re-splits a real checkpoint
    _train(store, out["resumed"], 4, 4)
    return out


def _assert_same(run: Path, one: Path) -> None:
    for arch in ARCHS:
        for name in (TRAINING_WEIGHTS_FILE, WEIGHTS_FILE):
            want, got = load_file(str(one / _tag(arch) / name)), load_file(str(run / _tag(arch) / name))
            assert sorted(got) == sorted(want)
            for key in want:
                torch.testing.assert_close(
                    got[key].float(), want[key].float(), rtol=1e-4, atol=1e-5, msg=f"{arch} {key}"
                )
        adam_one, adam = (torch.load(d / _tag(arch) / OPTIMIZER_FILE, weights_only=True) for d in (one, run))
        for i, entry in adam_one["state"].items():
            for key, value in entry.items():
                scale = float(value.abs().max()) if value.dim() else 1.0  # moments of ~0 gradients are rounding noise
                torch.testing.assert_close(
                    adam["state"][i][key], value, rtol=1e-3, atol=1e-4 * scale, msg=f"{arch} adam {key}"
                )


def test_two_latent_shards_equal_one_process(runs):
    """Weights, Adam state, dead-latent counters (the selection) and the folded checkpoint."""
    _assert_same(runs["two"], runs["one"])
    logged = {}
    for name in ("one", "two"):  # the metrics too: L0 and dead fraction summed over the shards
        rows = [json.loads(line) for line in (runs[name] / "metrics.jsonl").read_text().splitlines()]
        logged[name] = {(r["step"], r["sae"]): [r[k] for k in ("loss", "fvu", "l0", "dead_fraction")] for r in rows}
    assert logged["two"].keys() == logged["one"].keys()
    for key, values in logged["one"].items():
        assert logged["two"][key] == pytest.approx(values, rel=1e-4, abs=1e-6), key
    weights = load_file(str(runs["one"] / _tag("topk") / TRAINING_WEIGHTS_FILE))
    assert (weights["since_fired"] >= 1024).any(), "no latent died: AuxK was not exercised"


def test_two_data_by_two_latent_equals_two_data_ranks(runs):
    """Against plain DDP on the same 2 data ranks: DDP's AuxK term is normalised by each rank's
    own residual variance, so once latents die 2 data ranks drift from one process (ReLU and
    JumpReLU, without AuxK, match one process too)."""
    _assert_same(runs["grid"], runs["ddp"])


def test_resume_re_splits_onto_four_shards(runs):
    _assert_same(runs["resumed"], runs["one"])
    assert json.loads((runs["resumed"] / RUN_STATE_FILE).read_text())["world_size"] == 4


def test_sharded_checkpoint_is_one_ordinary_sae(runs, tmp_path):
    """eval's loader sees whole SAEs; the export writes SAELens folders that sae_lens loads and
    that reconstruct like ours."""
    checkpoints = {c.name: c for c in load_checkpoints(str(runs["two"]))}
    assert sorted(checkpoints) == sorted(_tag(a) for a in ARCHS)
    run(ExportConfig(checkpoint=str(runs["two"]), out_dir=str(tmp_path / "export")))
    sae_lens = pytest.importorskip("sae_lens")
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(0)) * 3
    for arch in ARCHS:
        ours = checkpoints[_tag(arch)].sae
        assert ours.cfg.d_sae == 128 and ours.shard is None
        theirs = sae_lens.SAE.load_from_disk(tmp_path / "export" / _tag(arch))
        with torch.no_grad():
            torch.testing.assert_close(theirs(x), ours.reconstruct(x)[1], rtol=1e-5, atol=1e-5)


def test_live_source_on_two_shards_equals_one_process(tiny_model_dir, tmp_path):
    """source=live: the two shards of one data rank run the model on the same windows."""
    corpus = write_corpus(tmp_path / "corpus", n_files=40, n_words=200)
    live = (
        "source=live",
        f"model.name={tiny_model_dir('llama')}",
        "model.dtype=float32",
        "data=files",
        f"data.path={corpus}",
        "sites=[blocks.1.hook_resid_post]",
        "n_tokens=2048",
        "batch_size=256",
        "text.context_size=32",
        "live_buffer_tokens=1024",
        "init_tokens=1024",
        "adam_eps=1e-6",
    )
    for ranks in (1, 2):
        cmd = train_cmd(Path("unused"), tmp_path / f"out{ranks}", *live, f"parallel.latent_shards={ranks}", ranks=ranks)
        cmd = [arg for arg in cmd if not arg.startswith("store=")]
        done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    one, two = (
        load_file(str(tmp_path / d / "blocks.1.hook_resid_post" / TRAINING_WEIGHTS_FILE)) for d in ("out1", "out2")
    )
    for key in one:
        torch.testing.assert_close(two[key].float(), one[key].float(), rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.parametrize("arch", ["topk", "relu"])
def test_sharded_transcoder_step_equals_one_process(arch):
    """A transcoder (no skip connection): b_dec is an output bias only, its gradient on shard 0;
    TopK's rows, rescaled to their shared mean norm after a step, take the whole SAE's mean."""
    cfg = SAEConfig(architecture=arch, k=4, d_sae=64, target="out", l1_coefficient=0.05).resolved(16, 12)
    full = create_sae(cfg)
    full.impl = "torch"
    gen = torch.Generator().manual_seed(5)
    x, y = torch.randn(32, 16, generator=gen), torch.randn(32, 12, generator=gen)
    with torch.no_grad():  # rows of unequal norms, as after an optimizer step
        full.W_dec.copy_(torch.randn(64, 12, generator=gen) * torch.rand(64, 1, generator=gen))
    out = full(x, target=y)
    out.losses["loss"].backward()
    shards = shards_of(full, 2)

    def step(s: SAE) -> Callable[[], object]:
        return lambda: s(x, target=y).losses["loss"].backward()

    in_threads([step(s) for s in shards])
    for name, p in full.named_parameters():
        got = _join(full, [dict(s.named_parameters())[name].grad for s in shards], name)
        torch.testing.assert_close(got, p.grad, rtol=1e-4, atol=1e-6, msg=name)
    full.constrain_()
    in_threads([s.constrain_ for s in shards])
    torch.testing.assert_close(_join(full, [s.W_dec.detach() for s in shards], "W_dec"), full.W_dec.detach())


@pytest.mark.parametrize("step", [update.fused_update, update.reference_update])
def test_sharded_optimizer_step_clips_by_the_whole_norm(step):
    """The optimizer step of 2 shards (the fused CPU one and the reference one CUDA runs) equals
    one process's, gradient clipping by the whole SAE's norm included."""
    if step is update.fused_update and not kernels.available():
        pytest.skip("needs the CPU kernels")
    full = _full("topk")
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(6))
    full(x).losses["loss"].backward()
    shards = shards_of(full, 2)
    in_threads([(lambda s=s: s(x).losses["loss"].backward()) for s in shards])
    b_dec = sum(s.b_dec.grad for s in shards)  # what the trainer's gradient reduction does
    for s in shards:
        s.b_dec.grad = b_dec.clone()
    adam = {"lr": 1e-2, "fused": True}
    step(full, torch.optim.Adam(full.parameters(), **adam), 1e-3)  # clipping is active
    in_threads([(lambda s=s: step(s, torch.optim.Adam(s.parameters(), **adam), 1e-3)) for s in shards])
    for name, p in full.named_parameters():
        parts = [dict(s.named_parameters())[name].detach() for s in shards]
        got = torch.cat(parts, full.latent_axes[name]) if name in full.latent_axes else parts[1]
        torch.testing.assert_close(got, p.detach(), rtol=1e-5, atol=1e-6, msg=name)
