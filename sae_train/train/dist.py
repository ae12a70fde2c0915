"""Distributed data-parallel plumbing: process group set-up and the few collectives used.

Every rank calls every collective the same number of times: the trainer runs a fixed number
of steps on every rank, and decisions (stop on a signal, stop on a non-finite loss) travel in
the same per-step all-reduce as the gradients, so no rank ever waits on one that left.

A rank that dies (killed, out of memory, its node lost) or hangs makes the collective of every
other rank fail — at once when its connections close, else after the process group's timeout
— and they stop with a `UserError` that says so and how to resume, instead of a backend trace.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as tdist

from sae_train.errors import UserError
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
            with self._collective("all-reduce"):
                tdist.all_reduce(tensor, op=tdist.ReduceOp.SUM)
        return tensor

    def broadcast_(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        if self.world_size > 1:
            with self._collective("broadcast"):
                tdist.broadcast(tensor, src=src)
        return tensor

    def barrier(self) -> None:
        if self.world_size > 1:
            with self._collective("barrier"):
                tdist.barrier()

    @contextlib.contextmanager
    def _collective(self, name: str) -> Iterator[None]:
        try:
            yield
        except RuntimeError as err:  # gloo and NCCL raise RuntimeError (DistBackendError) for a lost peer or a timeout
            detail = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
            raise UserError(
                f"Rank {self.rank} of {self.world_size} lost the other ranks during a {name} ({detail}). Another rank "
                "stopped (killed, out of memory, its node lost: its own log or the launcher's report names it) or "
                "hung for longer than dist_timeout_s. Rerun the same command to resume from the last checkpoint."
            ) from err


def init_distributed(device: str = "auto", timeout_s: float = 1800.0) -> Dist:
    """Join the process group torchrun (or srun + torchrun) describes in the environment; a
    plain `python`/`sae-train` run is a world of one. NCCL on CUDA, gloo on CPU. A collective
    waits at most `timeout_s` for the other ranks."""
    dev = resolve_device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(device=dev)
    rank = int(os.environ["RANK"])
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    if not tdist.is_initialized():
        tdist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s))
    return Dist(rank=rank, world_size=world, device=dev)


def shutdown(dist: Dist) -> None:
    if dist.world_size > 1 and tdist.is_initialized():
        tdist.destroy_process_group()
