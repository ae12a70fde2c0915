"""Distributed data-parallel plumbing: process group set-up and the few collectives used.

Every rank calls every collective the same number of times: the trainer runs a fixed number
of steps on every rank, and decisions (stop on a signal, stop on a non-finite loss) travel in
the same per-step all-reduce as the gradients, so no rank ever waits on one that left.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as tdist

from sae_train.distenv import torchrun
from sae_train.lm.model import resolve_device


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            tdist.all_reduce(tensor, op=tdist.ReduceOp.SUM)
        return tensor

    def broadcast_(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        if self.world_size > 1:
            tdist.broadcast(tensor, src=src)
        return tensor

    def barrier(self) -> None:
        if self.world_size > 1:
            tdist.barrier()


def init_distributed(device: str = "auto") -> Dist:
    """Join the process group torchrun (or srun + torchrun) describes in the environment; a
    plain `python`/`sae-train` run is a world of one. NCCL on CUDA, gloo on CPU."""
    dev = resolve_device(device)
    job = torchrun()
    if job.world_size <= 1:
        return Dist(device=dev)
    if dev.type == "cuda":
        dev = torch.device("cuda", job.local_rank)
        torch.cuda.set_device(dev)
    if not tdist.is_initialized():
        tdist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank=job.rank, world_size=job.world_size, device=dev)


def shutdown(dist: Dist) -> None:
    if dist.world_size > 1 and tdist.is_initialized():
        tdist.destroy_process_group()
