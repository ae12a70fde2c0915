"""Shared fixtures: tiny models saved to disk once per session (loaded like real checkpoints)."""

from __future__ import annotations

import os

# Before anything imports huggingface_hub/transformers (they read these at import time): keep
# the suite offline and quiet. Tests use tiny tensors, so one thread is fastest, and immune to
# OpenMP threads spin-waiting for a core another process holds (a tiny matmul gets 1000x slower).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["OMP_NUM_THREADS"] = "1"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from tests import tiny  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return tiny.tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    """A factory: tiny_model_dir(family) -> directory of a saved tiny random model of that family."""
    made: dict[str, Path] = {}

    def make(family: str) -> Path:
        if family not in made:
            made[family] = tiny.save_tiny_model(tmp_path_factory.mktemp(f"model-{family}"), family, tiny_tokenizer)
        return made[family]

    return make
