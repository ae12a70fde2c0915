"""`sae-train train` configuration."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sae_train.data import DataConfig, TextConfig
from sae_train.errors import UserError
from sae_train.lm import ModelConfig
from sae_train.lm.sites import LAYER_FIELD, expand_sites, layer_target
from sae_train.sae import SAEConfig
from sae_train.sae.config import default_k_anneal

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
class ParallelConfig:
    """How a torchrun/Slurm run lays its work over the ranks (plain data parallel by default:
    every rank holds every SAE and trains it on its share of each batch). The two layouts below
    do not combine yet: pick one."""

    saes: bool = False
    """Spread the run's SAEs over the ranks: each rank holds and trains only its own (balanced
    by parameter count; more ranks than SAEs form data-parallel groups per SAE), and every
    SAE's rows reach its owners through one all-to-all per site and step. See
    sae_train/train/placement.py for the rule."""
    latent_shards: int = 1
    """Split each SAE's latents over this many ranks (W_enc columns, W_dec rows, b_enc and the
    thresholds in contiguous ranges): one SAE wider than one device's memory. The world size
    must be a multiple of it; the ranks form a data x latent grid (world = data ranks x
    latent_shards). 1 = off. See README "Wide SAEs: parallel.latent_shards"."""

    def __post_init__(self) -> None:
        if not isinstance(self.latent_shards, int) or self.latent_shards < 1:
            raise UserError(
                f"parallel.latent_shards={self.latent_shards!r} must be an integer >= 1 (1 = no latent sharding)."
            )


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
    """Sites to train on (each SAE reads one); `blocks.*.KIND` = that kind at every layer (of the
    model, or present in the store); empty = every site in the store (source=store) except the
    targets. A transcoder (sae.target set) reads these and writes the target."""
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
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

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
                "sweep.target: a run's targets come from sae.target alone, one site or one per source layer "
                "(sae.target=blocks.{layer}.hook_mlp_out); train other targets in their own runs."
            )
        if self.sae.target and self.sae.target.replace(LAYER_FIELD, "*") in self.sites:
            raise UserError(
                f"sites={self.sites} includes sae.target={self.sae.target}: a transcoder reads another site than it "
                "writes. Set sites to its sources (e.g. blocks.L.mlp.hook_in), or remove sae.target for SAEs."
            )
        for key in self.sweep:
            if key not in SAEConfig.__dataclass_fields__ and key != "lr":
                raise UserError(
                    f"sweep key '{key}' is not an SAE field or lr; valid: lr, {', '.join(SAEConfig.__dataclass_fields__)}."
                )
        if self.parallel.saes and self.parallel.latent_shards != 1:
            raise UserError(
                f"parallel.saes=true with parallel.latent_shards={self.parallel.latent_shards}: the two layouts do not "
                "combine yet. Spread whole SAEs over the ranks (parallel.saes=true) or split each SAE's latents "
                "(parallel.latent_shards=N), not both."
            )
        if self.parallel.saes and self.eval_every_tokens:
            raise UserError(
                "eval_every_tokens with parallel.saes=true: periodic eval runs on rank 0, which does not hold every "
                "SAE when they are spread over ranks. Set eval_every_tokens=0 and run `sae-train eval` on the "
                "checkpoints after training."
            )
        if not 0 <= self.lr_warmup + self.lr_decay <= 1 or not 0 <= self.sparsity_warmup <= 1:
            raise UserError("lr_warmup + lr_decay and sparsity_warmup are fractions of the run in [0, 1].")

    def site_pairs(self, available: Sequence[str], *, where: str) -> list[tuple[str, str]]:
        """(site read, site written) of every dictionary of the run, given the sites the
        activation stream can carry (`available`, named `where` in errors): `sites` with its
        patterns (blocks.*.KIND) expanded, or, when empty, every available site that is no
        target; each paired with `sae.target` ({layer}: the source's layer), or itself for an SAE."""
        template = self.sae.target
        if self.sites:
            sources = expand_sites(self.sites, available, where=where)
        else:
            targets = (
                set(expand_sites([template.replace(LAYER_FIELD, "*")], available, where=where)) if template else set()
            )
            sources = [s for s in available if s not in targets]
        pairs = [(s, layer_target(template, s) if template else s) for s in sources]
        same = [s for s, t in pairs if template and s == t]
        if same:
            raise UserError(
                f"sae.target={template} makes site {same[0]} its own target: a transcoder reads another site than it "
                "writes. Set sites to the sources (e.g. blocks.*.mlp.hook_in), or remove sae.target for SAEs."
            )
        return pairs

    @staticmethod
    def data_sites(pairs: Sequence[tuple[str, str]]) -> list[str]:
        """The sites the activation stream must carry for these (source, target) pairs."""
        return list(dict.fromkeys(site for pair in pairs for site in pair))

    @property
    def n_steps(self) -> int:
        return self.n_tokens // self.batch_size


_LEGACY_TEXT_KEYS = ("context_size", "prepend_bos", "exclude_special_tokens")
"""Text settings that runs saved before TextConfig (0.1.0) kept at the top level."""


def comparable(config: dict[str, Any]) -> dict[str, Any]:
    """The fields of a TrainConfig dict that a resumed run must share with the original (the rest
    may change). Runs written by older versions compare in today's shape: text settings saved at
    the top level as the `text` block, SAE fields added since (e.g. `target`) as their defaults,
    except `k_anneal`, which they ran without (a transcoder's default is not 0), compared filled in."""
    free = {
        "progress",
        "log_every",
        "checkpoint_every_tokens",
        "wandb",
        "resume",
        "out_dir",
        "device",
        "dist_timeout_s",
        "parallel",  # the layout over ranks (spread, latent shards) changes where SAEs train, not what they compute
    }
    out = {k: v for k, v in config.items() if k not in free}
    if "text" not in out and any(k in out for k in _LEGACY_TEXT_KEYS):
        out["text"] = {k: out.pop(k) for k in _LEGACY_TEXT_KEYS if k in out}
    if isinstance(out.get("sae"), dict):
        sae = {**dataclasses.asdict(SAEConfig()), "k_anneal": 0.0, **out["sae"]}  # runs before k_anneal: none
        if sae["k_anneal"] is None:
            sae["k_anneal"] = default_k_anneal(sae["architecture"], sae["target"])
        out["sae"] = sae
    return out
