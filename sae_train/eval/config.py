"""`sae-train eval` configuration."""

from __future__ import annotations

from dataclasses import dataclass, field

from sae_train.data import DataConfig
from sae_train.errors import UserError
from sae_train.lm import ModelConfig


@dataclass
class EvalConfig:
    """Evaluate one checkpoint, or every checkpoint of a sweep, on held-out text."""

    checkpoint: str = ""
    """A checkpoint directory (sae.safetensors + cfg.json), or a directory holding several
    (a training run's out_dir): every checkpoint below it is evaluated in this one call."""
    model: ModelConfig = field(default_factory=lambda: ModelConfig(name=""))
    """The language model. name "" = the model the checkpoints recorded (name, hub id and
    revision), and then dtype "auto" = the dtype they were trained on."""
    data: DataConfig | None = None
    """Text to evaluate on; empty = the data source the checkpoints recorded. Always its eval
    split (data.split is ignored): never text the SAE trained on."""
    n_tokens: int = 20_000
    """Eval budget: tokens run through the model (whole windows, rounded up). Metrics count
    only the ordinary tokens among them (no BOS, padding or excluded special tokens)."""
    batch_size: int = 8
    """Windows per forward pass. Memory per batch: batch_size * context_size * vocab * 4 bytes
    for the clean log-probs that KL needs, and a few tensors that size while a condition is
    scored (e.g. 8 x 1024 x 50k: 1.6 GB each). Lower it for large vocabularies."""
    context_size: int = 0
    """Tokens per window; 0 = the checkpoints' context_size."""
    dense_threshold: float = 0.1
    """A latent firing on more than this fraction of eval tokens counts as dense."""
    out_dir: str = "runs/eval"
    """Where eval.json, eval.md and density.png go."""
    downstream: bool = True
    """Also splice the SAEs into the model: CE loss (clean, SAE, zero and mean ablation), CE
    loss recovered and KL. Off = reconstruction and sparsity metrics only (cheaper)."""
    progress: bool = True
    """Show a progress bar over the eval batches."""

    def __post_init__(self) -> None:
        if not self.checkpoint:
            raise UserError("checkpoint is empty; pass checkpoint=<a checkpoint directory or a training out_dir>.")
        if self.n_tokens <= 0 or self.batch_size <= 0:
            raise UserError(f"n_tokens={self.n_tokens} and batch_size={self.batch_size} must be positive.")
        if self.context_size != 0 and self.context_size < 2:
            raise UserError(f"context_size={self.context_size}; use 0 (the checkpoint's) or at least 2.")
        if not 0.0 < self.dense_threshold <= 1.0:
            raise UserError(f"dense_threshold={self.dense_threshold} must be in (0, 1], e.g. 0.1.")
