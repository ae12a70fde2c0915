"""`sae-train train` configuration."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from sae_train.data import DataConfig, TextConfig
from sae_train.errors import UserError
from sae_train.lm import ModelConfig
from sae_train.lm.sites import expand_layer_sites, layer_target
from sae_train.sae import SAEConfig

SOURCES = ("store", "live")
COMPUTE_DTYPES = ("auto", "bfloat16", "float32")


@dataclass
class WandbConfig:
    """Weights & Biases logging (metrics JSONL is always written)."""

    enabled: bool = False
    project: str = "sae-train"
    entity: str = ""
    mode: str = "auto"
    """online | offline | auto (offline when no API key is configured)."""
    name: str = ""
    """Run name; empty = derived from out_dir."""


@dataclass
class TrainConfig:
    """Train one or more SAEs on one activation stream."""

    source: str = "store"
    """store (read `store`) | live (run `model` over `data`; no disk)."""
    store: str = ""
    """Activation store directory written by `sae-train cache` (source=store)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """source=live: the model to run."""
    data: DataConfig = field(default_factory=DataConfig)
    """source=live: the text to run it on (its train split)."""
    text: TextConfig = field(default_factory=TextConfig)
    """source=live: how the text becomes windows (a store records its own)."""
    sites: list[str] = field(default_factory=list)
    """Sites to train on (each SAE reads one); empty = every site in the store (source=store)
    except `sae.target`. A transcoder (sae.target set) reads these and writes the target."""
    sae: SAEConfig = field(default_factory=SAEConfig)
    sweep: dict[str, list[Any]] = field(default_factory=dict)
    """One-pass sweep: SAE fields (or `lr`) to vary, e.g. +sweep.k=[16,32,64]. Every
    combination, for every site, trains at once on the same activations (read or computed once)."""
    n_tokens: int = 1_000_000
    """Training tokens (every SAE sees each one once)."""
    batch_size: int = 4096
    """Global batch in tokens (split evenly across DDP ranks)."""
    lr: float = 0.0
    """Adam learning rate; 0 = the architecture's default, base_lr * sqrt(16384 / d_sae) (base_lr
    1.6e-3, lower for some architectures): 3e-3 at d_sae 4608. See `SAE.default_lr` in
    sae_train/sae/base.py for how it was chosen."""
    lr_warmup: float = 0.05
    """Fraction of steps of linear LR warm-up."""
    lr_decay: float = 0.2
    """Fraction of steps, at the end, of linear LR decay to zero."""
    sparsity_warmup: float = 0.05
    """Fraction of steps over which the sparsity coefficient ramps from 0 to its value."""
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    """Max global gradient norm per SAE (0 = off)."""
    dtype: str = "auto"
    """Matmul dtype: bfloat16 | float32 | auto (bfloat16 where the device computes it natively).
    Master weights and optimizer state stay float32."""
    device: str = "auto"
    """cpu | cuda | auto. Under torchrun each rank takes its LOCAL_RANK GPU."""
    dist_timeout_s: float = 1800.0
    """DDP: seconds a rank waits in a collective for the others before it stops with an error
    (a hung rank or a lost node; a rank that dies on a healthy node fails the others at once).
    It must exceed the longest rank-0-only work: a checkpoint save, a periodic eval."""
    init_tokens: int = 32_768
    """Tokens sampled once to set the normalisation constant and b_dec."""
    dead_after_tokens: int = 20_000
    """A latent that has not fired for this many tokens counts as dead and is revived by its
    architecture's method (`SAE.revival`: AuxK for the TopK family, resampling for ReLU). Short,
    so revival starts early; on SmolLM2 at the reference budget it halves the latents that
    never fire on held-out text vs 250k."""
    resample_every: float = 0.25
    """Architectures that revive by resampling: resample dead latents at these fractions of the
    run (0 = never)."""
    checkpoint_every_tokens: int = 0
    """Write a checkpoint every N tokens (0 = only at the end and on SIGTERM/SIGINT)."""
    log_every: int = 10
    """Steps between metric lines."""
    shuffle_window: int = 8
    """source=store: shards shuffled together."""
    live_buffer_tokens: int = 65_536
    """source=live: activations computed and shuffled together."""
    eval_every_tokens: int = 0
    """Evaluate the SAEs on held-out text every N training tokens and at the end, logged with
    the training metrics (0 = off). Needs the model: the store's recorded one, or `model`."""
    eval_tokens: int = 4096
    """Held-out tokens per periodic eval (the same tokens every time, so numbers compare)."""
    seed: int = 0
    out_dir: str = "runs/sae"
    resume: bool = True
    """Continue from the checkpoint in out_dir when there is one (same config required)."""
    progress: bool = True
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise UserError(f"source='{self.source}' must be one of {', '.join(SOURCES)}.")
        if self.source == "store" and not self.store:
            raise UserError("source=store needs store=<directory written by sae-train cache> (or use source=live).")
        if self.source == "live" and not self.sites:
            raise UserError("source=live needs sites=[...] (which activations to compute).")
        if self.dtype not in COMPUTE_DTYPES:
            raise UserError(f"dtype='{self.dtype}' must be one of {', '.join(COMPUTE_DTYPES)}.")
        if self.n_tokens < self.batch_size or self.batch_size <= 0:
            raise UserError(f"n_tokens={self.n_tokens} must be at least one batch (batch_size={self.batch_size}).")
        if "target" in self.sweep:
            raise UserError(
                "sweep.target: one run has one target site; train each target in its own run "
                "(or several source sites, sites=[...], towards one target)."
            )
        if self.sae.target and self.sites == [self.sae.target]:
            raise UserError(
                f"sites=[{self.sae.target}] equals sae.target: a transcoder reads another site than it writes. "
                "Set sites to its source (e.g. blocks.L.mlp.hook_in), or remove sae.target for an SAE."
            )
        for key in self.sweep:
            if key not in SAEConfig.__dataclass_fields__ and key != "lr":
                raise UserError(
                    f"sweep key '{key}' is not an SAE field or lr; valid: lr, {', '.join(SAEConfig.__dataclass_fields__)}."
                )
        if not 0 <= self.lr_warmup + self.lr_decay <= 1 or not 0 <= self.sparsity_warmup <= 1:
            raise UserError("lr_warmup + lr_decay and sparsity_warmup are fractions of the run in [0, 1].")

    def targets(self, sites: list[str]) -> list[str]:
        """The distinct transcoder targets of training sites `sites` (`sae.target`, whose
        `{layer}` takes each site's layer); none for SAEs."""
        if not self.sae.target:
            return []
        return list(dict.fromkeys(layer_target(self.sae.target, s) for s in sites))

    def data_sites(self, n_layers: int) -> list[str]:
        """The sites the activation stream must carry: `sites` (a pattern `blocks.*.KIND` expanded
        over n_layers layers) plus their transcoder targets; empty: every site of the store."""
        sites = expand_layer_sites(self.sites, n_layers)
        return sites + [t for t in self.targets(sites) if t not in sites]

    @property
    def n_steps(self) -> int:
        return self.n_tokens // self.batch_size


_LEGACY_TEXT_KEYS = ("context_size", "prepend_bos", "exclude_special_tokens")
"""Text settings that runs saved before TextConfig (0.1.0) kept at the top level."""


def comparable(config: dict[str, Any]) -> dict[str, Any]:
    """The fields of a TrainConfig dict that a resumed run must share with the original (the rest
    may change). Runs written by older versions compare in today's shape: text settings saved at
    the top level as the `text` block, SAE fields added since (e.g. `target`) as their defaults."""
    free = {
        "progress",
        "log_every",
        "checkpoint_every_tokens",
        "wandb",
        "resume",
        "out_dir",
        "device",
        "dist_timeout_s",
    }
    out = {k: v for k, v in config.items() if k not in free}
    if "text" not in out and any(k in out for k in _LEGACY_TEXT_KEYS):
        out["text"] = {k: out.pop(k) for k in _LEGACY_TEXT_KEYS if k in out}
    if isinstance(out.get("sae"), dict):
        out["sae"] = {**dataclasses.asdict(SAEConfig()), **out["sae"]}
    return out
