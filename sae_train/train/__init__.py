"""Training: SAEs fitted on an activation stream (store or live), single process or DDP.

    sae_train.train.run(TrainConfig(store="runs/acts", sae=SAEConfig(architecture="topk", k=32)))

Under `torchrun --nproc-per-node N -m sae_train.cli train ...` every rank runs the same
call; see sae_train/train/trainer.py for what keeps the ranks in step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from sae_train.lm import LanguageModel
from sae_train.lm.sites import layer_count
from sae_train.store import ActivationStore
from sae_train.train.config import TrainConfig, WandbConfig
from sae_train.train.dist import Dist, init_distributed, shutdown
from sae_train.train.signals import Preempted
from sae_train.train.sources import ActivationSource, LiveSource, StoreSource
from sae_train.train.trainer import Callback, SAERun, StepInfo, Trainer, TrainSummary

__all__ = [
    "Callback",
    "Preempted",
    "SAERun",
    "StepInfo",
    "TrainConfig",
    "TrainSummary",
    "Trainer",
    "WandbConfig",
    "build_source",
    "run",
]


def build_source(cfg: TrainConfig, dist: Dist, lm: LanguageModel | None = None) -> ActivationSource:
    if cfg.source == "store":
        stored = list(ActivationStore(cfg.store).sites)
        sites = cfg.data_sites(layer_count(stored))
        return StoreSource(
            cfg.store,
            sites,
            cfg.batch_size,
            dist,
            seed=cfg.seed,
            window_shards=cfg.shuffle_window,
            targets=cfg.targets(sites or stored),
        )
    # Each rank runs its own copy of the model on its own device.
    lm = lm or LanguageModel.load(replace(cfg.model, device=str(dist.device)))
    return LiveSource(
        lm,
        cfg.data_sites(lm.n_layers),
        cfg.data,
        cfg.text,
        cfg.batch_size,
        dist,
        seed=cfg.seed,
        buffer_tokens=cfg.live_buffer_tokens,
    )


def run(cfg: TrainConfig, callbacks: Sequence[Callback] = (), lm: LanguageModel | None = None) -> TrainSummary:
    """Train the SAEs `cfg` describes (resuming a checkpoint in out_dir) and return a summary."""
    dist = init_distributed(cfg.device, cfg.dist_timeout_s)
    try:
        return Trainer(cfg, build_source(cfg, dist, lm), dist, callbacks).fit()
    finally:
        shutdown(dist)
