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

from sae_train.sae import SAEConfig  # noqa: E402
from sae_train.train import TrainConfig  # noqa: E402
from tests import tiny  # noqa: E402
from tests.synthetic import true_directions, write_store  # noqa: E402

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


@pytest.fixture(scope="session")
def synthetic_store(tmp_path_factory):
    """A factory: synthetic_store(n_tokens, n_features=64, d_in=32, tokens_per_shard=8192) -> an
    activation store of sparse combinations of known directions (tests/synthetic.py, site
    "synthetic", directions `true_directions(n_features, d_in)`), written once per session per
    shape and shared by every test module that trains on it. Tests read it; none writes to it."""
    made: dict[tuple[int, int, int, int], Path] = {}

    def make(n_tokens: int, n_features: int = 64, d_in: int = 32, tokens_per_shard: int = 8192) -> Path:
        key = (n_tokens, n_features, d_in, tokens_per_shard)
        if key not in made:
            root = tmp_path_factory.mktemp(f"synthetic-{n_tokens}-{n_features}x{d_in}") / "store"
            made[key] = write_store(
                root, true_directions(n_features, d_in), n_tokens, tokens_per_shard=tokens_per_shard
            )
        return made[key]

    return make


def tiny_topk(**overrides: object) -> TrainConfig:
    """The tiny training run the suite builds on: TopK k=4 at 4x over a synthetic store, fp32,
    batch 512, no progress bar; `overrides` are TrainConfig fields (store and out_dir at least)."""
    base: dict[str, object] = dict(
        n_tokens=8192,
        batch_size=512,
        dtype="float32",
        progress=False,
        sae=SAEConfig(architecture="topk", k=4, expansion_factor=4),
    )
    return TrainConfig(**(base | overrides))  # type: ignore[arg-type]
