"""`sae-train inspect` configuration."""

from __future__ import annotations

from dataclasses import dataclass, field

from sae_train.data import DataConfig
from sae_train.errors import UserError
from sae_train.lm import ModelConfig


@dataclass
class InspectConfig:
    """Feature records and a static browser for one checkpoint, or every checkpoint of a run."""

    checkpoint: str = ""
    """An SAE or transcoder directory (sae.safetensors + cfg.json), or a directory holding several
    (a training run's out_dir, a transcoder set): every checkpoint below it is inspected in one pass."""
    store: str = ""
    """An activation store holding the checkpoints' input sites (any split). Empty = live: run the
    model over the held-out split of `data`."""
    model: ModelConfig = field(default_factory=lambda: ModelConfig(name=""))
    """The language model (tokenizer, unembedding for the logit lens; live mode: the activations).
    name "" = the model the store (else the checkpoints) recorded. The SAEs encode on its device
    (model.device)."""
    data: DataConfig | None = None
    """Live mode only: the text source; empty = the one the checkpoints recorded. Always its eval split."""
    n_tokens: int = 200_000
    """Store rows (tokens) to read, from the first shard on; live: tokens run through the model
    (whole windows, rounded up; excluded special tokens are not rows)."""
    top_k: int = 20
    """Top-activating examples kept per latent."""
    n_quantiles: int = 5
    """Activation quantile bands shown per latent (equal shares of its firings)."""
    quantile_examples: int = 4
    """Examples per quantile band, drawn from a uniform sample of the latent's firings."""
    context_before: int = 16
    """Tokens shown before an example's token (within its window)."""
    context_after: int = 8
    """Tokens shown after an example's token (within its window)."""
    n_logits: int = 10
    """Tokens listed as promoted (top_logits) and suppressed (bottom_logits) by each latent."""
    histogram_bins: int = 64
    """Upper bound on the bins of each latent's activation histogram (equal width from 0)."""
    batch_size: int = 4096
    """Rows encoded at a time (whole windows, at least one)."""
    dtype: str = "auto"
    """Encoder GEMM dtype: bfloat16 | float32 | auto (bfloat16 where the device computes it natively)."""
    seed: int = 0
    """Seed of the firing sample behind the quantile examples."""
    out_dir: str = "runs/inspect"
    """Where index.html (the browser) and one folder per checkpoint go (replaced as a whole)."""
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.checkpoint:
            raise UserError("checkpoint is empty; pass checkpoint=<a checkpoint directory or a training out_dir>.")
        positive = {
            "n_tokens": self.n_tokens,
            "top_k": self.top_k,
            "n_quantiles": self.n_quantiles,
            "quantile_examples": self.quantile_examples,
            "histogram_bins": self.histogram_bins,
            "batch_size": self.batch_size,
        }
        for name, value in positive.items():
            if value <= 0:
                raise UserError(f"{name}={value} must be positive.")
        for name, value in {"context_before": self.context_before, "context_after": self.context_after}.items():
            if value < 0:
                raise UserError(f"{name}={value} must be >= 0.")
        if self.n_logits < 0:
            raise UserError(f"n_logits={self.n_logits} must be >= 0 (0: no logit lens).")
        if self.store and self.data is not None:
            raise UserError("Pass either store=... (read activations from a store) or data=... (live), not both.")

    @property
    def sample_size(self) -> int:
        """Firings sampled per latent for the quantile bands: two candidates per example shown."""
        return 2 * self.n_quantiles * self.quantile_examples
