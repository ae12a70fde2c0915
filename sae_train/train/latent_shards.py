"""`parallel.latent_shards=N`: the ranks as a data x latent grid, and an SAE's state moved
between its shards and the one ordinary SAE a checkpoint holds (the per-shard math:
sae/shard.py).

Rank r = d * N + s holds latent shard s of every SAE and reads data rank d's batches
(`data_view`): the N shards of one data rank sit on consecutive ranks (one node, where the
per-step all-reduce and all_gathers are cheapest). Process groups: the latent group (the N
shards of one data rank: selection merges and the decoder all-reduce) and the data group (the
data ranks holding one shard: its gradients and fired masks). Gradients: a shard's own tensors
are averaged over its data group; the replicated ones (b_dec) summed over every rank and
divided by the data ranks (their parts from each shard add up to one process's gradient).

Checkpoints stay one ordinary SAE: a save gathers every shard's tensors (each shard folds its own
range first; then the training weights, dead-latent counters and Adam moments) to rank 0, one
file's worth at a time, and rank 0 writes the same files a single process would. Resume reads
each rank's range of them (`select`, `split_optimizer`); the first initialisation is made once
on rank 0 for the whole SAE (the data-dependent init) and scattered (`scatter_`). So eval,
export and inspect never see a shard, and a run may resume under another number of shards.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as tdist
from torch import Tensor

from sae_train.errors import UserError
from sae_train.sae import SAE, SAEConfig, create_sae
from sae_train.sae.registry import ARCHITECTURES
from sae_train.sae.shard import LatentShard, shard_of, shard_range
from sae_train.train.config import TrainConfig
from sae_train.train.dist import Dist

COUNTERS = {"since_fired": 0}
"""The trainer's per-latent state beside the SAE's tensors, and its latent axis."""


def data_view(dist: Dist, shards: int) -> Dist:
    """The data source's view of this rank: data rank d of world / shards (the shards of one data
    rank read the same batches)."""
    if shards == 1:
        return dist
    check_world(dist, shards)
    return Dist(rank=dist.rank // shards, world_size=dist.world_size // shards, device=dist.device)


def check_world(dist: Dist, shards: int) -> None:
    if dist.world_size % shards:
        raise UserError(
            f"parallel.latent_shards={shards} needs a world size that is a multiple of it (data ranks x latent "
            f"shards); this run has {dist.world_size} rank(s). Launch it with torchrun --nproc-per-node={shards} "
            "(or a multiple), or lower parallel.latent_shards."
        )


def check_config(cfg: TrainConfig) -> None:
    """What latent sharding cannot train (yet), each with its fix, before any work starts."""
    arch = ARCHITECTURES[cfg.sae.architecture]
    if not arch.shardable_latents:
        raise UserError(
            f"sae.architecture={cfg.sae.architecture} cannot be split by latent (parallel.latent_shards="
            f"{cfg.parallel.latent_shards}): its latents are not independent across ranges. Use topk, batchtopk, relu "
            "or jumprelu, or parallel.latent_shards=1."
        )
    if cfg.sae.skip:
        raise UserError(
            "sae.skip=true with parallel.latent_shards > 1: the skip connection is not split over the shards. "
            "Remove sae.skip or set parallel.latent_shards=1."
        )
    if arch.revival == "resample" and cfg.resample_every > 0:
        raise UserError(
            f"sae.architecture={cfg.sae.architecture} revives dead latents by resampling, which latent sharding "
            "does not do: set resample_every=0 with parallel.latent_shards > 1 (or train with "
            "parallel.latent_shards=1)."
        )
    if cfg.eval_every_tokens > 0:
        raise UserError(
            "eval_every_tokens > 0 with parallel.latent_shards > 1: periodic evaluation needs the whole SAE on one "
            "rank. Set eval_every_tokens=0 and run `sae-train eval` on the checkpoint."
        )


def shard_config(cfg: SAEConfig, shards: int) -> SAEConfig:
    """The config of one of `shards` latent shards of an SAE of resolved config `cfg`."""
    if cfg.d_sae % shards:
        raise UserError(
            f"sae.d_sae={cfg.d_sae} does not split into parallel.latent_shards={shards} equal ranges; pick a "
            "d_sae (or expansion_factor) that the number of shards divides."
        )
    if "k" in ARCHITECTURES[cfg.architecture].config_fields and cfg.k > cfg.d_sae // shards:
        raise UserError(
            f"sae.k={cfg.k} exceeds the {cfg.d_sae // shards} latents of one of parallel.latent_shards="
            f"{shards} shards (each picks its k best before they are merged); use fewer shards or a wider SAE."
        )
    return SAEConfig(**{**cfg.to_dict(), "d_sae": cfg.d_sae // shards})


class LatentGroups:
    """The grid's process groups; the `LatentComm` of every shard SAE on this rank (sae/shard.py)."""

    def __init__(self, dist: Dist, shards: int) -> None:
        check_world(dist, shards)
        self.dist, self.size = dist, shards
        self.rank, self.data_rank = dist.rank % shards, dist.rank // shards
        self.data_ranks = dist.world_size // shards
        # every rank creates every group, in the same order (torch.distributed's rule)
        for d in range(self.data_ranks):
            group = tdist.new_group([d * shards + s for s in range(shards)])
            if d == self.data_rank:
                self.latent_group = group
        for s in range(shards):
            group = tdist.new_group([d * shards + s for d in range(self.data_ranks)])
            if s == self.rank:
                self.data_group = group

    # ---- LatentComm ---------------------------------------------------------------------
    def all_reduce_sum_(self, tensor: Tensor) -> Tensor:
        with self.dist._collective("latent all-reduce"):
            tdist.all_reduce(tensor, group=self.latent_group)
        return tensor

    def all_gather(self, tensor: Tensor) -> Tensor:
        parts = [torch.empty_like(tensor) for _ in range(self.size)]
        with self.dist._collective("latent all_gather"):
            tdist.all_gather(parts, tensor.contiguous(), group=self.latent_group)
        return torch.stack(parts)

    def batch_gather(self, tensor: Tensor) -> tuple[Tensor, int]:
        parts = [torch.empty_like(tensor) for _ in range(self.dist.world_size)]
        with self.dist._collective("batch all_gather"):
            tdist.all_gather(parts, tensor.contiguous())
        return torch.stack(parts), self.dist.rank

    # ---- the trainer's hooks --------------------------------------------------------------
    def data_sum_(self, tensor: Tensor) -> Tensor:
        """Sum over the data ranks holding this rank's shard (its fired masks), in place."""
        if self.data_ranks > 1:
            with self.dist._collective("data all-reduce"):
                tdist.all_reduce(tensor, group=self.data_group)
        return tensor

    def attach(self, sae: SAE, d_sae: int) -> None:
        sae.shard = LatentShard(self, d_sae)

    def start_grad_average(self, sae: SAE) -> Callable[[], None]:
        """Start averaging a shard's gradients (async): its own tensors over its data group, the
        replicated ones summed over every rank; the returned function waits and divides by the
        data ranks. A missing gradient is reduced as zeros (the same collectives on every rank)."""
        works, grads = [], []
        with self.dist._collective("gradient all-reduce"):
            for name, p in sae.named_parameters():
                if not p.requires_grad:
                    continue
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                grads.append(p.grad)
                if name not in sae.latent_axes:
                    works.append(tdist.all_reduce(p.grad, async_op=True))
                elif self.data_ranks > 1:
                    works.append(tdist.all_reduce(p.grad, group=self.data_group, async_op=True))

        def finish() -> None:
            with self.dist._collective("gradient all-reduce"):
                for work in works:
                    work.wait()
            if self.data_ranks > 1:
                torch._foreach_div_(grads, float(self.data_ranks))

        return finish

    # ---- state: init, checkpoints, resume -------------------------------------------------------
    def _axes(self, sae: SAE) -> dict[str, int]:
        return {**sae.latent_axes, **COUNTERS}

    @torch.no_grad()
    def scatter_(self, shard: SAE, tensors: dict[str, Tensor] | None) -> None:
        """Fill this rank's shard (its parameters and buffers) from the whole SAE's `tensors`,
        which rank 0 holds (None elsewhere): slices scattered, the rest broadcast."""
        axes = shard.latent_axes
        for name, local in shard.state_dict().items():
            whole = None if tensors is None else tensors[name].to(local.device, local.dtype)
            if name in axes:
                chunks = None
                if whole is not None:
                    chunks = [
                        shard_of(whole, axes[name], self.size, r % self.size).contiguous()
                        for r in range(self.dist.world_size)
                    ]
                with self.dist._collective("scatter"):
                    tdist.scatter(local, chunks, src=0)
            else:
                if whole is not None:
                    local.copy_(whole)
                self.dist.broadcast_(local)
            torch.autograd.graph.increment_version(local)

    def whole_sae(self, shard: SAE) -> SAE:
        """A fresh whole SAE of which `shard` is a part, in host memory (rank 0's, for the init)."""
        assert shard.shard is not None
        cfg = SAEConfig(**{**shard.cfg.to_dict(), "d_sae": shard.shard.d_sae})
        return create_sae(cfg, compute_dtype=shard.compute_dtype)

    def select(self, sae: SAE) -> Callable[[str, tuple[int, ...]], tuple[slice, ...] | None]:
        """What this rank reads of a whole SAE's training tensors (`ckpt.read_training_state`):
        its range along a sharded tensor's latent axis, all of the others."""
        axes = self._axes(sae)

        def select(name: str, shape: tuple[int, ...]) -> tuple[slice, ...] | None:
            if name not in axes:
                return None
            start, stop = shard_range(shape[axes[name]], self.size, self.rank)
            return tuple(slice(start, stop) if dim == axes[name] else slice(None) for dim in range(len(shape)))

        return select

    def split_optimizer(self, sae: SAE, optimizer: dict[str, Any]) -> dict[str, Any]:
        """This rank's part of a whole SAE's Adam state (resume): copies of its ranges."""
        names, axes = [name for name, _ in sae.named_parameters()], self._axes(sae)

        def part(name: str, t: Tensor) -> Tensor:
            return shard_of(t, axes[name], self.size, self.rank).clone() if name in axes else t.clone()

        state = {
            i: {key: part(names[i], v) if torch.is_tensor(v) and v.dim() else v for key, v in entry.items()}
            for i, entry in optimizer["state"].items()
        }
        return {**optimizer, "state": state}

    def _gather(self, name: str, t: Tensor, axes: dict[str, int]) -> Tensor:
        """One tensor of the whole SAE on rank 0 (its shards' ranges concatenated, on the host);
        on the other shards of data rank 0, their own part."""
        if name not in axes:
            return t.detach().cpu()
        t = t.detach().contiguous()
        parts = [torch.empty_like(t) for _ in range(self.size)] if self.rank == 0 else None
        with self.dist._collective("checkpoint gather"):
            tdist.gather(t, parts, dst=0, group=self.latent_group)
        return torch.cat(parts, axes[name]).cpu() if parts is not None else t

    def gather_tensors(self, sae: SAE, tensors: dict[str, Tensor]) -> dict[str, Tensor] | None:
        """The whole SAE's `tensors` (a shard's, by name) on rank 0, None elsewhere. Only data
        rank 0's shards take part."""
        if self.data_rank != 0:
            return None
        axes = self._axes(sae)
        whole = {name: self._gather(name, t, axes) for name, t in tensors.items()}
        return whole if self.rank == 0 else None

    def gather_optimizer(self, sae: SAE, optimizer: dict[str, Any]) -> dict[str, Any] | None:
        """The whole SAE's Adam state (`split_optimizer` undone) on rank 0, None elsewhere."""
        if self.data_rank != 0:
            return None
        names, axes = [name for name, _ in sae.named_parameters()], self._axes(sae)
        state = {
            i: {
                key: self._gather(names[i], v, axes) if torch.is_tensor(v) and v.dim() else v
                for key, v in entry.items()
            }
            for i, entry in optimizer["state"].items()
        }
        return {**optimizer, "state": state} if self.rank == 0 else None
