"""Latent sharding (parallel.latent_shards): the merge math and the sharded step in process (a
threaded fake communicator), then real torchrun runs (gloo) against one process."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
import torch

from sae_train.sae import SAEConfig, create_sae, sparse
from sae_train.sae.base import SAE
from sae_train.sae.shard import LatentShard, shard_of


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
    tensor's summed over the shards (b_dec: its decoder part lives on shard 0)."""
    assert all(p is not None for p in parts), name
    if name in full.latent_axes:
        return torch.cat(parts, full.latent_axes[name])  # type: ignore[arg-type]
    return torch.stack(parts).sum(0)  # type: ignore[arg-type]


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
