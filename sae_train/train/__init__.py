"""Training: SAEs fitted on an activation stream (store or live), single process or DDP.

    sae_train.train.run(TrainConfig(store="runs/acts", sae=SAEConfig(architecture="topk", k=32)))

Under `torchrun --nproc-per-node N -m sae_train.cli train ...` every rank runs the same
call; see sae_train/train/trainer.py for what keeps the ranks in step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from sae_train.lm import LanguageModel
from sae_train.lm.sites import model_site_names
from sae_train.store import ActivationStore
from sae_train.train.config import TrainConfig, WandbConfig
from sae_train.train.dist import Dist, init_distributed, shutdown
from sae_train.train.latent_shards import data_view
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
    """The run's activation stream, carrying every site its dictionaries read or write (site
    patterns expanded against the store's sites, or the model's)."""
    if cfg.source == "store":
        pairs = cfg.site_pairs(list(ActivationStore(cfg.store).sites), where=f"activation store {cfg.store}")
        return StoreSource(
            cfg.store,
            cfg.data_sites(pairs),
            cfg.batch_size,
            dist,
            seed=cfg.seed,
            window_shards=cfg.shuffle_window,
            targets=[target for site, target in pairs if target != site],
        )
    # Each rank runs its own copy of the model on its own device.
    lm = lm or LanguageModel.load(replace(cfg.model, device=str(dist.device)))
    pairs = cfg.site_pairs(model_site_names(lm.n_layers), where=f"model {lm.identity['name']}")
    return LiveSource(
        lm,
        cfg.data_sites(pairs),
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
        # latent shards of one data rank read the same batches (train/latent_shards.py)
        source = build_source(cfg, data_view(dist, cfg.parallel.latent_shards), lm)
        return Trainer(cfg, source, dist, callbacks).fit()
    finally:
        shutdown(dist)
