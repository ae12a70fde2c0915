"""A warmed-up training step makes the host wait for the device nowhere (outside log steps).

On CPU: the device-agnostic path (SAE_TRAIN_KERNELS=torch) under `record_sync_ops`, which
lists the ops that force a host-device sync on a GPU. On CUDA (marked `cuda`): the same step
under `torch.cuda.set_sync_debug_mode("error")`.
"""

from __future__ import annotations

import pytest
import torch

from sae_train.sae import SAEConfig
from sae_train.train import TrainConfig, Trainer
from sae_train.train.dist import Dist
from sae_train.train.sources import StoreSource
from tests.syncs import record_sync_ops

ARCHS = ["relu", "jumprelu", "topk", "batchtopk", "matryoshka"]


@pytest.fixture(scope="module")
def store(synthetic_store):
    return synthetic_store(8192, n_features=32, d_in=16)


def _warm_trainer(store, tmp_path, arch: str, device: torch.device) -> tuple[Trainer, object]:
    sae = SAEConfig(architecture=arch, k=4, expansion_factor=4, l1_coefficient=0.05, l0_coefficient=0.01)
    # dead_after_tokens of one batch: latents go dead within the warm-up, so AuxK runs too
    cfg = TrainConfig(
        store=str(store),
        out_dir=str(tmp_path),
        n_tokens=65_536,
        batch_size=256,
        dtype="float32",
        progress=False,
        dead_after_tokens=256,
        resample_every=0.0,
        sae=sae,
    )
    dist = Dist(device=device)
    trainer = Trainer(cfg, StoreSource(cfg.store, [], cfg.batch_size, dist, seed=0, window_shards=2), dist)
    batches = trainer.source.batches(0)
    for _ in range(4):
        trainer.train_step({k: v.to(device) for k, v in next(batches).items()}, 0)
    return trainer, batches


@pytest.mark.parametrize("arch", ARCHS)
def test_warmed_up_step_records_no_sync_op(store, tmp_path, monkeypatch, arch):
    monkeypatch.setenv("SAE_TRAIN_KERNELS", "torch")
    trainer, batches = _warm_trainer(store, tmp_path, arch, torch.device("cpu"))
    batch = next(batches)
    batches.close()  # stops the prefetch thread (an xfail keeps this frame alive)
    with record_sync_ops() as ops:
        trainer.train_step(batch, 0)
    assert ops == []


def test_the_recorder_sees_what_the_old_step_did():
    """What the previous trainer did per step, each one caught."""
    fired, since = torch.rand(64) > 0.5, torch.zeros(64, dtype=torch.long)
    losses = {"loss": torch.tensor(1.0)}
    with record_sync_ops() as ops:
        since[fired] = 0
        torch.tensor(float(256), dtype=torch.float64)
        {k: float(v) for k, v in losses.items()}
        fired.nonzero()
    assert ops == [
        "aten::lift_fresh",
        "aten::index_put_",
        "aten::lift_fresh",
        "aten::_local_scalar_dense",
        "aten::nonzero",
    ]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("arch", ARCHS)
def test_warmed_up_step_does_not_sync_on_cuda(store, tmp_path, arch):
    trainer, batches = _warm_trainer(store, tmp_path, arch, torch.device("cuda"))
    batch = {k: v.to("cuda") for k, v in next(batches).items()}
    batches.close()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        trainer.train_step(batch, 0)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
