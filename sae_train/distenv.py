"""Where this process stands among its peers, read from the launcher's environment in one place.

Two questions, two answers:
- `torchrun()`: this process's place in one DDP job (torchrun's RANK, WORLD_SIZE, LOCAL_RANK).
  Training joins that process group, and only its rank 0 prints a stage's summary. The tasks of
  a Slurm job array are separate jobs (submitit sends a sweep as an array), never DDP ranks.
- `store_writers()`: this process's place among the processes writing one activation store
  together: torchrun ranks, the tasks of a Slurm job array, or srun tasks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from sae_train.errors import UserError


@dataclass(frozen=True)
class Torchrun:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    """Index among this node's processes: which GPU this rank takes."""


def _int(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise UserError(
            f"Environment variable {name}={value!r} is not an integer; it is set by the launcher "
            "(torchrun, Slurm). Unset it, or launch through torchrun/srun."
        ) from None


def torchrun() -> Torchrun:
    """This process's place in the torchrun job describing it; a world of one outside torchrun."""
    if "WORLD_SIZE" not in os.environ or _int("WORLD_SIZE") <= 1:
        return Torchrun()
    if "RANK" not in os.environ:
        raise UserError(
            f"WORLD_SIZE={os.environ['WORLD_SIZE']} is set but RANK is not: launch every rank with "
            "torchrun (it sets both), or unset WORLD_SIZE for a single process."
        )
    local = _int("LOCAL_RANK") if "LOCAL_RANK" in os.environ else 0
    return Torchrun(rank=_int("RANK"), world_size=_int("WORLD_SIZE"), local_rank=local)


def local_rank() -> int | None:
    """This process's index among its node's processes (torchrun's LOCAL_RANK, else srun's
    SLURM_LOCALID): which GPU it takes. None outside a launcher."""
    for name in ("LOCAL_RANK", "SLURM_LOCALID"):
        if name in os.environ:
            return _int(name)
    return None


def is_main_process() -> bool:
    """Rank 0 of a torchrun job, or a process outside one: where one-per-job output belongs."""
    return torchrun().rank == 0


def store_writers(rank: int = -1, world_size: int = -1) -> tuple[int, int]:
    """(rank, world size) among a store's writers: the given pair when both are set, else
    torchrun's, a Slurm job array's, srun's, or (0, 1)."""
    if rank >= 0 and world_size > 0:
        return rank, world_size
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        job = torchrun()
        return job.rank, job.world_size
    if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        offset = _int("SLURM_ARRAY_TASK_ID") - (_int("SLURM_ARRAY_TASK_MIN") if "SLURM_ARRAY_TASK_MIN" in env else 0)
        step = _int("SLURM_ARRAY_TASK_STEP") if env.get("SLURM_ARRAY_TASK_STEP") else 1
        task, world = offset // step, _int("SLURM_ARRAY_TASK_COUNT")
        if offset % step or not 0 <= task < world:
            raise UserError(
                f"Slurm array task {env['SLURM_ARRAY_TASK_ID']} is not rank {task} of an evenly spaced array of {world} "
                "tasks, so some shards would never be computed. Submit --array=0-N (or min-max:step), or pass "
                "rank= and world_size= explicitly (slurm/cache_array.sbatch does)."
            )
        return task, world
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return _int("SLURM_PROCID"), _int("SLURM_NTASKS")
    return 0, 1
