"""Rank and world size from the launcher's environment: torchrun, Slurm job arrays, srun."""

from __future__ import annotations

import os

import pytest

from sae_train.distenv import Torchrun, is_main_process, store_writers, torchrun
from sae_train.errors import UserError
from sae_train.train.dist import init_distributed

LAUNCHER_VARS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "SLURM_ARRAY_TASK_ID",
    "SLURM_ARRAY_TASK_COUNT",
    "SLURM_ARRAY_TASK_MIN",
    "SLURM_ARRAY_TASK_STEP",
    "SLURM_PROCID",
    "SLURM_NTASKS",
)


@pytest.fixture
def env(monkeypatch):
    """Set exactly these launcher variables (the others unset)."""

    def set_env(**values: object) -> None:
        for name in LAUNCHER_VARS:
            monkeypatch.delenv(name, raising=False)
        for name, value in values.items():
            monkeypatch.setenv(name, str(value))

    set_env()
    return set_env


def test_a_plain_process_is_a_world_of_one(env):
    assert torchrun() == Torchrun(0, 1, 0) and is_main_process()
    assert store_writers() == (0, 1)
    assert init_distributed("cpu").world_size == 1


def test_torchrun_ranks_train_and_write_stores_together(env):
    env(RANK=2, WORLD_SIZE=4, LOCAL_RANK=1)
    assert torchrun() == Torchrun(rank=2, world_size=4, local_rank=1)
    assert not is_main_process()
    assert store_writers() == (2, 4)
    assert store_writers(rank=0, world_size=1) == (0, 1)  # explicit rank= world_size= win


def test_slurm_array_tasks_write_one_store_but_are_not_ddp_ranks(env):
    env(SLURM_ARRAY_TASK_ID=5, SLURM_ARRAY_TASK_COUNT=4, SLURM_ARRAY_TASK_MIN=1, SLURM_ARRAY_TASK_STEP=2)  # 1,3,5,7
    assert store_writers() == (2, 4)
    # A sweep submitted as an array (submitit) is independent jobs: each trains alone and prints.
    assert torchrun() == Torchrun() and is_main_process()
    assert init_distributed("cpu").world_size == 1
    env(SLURM_ARRAY_TASK_ID=4, SLURM_ARRAY_TASK_COUNT=4, SLURM_ARRAY_TASK_MIN=1, SLURM_ARRAY_TASK_STEP=2)
    with pytest.raises(UserError, match="not rank .* evenly spaced array"):
        store_writers()


def test_srun_tasks_write_one_store(env):
    env(SLURM_PROCID=1, SLURM_NTASKS=3)
    assert store_writers() == (1, 3)
    assert torchrun() == Torchrun()


def test_broken_launcher_environment_is_a_clear_error(env):
    env(WORLD_SIZE=2)
    with pytest.raises(UserError, match="RANK is not"):
        torchrun()
    env(RANK="one", WORLD_SIZE=2)
    with pytest.raises(UserError, match="RANK='one' is not an integer"):
        torchrun()
    assert "RANK" in os.environ  # the fixture set it; monkeypatch restores the real environment
