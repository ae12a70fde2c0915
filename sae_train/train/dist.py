"""Distributed data-parallel plumbing: process group set-up and the few collectives used.

Every rank calls every collective the same number of times: the trainer runs a fixed number
of steps on every rank, each step makes the same gradient all-reduces (one per parameter of
every SAE) and one small all-reduce of statistics that carries the decisions (stop on a
signal, stop on a non-finite loss), so no rank ever waits on one that left.

A rank that dies (killed, out of memory, its node lost) or hangs makes the collective of every
other rank fail — at once when its connections close, else after the process group's timeout
— and they stop with a `UserError` that says so and how to resume, instead of a backend trace.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as tdist
from torch import nn

from sae_train.distenv import torchrun
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

    def start_grad_average(self, params: Sequence[nn.Parameter]) -> Callable[[], None]:
        """Start averaging the gradients of `params` over ranks, in place and in their own
        dtype (fp32 master gradients: no flat copy, no fp64), asynchronously so the reduction
        overlaps whatever the caller queues next (the next SAE of a sweep). Call the returned
        function before using the gradients: it waits and divides by the world size.
        A missing gradient (a parameter the loss did not reach) is reduced as zeros, so every
        rank makes the same collectives."""
        if self.world_size == 1:
            return lambda: None
        grads = []
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        with self._collective("gradient all-reduce"):
            works = [tdist.all_reduce(g, op=tdist.ReduceOp.SUM, async_op=True) for g in grads]

        def finish() -> None:
            with self._collective("gradient all-reduce"):
                for work in works:
                    work.wait()
            torch._foreach_div_(grads, float(self.world_size))

        return finish

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
    job = torchrun()
    if job.world_size <= 1:
        return Dist(device=dev)
    if dev.type == "cuda":  # resolve_device picked this rank's own GPU (its local rank)
        torch.cuda.set_device(dev)
    if not tdist.is_initialized():
        tdist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s))
    return Dist(rank=job.rank, world_size=job.world_size, device=dev)


def shutdown(dist: Dist) -> None:
    if dist.world_size > 1 and tdist.is_initialized():
        tdist.destroy_process_group()
