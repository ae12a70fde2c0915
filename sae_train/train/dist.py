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
import torch.distributed.nn  # noqa: F401 - before init_process_group: see `init_distributed`
from torch import nn

from sae_train.distenv import torchrun
from sae_train.errors import UserError
from sae_train.lm.model import resolve_device


@dataclass(frozen=True)
class Dist:
    """This process's place among the ranks, and the collectives it takes part in.

    With `group` set it describes a subgroup (the ranks that train one SAE together when the
    run's SAEs are spread over ranks, train/placement.py): rank and world_size are then
    positions within the group, and every collective involves the group's ranks only."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    group: tdist.ProcessGroup | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            with self._collective("all-reduce"):
                tdist.all_reduce(tensor, op=tdist.ReduceOp.SUM, group=self.group)
        return tensor

    def all_to_all_(
        self, output: torch.Tensor, tensor: torch.Tensor, output_splits: list[int], input_splits: list[int]
    ) -> torch.Tensor:
        """Rows input_splits[d] of `tensor` (in order) to rank d; output receives
        output_splits[s] rows from rank s, in rank order."""
        if self.world_size > 1:
            with self._collective("all-to-all"):
                tdist.all_to_all_single(output, tensor, output_splits, input_splits, group=self.group)
        else:
            output.copy_(tensor)
        return output

    def gather_objects(self, obj: object) -> list[object]:
        """Every rank's `obj` (picklable), in rank order: for start-up exchanges, not per step."""
        if self.world_size == 1:
            return [obj]
        gathered: list[object] = [None] * self.world_size
        with self._collective("all-gather"):
            tdist.all_gather_object(gathered, obj, group=self.group)
        return gathered

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
            works = [tdist.all_reduce(g, op=tdist.ReduceOp.SUM, async_op=True, group=self.group) for g in grads]

        def finish() -> None:
            with self._collective("gradient all-reduce"):
                for work in works:
                    work.wait()
            torch._foreach_div_(grads, float(self.world_size))

        return finish

    def broadcast_(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """`src`'s tensor on every rank (src: a rank of this Dist, i.e. within its group)."""
        if self.world_size > 1:
            with self._collective("broadcast"):
                tdist.broadcast(tensor, group_src=src, group=self.group)
        return tensor

    def barrier(self) -> None:
        if self.world_size > 1:
            with self._collective("barrier"):
                tdist.barrier(group=self.group)

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
    waits at most `timeout_s` for the other ranks.

    torch.distributed.nn is imported (at the top of this module) before the group exists: its
    functions take `group=group.WORLD` as a default argument, so imported later (Hugging Face's
    from_pretrained imports it) they would hold the world group for good, `shutdown` could not
    free it, and its gloo threads would still run while the interpreter exits, which now and
    then aborts the rank ("terminate called without an active exception")."""
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
    """Destroy the process groups, joining their threads (none left to race the interpreter's exit)."""
    if dist.world_size > 1 and tdist.is_initialized():
        tdist.destroy_process_group()
