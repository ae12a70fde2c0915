"""SAE hyperparameters: one structured config for every architecture (OmegaConf/Hydra-ready).

Units: the trainer feeds inputs scaled so that E||x||_2 = 1 per token, and the losses are
`mse = mean_tokens sum_dims (x_hat - x)^2` (about the fraction of variance unexplained, times
the centred share of ||x||^2) plus a sparsity term. The default coefficients below are chosen
for that scale, which makes them mean the same on any model and site.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from sae_train.errors import UserError

SPARSITIES = ("l1", "l1_decnorm")
B_DEC_INITS = ("geometric_median", "mean", "zeros")


def config_error(cfg: SAEConfig, field: str, expected: str, fix: str) -> UserError:
    """The error for a bad field: names it, its value, what was expected and the fix."""
    return UserError(f"SAE config: {field}={getattr(cfg, field)!r} is invalid; expected {expected}. {fix}")


@dataclass
class SAEConfig:
    """Architecture and loss hyperparameters of one sparse autoencoder."""

    architecture: str = "topk"
    """"relu" (L1 penalty), "topk" (k per token, Gao et al. 2024), "batchtopk" (k*B per batch,
    Bussmann et al. 2024), "matryoshka" (BatchTopK with nested prefixes, Bussmann et al. 2025),
    "jumprelu" (learned thresholds + L0 penalty, Rajamanoharan et al. 2024) or "clt" (a
    cross-layer transcoder over many layers, BatchTopK per layer, Ameisen et al. 2025). See
    sae_train/sae/registry.py."""

    d_in: int = 0
    """Input width. 0 = filled in from the data (`resolved(d_in)`)."""

    d_sae: int = 0
    """Number of latents. 0 = expansion_factor * d_in."""

    target: str = ""
    """Transcoders: the site the dictionary writes while it reads another (the training site),
    e.g. blocks.8.hook_mlp_out for an SAE trained at blocks.8.mlp.hook_in. "" = an SAE, which
    reconstructs its own input. Works with every architecture."""

    d_out: int = 0
    """Output width (the target's); 0 = filled in from the data (d_in for an SAE)."""

    skip: bool = False
    """Transcoders: add a linear skip connection x @ W_skip ([d_in, d_out], zero at init) to the
    output (Paulo et al. 2025, "Transcoders beat sparse autoencoders")."""

    n_layers: int = 0
    """clt: the layers a cross-layer transcoder spans (one encoder each; d_sae latents per layer).
    0 = the number of its sites, filled in by the trainer."""

    expansion_factor: int = 8
    """d_sae / d_in when d_sae is 0."""

    k: int = 32
    """topk: active latents per token; batchtopk, matryoshka: the average over a batch."""

    k_anneal: float | None = None
    """topk, batchtopk, matryoshka, clt: the fraction of the run over which the training k falls
    linearly from 2k to k (`topk.annealed_k`); 0 = k from the first step. None = the
    architecture's default for a transcoder (`transcoder_k_anneal`: 0.2 for topk and
    matryoshka, measured in sae/topk.py), 0 for an SAE, whose encoder starts as its decoder's
    transpose (annealing would cost it FVU)."""

    sparsity: str = "l1"
    """relu only. "l1": lambda * sum_i f_i with unit-norm decoder rows (constrained every
    step). "l1_decnorm": lambda * sum_i f_i * ||W_dec[i]|| with free decoder norms (Anthropic,
    April 2024 update)."""

    l1_coefficient: float = 0.06
    """relu: lambda of the L1 term. With unit-norm rows the optimum soft-thresholds each latent
    at about lambda/2; on unit-norm inputs a typical active latent carries 0.05-0.2 of the
    norm, so lambda of a few hundredths zeroes the weak candidates and lands L0 in the tens
    (Anthropic's lambda = 5 at E||x|| = sqrt(d) is 5/sqrt(d) here: 0.2 at d=576). Measured on
    SmolLM2-135M blocks.8.hook_resid_post, expansion 8, 1M tokens in batches of 4096 with the
    default lr: 0.06 -> L0 42 (FVU 0.10, no dead latents), 0.03 -> L0 134, 0.1 -> L0 19 with
    a fifth of the latents dead. The trainer warms it up via sparsity_scale."""

    l0_coefficient: float = 0.0005
    """jumprelu: lambda of the L0 term (lambda * mean_tokens #active). An extra active latent
    is kept when it lowers the MSE by more than lambda. Measured as for l1_coefficient (lr
    2e-3): 0.0005 -> L0 48 (FVU 0.09, 3% dead), 0.0003 -> L0 79, 0.001 -> L0 19 (19% dead); L0
    keeps falling slowly with longer training. Synthetic data with few strong features wants
    more (0.003-0.01)."""

    jumprelu_bandwidth: float = 0.001
    """jumprelu: width eps of the rectangle kernel in the threshold's straight-through
    estimator (Gemma Scope's value, also for unit-norm inputs)."""

    jumprelu_init_threshold: float = 0.001
    """jumprelu: initial threshold theta (Gemma Scope's value): small against typical
    pre-activations (~0.05), so training starts close to a ReLU SAE."""

    aux_k: int = 0
    """topk/batchtopk/matryoshka: latents used by the AuxK loss to model the residual from dead latents.
    0 = d_in // 2 (OpenAI)."""

    aux_coefficient: float = 1 / 32
    """topk/batchtopk/matryoshka: weight of the AuxK loss (OpenAI, 1/32)."""

    batchtopk_threshold_beta: float = 0.999
    """batchtopk, matryoshka, clt: the inference threshold averages the smallest activation kept
    per batch (dictionary_learning's statistic) over about the last tenth of the run, and over at
    most the last ~1/(1 - beta) steps: beta caps the averaging factor (`batchtopk.track_threshold`)."""

    matryoshka_prefixes: list[float] = field(default_factory=lambda: [0.0625, 0.25, 1.0])
    """matryoshka: the nested prefixes, each reconstructing the input from latents 0..m-1
    alone; increasing, the last the whole dictionary. Either all fractions of d_sae (every
    entry <= 1, rounded to the nearest latent) or all widths in latents (integers): [0.0625,
    0.25, 1.0] and [288, 1152, 4608] are the same at d_sae 4608."""

    matryoshka_weights: list[float] = field(default_factory=list)
    """matryoshka: weight of each prefix's MSE in the loss, one per prefix, normalised to sum
    to 1; [] = equal weights (dictionary_learning's default)."""

    b_dec_init: str = "geometric_median"
    """Decoder bias from a data sample: "geometric_median" (Weiszfeld; robust to the
    massive-norm outlier tokens of LMs), "mean" or "zeros"."""

    decoder_init_norm: float = 0.1
    """relu + l1_decnorm: initial norm of each decoder row (Anthropic, April 2024). TopK-family
    transcoders start their rows at zero (sae/topk.py); the other architectures keep unit-norm
    rows."""

    seed: int = 0
    """Seed of the parameter initialisation (independent of the global RNG)."""

    def __post_init__(self) -> None:
        from sae_train.sae.registry import ARCHITECTURES  # late: the registry imports this module

        def bad(field: str, expected: str, fix: str) -> UserError:
            return config_error(self, field, expected, fix)

        if self.architecture not in ARCHITECTURES:
            raise bad(
                "architecture", f"one of {', '.join(sorted(ARCHITECTURES))}", "Set sae.architecture to one of them."
            )
        for name in ("d_in", "d_sae", "d_out", "n_layers", "aux_k", "seed"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise bad(name, "an integer >= 0 (0 = automatic)", f"Fix sae.{name}.")
        if not isinstance(self.expansion_factor, int) or self.expansion_factor < 1:
            raise bad("expansion_factor", "an integer >= 1", "Set sae.expansion_factor (or sae.d_sae directly).")
        if self.sparsity not in SPARSITIES:
            raise bad("sparsity", f"one of {', '.join(SPARSITIES)}", "Fix sae.sparsity.")
        if self.sparsity != "l1" and "sparsity" not in ARCHITECTURES[self.architecture].config_fields:
            users = sorted(name for name, cls in ARCHITECTURES.items() if "sparsity" in cls.config_fields)
            raise bad(
                "sparsity",
                f"'l1' for architecture {self.architecture!r}",
                f"sae.sparsity applies to the {', '.join(users)} architecture only; remove it.",
            )
        if self.b_dec_init not in B_DEC_INITS:
            raise bad("b_dec_init", f"one of {', '.join(B_DEC_INITS)}", "Fix sae.b_dec_init.")
        for name in ("l1_coefficient", "l0_coefficient", "aux_coefficient"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise bad(name, "a finite number >= 0", f"Fix sae.{name}.")
        for name in ("jumprelu_bandwidth", "jumprelu_init_threshold", "decoder_init_norm"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise bad(name, "a finite number > 0", f"Fix sae.{name}.")
        if not isinstance(self.target, str):
            raise bad(
                "target", 'a site name (or "" for an SAE)', "Set sae.target=blocks.<L>.hook_mlp_out, for example."
            )
        if self.skip and not self.target:
            raise bad(
                "skip",
                "false for an SAE",
                "A skip connection is a transcoder option: set sae.target too, or remove sae.skip.",
            )
        if not self.target and self.d_in and self.d_out not in (0, self.d_in):
            raise bad(
                "d_out", f"{self.d_in} (d_in) for an SAE", "Remove sae.d_out, or set sae.target to train a transcoder."
            )
        if not self.target and self.d_in and not self.d_out:
            self.d_out = self.d_in  # an SAE writes what it reads (cfg.json of older versions lacks d_out)
        if self.k_anneal is not None and (not isinstance(self.k_anneal, (int, float)) or not 0 <= self.k_anneal <= 1):
            raise bad(
                "k_anneal", "a fraction of the run in [0, 1] (or null: the default)", "Use e.g. 0.2, or 0 for none."
            )
        if not 0 <= self.batchtopk_threshold_beta < 1:
            raise bad("batchtopk_threshold_beta", "a number in [0, 1)", "Use e.g. 0.999.")
        ARCHITECTURES[self.architecture].check_config(self)

    @property
    def is_transcoder(self) -> bool:
        """Whether it writes another site than it reads (`target`)."""
        return bool(self.target)

    @property
    def k_anneal_fraction(self) -> float:
        """k_anneal with its default filled in (`default_k_anneal`)."""
        return default_k_anneal(self.architecture, self.target) if self.k_anneal is None else float(self.k_anneal)

    @property
    def is_resolved(self) -> bool:
        """Whether d_in and d_out (hence d_sae and aux_k) are known."""
        return self.d_in > 0 and self.d_out > 0

    def resolved(self, d_in: int, d_out: int = 0) -> SAEConfig:
        """A copy with d_in, d_out (the target's width; d_in for an SAE), d_sae, aux_k and
        k_anneal filled in (validated again)."""
        for name, have, got in (("d_in", self.d_in, d_in), ("d_out", self.d_out, d_out)):
            if have and got and have != got:
                raise UserError(
                    f"SAE config: {name}={have} but the activations have width {got}. "
                    f"Remove sae.{name} (it is read from the data) or point the trainer at the right site."
                )
        d_out = d_out or self.d_out or d_in
        return dataclasses.replace(
            self,
            d_in=d_in,
            d_out=d_out if self.target else d_in,
            d_sae=self.d_sae or self.expansion_factor * d_in,
            aux_k=self.aux_k or max(1, d_out // 2),
            k_anneal=self.k_anneal_fraction,
        )

    def to_dict(self) -> dict:
        """Plain dict of the fields (JSON-ready)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, *, source: str = "config") -> SAEConfig:
        """Build from a dict that may hold other keys too (a cfg.json); unknown keys are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in data.items() if k in names})
        except UserError as exc:
            raise UserError(f"{source}: {exc}") from exc
        except TypeError as exc:
            raise UserError(f"{source}: cannot build an SAE config from it ({exc}).") from exc


def default_k_anneal(architecture: str, target: str) -> float:
    """`SAEConfig.k_anneal`'s default: the architecture's `transcoder_k_anneal` for a transcoder
    (a `target`), 0 for an SAE."""
    from sae_train.sae.registry import ARCHITECTURES  # late: the registry imports this module

    return ARCHITECTURES[architecture].transcoder_k_anneal if target else 0.0
