"""The `SAE` interface shared by every architecture, and its output types.

Math (every architecture): f = sigma((x - b_dec) @ W_enc + b_enc), x_hat = f @ W_dec + b_dec.
A transcoder (cfg.target set: it writes another site than it reads, of width d_out) does not
centre its input, b_dec living in the output space: f = sigma(x @ W_enc + b_enc), y_hat =
f @ W_dec + b_dec [+ x @ W_skip], and its losses compare y_hat with the target site's batch.
Parameters are fp32 master weights; `compute_dtype` (float32 or bfloat16) is the dtype of the
encoder/decoder GEMMs only. `forward` has training semantics and returns the losses;
`encode`/`decode` have inference semantics. A training model works in normalised units (the
trainer scales inputs to E||x|| = 1); `fold(scale)` turns it into the shipped artifact that
acts on raw activations with unit-norm decoder rows (DESIGN.md, Contract 2).

Each architecture has two implementations of `forward`: a fast fused CPU path
(sae_train/sae/ops.py + kernels) and a plain-PyTorch path (`_forward_torch`: what CUDA runs;
sparse for the TopK family, sae/sparse.py), selected per call by `_fast_path`; tests pin both
to a naive dense reference. (One without kernels has only the PyTorch path.)
"""

from __future__ import annotations

import abc
import copy
import math
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from sae_train.errors import UserError
from sae_train.sae import kernels
from sae_train.sae.config import SAEConfig
from sae_train.sae.shard import LatentShard

_COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float64)
CHUNK_TOKENS = 4096
"""Tokens per pass of `encode` and `init_from_data`: their [n, d_sae] temporaries (pre-activations,
selection keys) stay at this many rows whatever n (the trainer's init sample is 32,768 tokens)."""

Revival = Literal["auxk", "resample", "none"]

DENSE_STEP_GEMMS = ("encoder", "decoder", "latent_grad", "decoder_grad", "encoder_grad")
"""The five dense GEMMs of a step whose latents are dense: encoder forward x @ W_enc, decoder
forward f @ W_dec, latent gradient, decoder- and encoder-weight gradients (train/roofline.py
times them by these names)."""


class _GemmCopies(dict):
    """name -> ((data_ptr, version) of the parameter, its copy in the GEMM dtype). A cache:
    never copied with the module (deepcopy, e.g. `fold`) and not part of the state dict."""

    def __deepcopy__(self, memo: dict) -> _GemmCopies:
        return _GemmCopies()


@dataclass
class SparseLatents:
    """Active latents of a batch in CSR form (TopK family).

    Token b owns entries offsets[b]:offsets[b+1] of `indices` (latent ids, ascending) and
    `values` (fp32, after ReLU; zeros possible when fewer than k pre-activations are
    positive). TopK has exactly k entries per token, so `values.view(B, k)` works.
    """

    values: Tensor
    indices: Tensor
    offsets: Tensor
    d_sae: int

    def to_dense(self) -> Tensor:
        """[B, d_sae] fp32 latents."""
        n_tokens = self.offsets.numel() - 1
        rows = torch.repeat_interleave(
            torch.arange(n_tokens, device=self.offsets.device), self.offsets.diff(), output_size=self.indices.numel()
        )
        dense = torch.zeros(n_tokens, self.d_sae, dtype=self.values.dtype, device=self.values.device)
        dense[rows, self.indices] = self.values
        return dense


@dataclass
class SAEOutput:
    """Result of `SAE.forward` (training semantics, normalised units)."""

    x_hat: Tensor
    """[B, d_out] fp32 reconstruction (of the target, for a transcoder)."""
    losses: dict[str, Tensor]
    """"loss": the total to backward; plus each term unweighted ("mse", and "l1" | "l0" |
    "auxk"), so loss = mse + coefficient * term."""
    l0: Tensor
    """Scalar: mean number of nonzero latents per token (detached)."""
    fired: Tensor
    """bool [d_sae]: latents nonzero on at least one token of the batch (dead-latent tracking)."""
    latents: Tensor | SparseLatents
    """Dense [B, d_sae] in compute_dtype (ReLU family) or `SparseLatents` (TopK family);
    detached."""
    stats: dict[str, Tensor] = field(default_factory=dict)
    """Detached per-batch numbers that `after_step` consumes (BatchTopK: "min_kept")."""


class SAE(nn.Module, abc.ABC):
    """Base class; subclasses set `architecture` and their traits and implement the abstract hooks.

    The traits are everything the rest of sae_train knows about an architecture (read through
    the registry, sae/registry.py): no other room branches on an architecture's name.
    """

    architecture: ClassVar[str]
    """Its name in configs and cfg.json (`sae.architecture`)."""
    max_dead: int | None = None
    """A host-side upper bound on the latents `dead_mask` marks, set by the trainer before each
    step (from statistics it reads one step late, so no sync): AuxK's PyTorch path then works on a
    [B, max_dead] slice of the pre-activations (`torch.nonzero_static`) instead of all d_sae
    columns, with the same result as long as the bound holds (dead latents beyond the first
    max_dead by id would sit out). None: no bound. Architectures without AuxK ignore it."""
    progress: float = 1.0
    """The fraction of the run done before this step, set by the trainer before each step (as
    max_dead): what an architecture's own schedule reads (`topk.annealed_k`). 1 outside training."""
    config_fields: ClassVar[frozenset[str]] = frozenset()
    """The architecture-specific SAEConfig fields it reads (k, l1_coefficient, ...); the
    generic ones (d_in, d_sae, b_dec_init, seed, ...) apply to every architecture."""
    revival: ClassVar[Revival] = "none"
    """How dead latents come back: "auxk" (the forward's auxiliary loss trains the latents in
    `dead_mask`), "resample" (the trainer re-points them, train/resample.py) or "none"."""
    step_gemms: ClassVar[tuple[str, ...]] = DENSE_STEP_GEMMS
    """The dense GEMMs one training step cannot avoid (the roofline, train/roofline.py)."""
    base_lr: ClassVar[float] = 1.6e-3
    """Adam lr at d_sae = 2**14 (see `default_lr`)."""
    inference_tensors: tuple[str, ...] = ("W_enc", "W_dec", "b_enc", "b_dec")
    """The tensors of the folded checkpoint (Contract 2) and of its SAELens export (a trait; an
    instance with a skip connection adds W_skip)."""
    saelens_architecture: ClassVar[str] = "standard"
    """The SAELens v6 inference architecture that computes what the folded SAE computes
    (sae/saelens.py)."""
    fused_transcoders: ClassVar[bool] = False
    """Whether `_forward_fast` also trains transcoders (its fused ops take the encoder's input and
    the target apart); else transcoders train through `_forward_torch`."""
    saelens_training_architecture: ClassVar[str] = "standard"
    """SAELens's name for how it was trained (`metadata.training_architecture`). Where it equals
    `saelens_architecture`, SAELens SAEs of that architecture load as this one."""
    latent_axes: ClassVar[dict[str, int]] = {"W_enc": 1, "W_dec": 0, "b_enc": 0}
    """Tensor name -> its latent dimension: what a latent shard holds a slice of (sae/shard.py);
    the other tensors are copied on every shard."""
    shardable_latents: ClassVar[bool] = True
    """Whether its latents can be split over ranks (`parallel.latent_shards`, sae/shard.py)."""
    shard: LatentShard | None = None
    """Set on a latent shard (an SAE holding a contiguous range of a wider SAE's latents): its
    training forward then selects and decodes together with the other shards (sae/shard.py)."""
    gemm_weight_names: ClassVar[tuple[str, ...]] = ("W_enc", "W_dec")
    """The parameters the GEMMs read in compute_dtype (`gemm_weight`): the optimizer step writes
    their bf16 copies (train/update.py)."""
    transcoder_k_anneal: ClassVar[float] = 0.0
    """`SAEConfig.k_anneal`'s default for a transcoder (an SAE's is 0): the measured default of
    the architectures that read it (sae/topk.py)."""
    cross_layer: ClassVar[bool] = False
    """Whether it reads one site per layer at once (a cross-layer transcoder, sae/clt.py): one
    SAE per run over all its sites, `forward` on [B, L, d_in] with targets [B, L, d_out]."""

    def __init__(self, cfg: SAEConfig, *, compute_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if not cfg.is_resolved:
            raise UserError(
                "SAE config has d_in=0 (unknown input width); build the SAE from "
                "cfg.resolved(d_in) once the activation width is known."
            )
        if cfg.architecture != self.architecture:
            raise ValueError(f"{type(self).__name__} got a config for {cfg.architecture!r}")
        self.cfg = cfg
        self.compute_dtype = compute_dtype
        # "auto": fused kernels where they apply, else PyTorch; "torch": always PyTorch.
        self.impl = "auto"
        # An inference copy made by `fold` (or loaded from a checkpoint) acts on raw
        # activations; normalization_scale is the scale folded into it (x_raw * scale = x_norm),
        # target_normalization_scale the target's (a transcoder's; the same for an SAE).
        self.folded = False
        # Cross-layer transcoders record one scale per layer.
        self.normalization_scale: float | list[float] = 1.0
        self.target_normalization_scale: float | list[float] = 1.0
        self._gemm_copies = _GemmCopies()  # see gemm_weight
        self._init_parameters(torch.Generator().manual_seed(cfg.seed))

    def _init_parameters(self, gen: torch.Generator) -> None:
        """Create the parameters (and buffers) at their initial values, drawn from `gen`."""
        cfg = self.cfg
        d_in, d_out, d_sae = cfg.d_in, cfg.d_out, cfg.d_sae
        W_dec = torch.randn(d_sae, d_out, generator=gen)
        W_dec *= self._decoder_init_norm() / W_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec)
        if cfg.is_transcoder:  # input and output spaces differ: an independent encoder, unit-norm columns
            W_enc = torch.randn(d_in, d_sae, generator=gen)
            W_enc /= W_enc.norm(dim=0, keepdim=True)
        else:
            W_enc = W_dec.t().contiguous()  # row-major: the layout the GEMMs and grads use
        self.W_enc = nn.Parameter(W_enc)
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.b_dec = nn.Parameter(torch.zeros(d_out))
        if cfg.skip:
            self.W_skip = nn.Parameter(torch.zeros(d_in, d_out))
            self.inference_tensors = (*type(self).inference_tensors, "W_skip")

    # ------------------------------------------------------------------ architecture hooks

    @property
    def n_latents(self) -> int:
        """Latents tracked for dead-latent revival (`SAEOutput.fired`, `dead_mask`): d_sae, or
        one block of d_sae per layer for a cross-layer transcoder."""
        return self.cfg.d_sae

    @property
    def unit_norm_decoder(self) -> bool:
        """Whether decoder rows are kept at unit norm during training."""
        return True

    def _decoder_init_norm(self) -> float:
        return 1.0

    @classmethod
    def check_config(cls, cfg: SAEConfig) -> None:
        """Raise a UserError (`config_error`) for settings this architecture cannot train with."""

    def default_lr(self) -> float:
        """Adam lr that works untuned: base_lr * sqrt(2^14 / d_sae), the width scaling of Gao et
        al. (2024) with a base 8x theirs (1.6e-3; lower where an architecture needs it). Chosen
        on SmolLM2-135M at the reference budget (1M tokens, batch 4096: 244 steps), where their
        2e-4 leaves FVU at 0.14 against 0.075; the decay at the end of the schedule keeps it
        safe for long runs."""
        return self.base_lr * math.sqrt(2**14 / self.cfg.d_sae)

    def _forward_fast(self, x: Tensor, target: Tensor, dead_mask: Tensor | None, sparsity_scale: float) -> SAEOutput:
        """Training forward through the fused kernels (sae/ops.py); autograd-compatible. Called
        with target = x (an SAE), or any target where `fused_transcoders`. An architecture
        without kernels runs its reference forward everywhere."""
        return self._forward_torch(x, target, dead_mask, sparsity_scale)

    @abc.abstractmethod
    def _forward_torch(self, x: Tensor, target: Tensor, dead_mask: Tensor | None, sparsity_scale: float) -> SAEOutput:
        """The same training forward in plain PyTorch: the reference the fused path is tested
        against. The losses compare the reconstruction with `target` (x itself for an SAE; the
        target site's batch, minus the skip term, for a transcoder)."""

    @abc.abstractmethod
    def _activation(self, z: Tensor) -> Tensor:
        """Inference activation on fp32 pre-activations [B, d_sae] (dense)."""

    def _fold_extra(self, latent_scale: Tensor) -> None:
        """Rescale architecture-specific state when latent i is multiplied by latent_scale[i]."""

    # ------------------------------------------------------------------ public API

    def forward(
        self, x: Tensor, *, target: Tensor | None = None, dead_mask: Tensor | None = None, sparsity_scale: float = 1.0
    ) -> SAEOutput:
        """Training step semantics on normalised inputs x [B, d_in]: reconstruction + losses.

        target [B, d_out]: what a transcoder must reproduce (its target site's batch, same rows
        as x); an SAE reconstructs x and takes none. dead_mask (bool [d_sae]) marks latents
        the trainer considers dead (AuxK uses them); sparsity_scale multiplies the sparsity
        coefficient (the trainer's warm-up).

        The skip term s = x @ W_skip is handled here for every architecture: the dictionary is
        trained towards target - s (differentiable in W_skip), which is the same loss as
        ||f @ W_dec + b_dec + s - target||^2, and s is added to the returned reconstruction.
        """
        x = self._check_input(x)
        target = self._check_target(x, target)
        if dead_mask is not None and dead_mask.shape != (self.cfg.d_sae,):
            raise ValueError(f"dead_mask must be bool [{self.cfg.d_sae}], got {tuple(dead_mask.shape)}")
        fast = self._fast_path(x) and (self.fused_transcoders or not self.cfg.is_transcoder) and self.shard is None
        step = self._forward_fast if fast else self._forward_torch
        with torch.autocast(x.device.type, enabled=False):  # compute_dtype decides, not autocast
            if not self.cfg.skip:
                return step(x, target, dead_mask, sparsity_scale)
            skip = self._matmul(x, self.W_skip)
            out = step(x, target - skip, dead_mask, sparsity_scale)
            out.x_hat = out.x_hat + skip
            return out

    def encode(self, x: Tensor) -> Tensor:
        """Dense latents [B, d_sae] (fp32) with inference semantics, `CHUNK_TOKENS` tokens at a time."""
        x = self._check_input(x)
        with torch.autocast(x.device.type, enabled=False):
            if x.shape[0] <= CHUNK_TOKENS:
                return self._activation(self._preact(x))
            out = x.new_empty(x.shape[0], self.cfg.d_sae)
            for start in range(0, x.shape[0], CHUNK_TOKENS):
                out[start : start + CHUNK_TOKENS] = self._activation(self._preact(x[start : start + CHUNK_TOKENS]))
            return out

    def decode(self, f: Tensor) -> Tensor:
        """f @ W_dec + b_dec [B, d_out] (fp32) from dense latents: the reconstruction of an SAE and
        of a transcoder without skip connection (`reconstruct` adds the skip term)."""
        with torch.autocast(f.device.type, enabled=False):
            return self._matmul(f, self.W_dec) + self.b_dec

    def reconstruct(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(latents [B, d_sae], output [B, d_out]) for inputs x with inference semantics:
        decode(encode(x)), plus x @ W_skip for a transcoder with a skip connection."""
        latents = self.encode(x)
        out = self.decode(latents)
        if self.cfg.skip:
            with torch.autocast(x.device.type, enabled=False):
                out = out + self._matmul(self._check_input(x), self.W_skip)
        return latents, out

    @torch.no_grad()
    def init_from_data(self, x: Tensor, target: Tensor | None = None) -> None:
        """Data-dependent initialisation from a sample x [n, d_in] (normalised units) and, for
        a transcoder, the target's rows [n, d_out].

        b_dec: geometric median / mean / zeros (cfg.b_dec_init) of the target. A transcoder,
        whose input b_dec does not centre, gets b_enc = -mean(x) @ W_enc, centring its
        pre-activations on the sample (as sparsify does; uncentred, the input's mean would give
        each latent a fixed offset). Decoders that are not unit-norm (a TopK-family transcoder's
        start at zero) are left as they are. A unit-norm transcoder decoder (ReLU, JumpReLU) gets
        rows aligned with what its latents fire on (`_align_decoder`); for unit-norm decoders,
        W_enc and b_enc are then scaled by the least-squares factor for the sample: x_hat - b_dec is proportional to it (ReLU and top-k
        are positively homogeneous in the pre-activation, W_skip = 0), and with it a ReLU SAE
        does not start at MSE ~ (d_sae/2d_in + 1)^2. The forward runs `CHUNK_TOKENS` tokens at a
        time (BatchTopK selects within each chunk).
        """
        x = self._check_input(x)
        y = self._check_target(x, target)
        if self.cfg.b_dec_init == "geometric_median":
            self.b_dec.copy_(geometric_median(y))
        elif self.cfg.b_dec_init == "mean":
            self.b_dec.copy_(y.mean(0))
        else:
            self.b_dec.zero_()
        if self.cfg.is_transcoder:
            self.b_enc.copy_(-(x.mean(0) @ self.W_enc.float()))
        if not self.unit_norm_decoder:
            return
        if self.cfg.is_transcoder:
            self._align_decoder(x, y)
        num, denom = x.new_zeros(()), x.new_zeros(())
        for chunk, y_chunk in zip(x.split(CHUNK_TOKENS), y.split(CHUNK_TOKENS)):
            r = self.forward(chunk, target=y_chunk if target is not None else None).x_hat - self.b_dec
            num += (r * (y_chunk - self.b_dec)).sum()
            denom += (r * r).sum()
        scale = torch.where(denom > 0, num / denom, torch.ones_like(num))
        scale = torch.where(torch.isfinite(scale) & (scale > 0), scale, torch.ones_like(scale))
        self.W_enc.mul_(scale.to(self.W_enc.dtype))
        self.b_enc.mul_(scale.to(self.b_enc.dtype))

    @torch.no_grad()
    def _align_decoder(self, x: Tensor, y: Tensor) -> None:
        """A transcoder's decoder row i := the centred target averaged over the sample, weighted
        by latent i's ReLU'd (centred) pre-activation, at unit norm: firing helps from step 0,
        where a random decoder independent of the encoder makes every firing latent add noise
        (measured when BatchTopK transcoders still had unit-norm rows, SmolLM2 layer-8 MLP, 1M
        tokens: training FVU 0.224 -> 0.197, latents dead at the end 44% -> 33%). A latent
        positive nowhere keeps its random row."""
        M = torch.zeros_like(self.W_dec)
        for chunk, y_chunk in zip(x.split(CHUNK_TOKENS), y.split(CHUNK_TOKENS)):
            M += torch.relu(self._preact(chunk)).t() @ (y_chunk - self.b_dec)
        norms = M.norm(dim=1, keepdim=True)
        self.W_dec.copy_(torch.where(norms > 0, M / norms.clamp_min(1e-30), self.W_dec))

    @torch.no_grad()
    def constrain_(self) -> None:
        """After each optimizer step: unit-norm decoder rows where the architecture needs them,
        then `constrain_extra_`."""
        if self.unit_norm_decoder:
            self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))
        self.constrain_extra_()

    @torch.no_grad()
    def constrain_extra_(self) -> None:
        """Architecture-specific constraints besides the decoder norm (which the fused optimizer
        step imposes itself, row by row, before calling this). Default: none."""

    def gemm_weight(self, name: str) -> Tensor:
        """Parameter `name` (W_enc or W_dec) in the GEMM dtype, detached.

        The fused optimizer step (sae_train/train/update.py) writes bf16 copies of the weights
        as it updates them, which saves the next forward two casts; they are used while the
        parameter is unchanged since (same storage, same version counter, so any in-place
        change made elsewhere, e.g. load_state_dict or resampling, retires the copy). Otherwise
        a fresh cast.
        """
        p = getattr(self, name)
        entry = self._gemm_copies.get(name)
        if entry is not None and entry[0] == (p.data_ptr(), p._version) and entry[1].dtype == self._gemm_dtype:
            return entry[1]
        return p.detach().to(self._gemm_dtype)

    def gemm_weights(self) -> tuple[Tensor, Tensor]:
        """(W_enc, W_dec) in the GEMM dtype, detached: the `weights` of the fused ops' specs."""
        return self.gemm_weight("W_enc"), self.gemm_weight("W_dec")

    def set_gemm_weight(self, name: str, copy: Tensor) -> None:
        """Record `copy` as parameter `name` in the GEMM dtype, valid until the parameter changes."""
        p = getattr(self, name)
        self._gemm_copies[name] = ((p.data_ptr(), p._version), copy)

    @torch.no_grad()
    def project_grads_(self) -> None:
        """Before the optimizer step: remove the W_dec gradient along each (unit-norm) row.

        The norm constraint is re-imposed after the step anyway; without this projection Adam
        would spend the step partly on a direction that constrain_ undoes.
        """
        if not self.unit_norm_decoder:
            return
        g = self.W_dec.grad
        if g is None:
            return
        w = self.W_dec
        # This runs every step: on CPU vecdot makes a [d_sae, d_in] product first, a row norm does not.
        coef = torch.linalg.vecdot(g, w, dim=1) / torch.linalg.vector_norm(w, dim=1).square().clamp_min(1e-12)
        g.addcmul_(coef.unsqueeze(1), w, value=-1.0)

    @torch.no_grad()
    def after_step(self, out: SAEOutput) -> None:
        """After the optimizer step (and constrain_): update non-gradient state. Default: none."""

    @torch.no_grad()
    def fold(self, scale: float, target_scale: float | None = None) -> SAE:
        """Inference copy acting on raw activations (x_raw * scale = x_normalised; for a
        transcoder, y_raw * target_scale = y_normalised; an SAE has one scale).

        Exact by positive homogeneity: with t = target_scale and f' = f * n / t (n = decoder-row
        norms), W_enc' = W_enc * n * scale / t, b_enc' = b_enc * n / t, W_dec' = W_dec / n,
        b_dec' = b_dec / t, W_skip' = W_skip * scale / t reproduce
        training_model(x_raw * scale).x_hat / t, and thresholds scale like latents (an SAE's
        centring x - b_dec folds the same way: b_dec' = b_dec / scale). A row with zero norm decodes
        to nothing; its latent is scaled by the mean of the other rows' norms, which keeps a TopK
        transcoder's shared-norm ranking (sae/topk.py) and changes nothing else.
        """
        if self.folded:
            raise ValueError("this SAE is already folded; fold the training model instead")
        t = scale if target_scale is None else target_scale
        if not (scale > 0 and t > 0):
            raise ValueError(f"normalization scales must be > 0, got {scale} and {t}")
        if t != scale and not self.cfg.is_transcoder:
            raise ValueError("an SAE has one normalization scale (its input is its target)")
        sae = copy.deepcopy(self)
        norms = sae.W_dec.norm(dim=1)
        mean = norms.sum() / (norms > 0).sum().clamp_min(1)
        norms = torch.where(norms > 0, norms, torch.where(mean > 0, mean, torch.ones_like(mean)))
        latent_scale = norms / t
        sae.W_enc.mul_(norms * (scale / t))
        sae.b_enc.mul_(latent_scale)
        sae.W_dec.div_(norms[:, None])
        sae.b_dec.div_(t)
        if self.cfg.skip:
            sae.W_skip.mul_(scale / t)
        sae._fold_extra(latent_scale)
        sae.folded = True
        sae.normalization_scale, sae.target_normalization_scale = float(scale), float(t)
        return sae

    # ------------------------------------------------------------------ helpers for subclasses

    def _check_input(self, x: Tensor) -> Tensor:
        if x.dim() != 2 or x.shape[1] != self.cfg.d_in:
            raise UserError(
                f"SAE input has shape {tuple(x.shape)}; expected [n_tokens, {self.cfg.d_in}] "
                f"(d_in of this SAE). Feed activations of the site the SAE was built for, "
                f"flattened to one row per token."
            )
        if not x.is_floating_point():
            raise UserError(f"SAE input has dtype {x.dtype}; expected floating-point activations.")
        if self.compute_dtype not in _COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be one of {_COMPUTE_DTYPES}, got {self.compute_dtype}")
        return x.to(self._acc_dtype)

    def _check_target(self, x: Tensor, target: Tensor | None) -> Tensor:
        """The training target: x for an SAE, the given rows [B, d_out] for a transcoder."""
        if not self.cfg.is_transcoder:
            if target is not None:
                raise ValueError("an SAE reconstructs its input; pass no target (set cfg.target for a transcoder)")
            return x
        if target is None:
            raise ValueError(f"a transcoder needs the rows of its target site ({self.cfg.target}) as target")
        if target.shape != (x.shape[0], self.cfg.d_out):
            raise UserError(
                f"Transcoder target has shape {tuple(target.shape)}; expected [{x.shape[0]}, {self.cfg.d_out}]: one row "
                f"of site {self.cfg.target} (width d_out) per input row, the same tokens in the same order."
            )
        return target.to(self._acc_dtype)

    @property
    def _acc_dtype(self) -> torch.dtype:
        """dtype of everything outside the GEMMs: fp32, or fp64 for a float64 model."""
        return torch.promote_types(self.W_enc.dtype, torch.float32)

    def _fast_path(self, x: Tensor) -> bool:
        return (
            self.impl == "auto"
            and x.device.type == "cpu"
            and self.compute_dtype in (torch.float32, torch.bfloat16)
            and self.W_enc.dtype == torch.float32
            and not (torch.is_grad_enabled() and x.requires_grad)
            and kernels.available()
        )

    @property
    def _gemm_dtype(self) -> torch.dtype:
        """dtype of the dense GEMMs: compute_dtype, widened to fp64 for a float64 model."""
        return torch.float64 if self.W_enc.dtype == torch.float64 else self.compute_dtype

    def _matmul(self, a: Tensor, w: Tensor) -> Tensor:
        """a @ w in the GEMM dtype, result in the accumulation dtype."""
        cd = self._gemm_dtype
        return (a.to(cd) @ w.to(cd)).to(self._acc_dtype)

    def _decoded(self, partial: Tensor, rows: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """The training reconstruction partial + b_dec from this SAE's decode of its latents, and
        rows (a per-token sparsity term [B], or None) -- on a latent shard both summed over the
        shards in one all-reduce, b_dec added by shard 0 alone (sae/shard.py)."""
        if self.shard is None:
            return partial + self.b_dec, rows
        if self.shard.comm.rank == 0:
            partial = partial + self.b_dec
        if rows is None:
            return self.shard.sum(partial)[0], None
        x_hat, rows = self.shard.sum(partial, rows)
        return x_hat, rows

    def _encoder_input(self, x: Tensor) -> Tensor:
        """What the encoder multiplies: x - b_dec for an SAE, x for a transcoder."""
        return x if self.cfg.is_transcoder else x - self.b_dec

    def _encoder_centre(self) -> Tensor:
        """The vector the fused ops subtract from x before the encoder: b_dec for an SAE; zeros
        (no gradient) for a transcoder, whose b_dec is an output bias."""
        return self.b_dec.new_zeros(self.cfg.d_in) if self.cfg.is_transcoder else self.b_dec

    def _preact(self, x: Tensor) -> Tensor:
        """Pre-activations (x - b_dec) @ W_enc + b_enc (transcoder: x @ W_enc + b_enc): GEMM in
        compute_dtype, bias in fp32."""
        return _Encoder.apply(x, self._encoder_centre(), self.W_enc, self.b_enc, self.gemm_weight("W_enc"))

    def _mse(self, x_hat: Tensor, x: Tensor) -> Tensor:
        return (x_hat - x).pow(2).sum(-1).mean()


class _Encoder(torch.autograd.Function):
    """(x - b_dec) @ W_enc + b_enc, the GEMM on `W_gemm` (W_enc in the GEMM dtype), the result
    in b_enc's dtype. The backward sums the gradient over tokens before it meets W_enc:
    db_dec = -W_enc @ db_enc, a GEMV instead of a [B, d_sae] x [d_sae, d_in] GEMM."""

    @staticmethod
    def forward(ctx, x: Tensor, b_dec: Tensor, W_enc: Tensor, b_enc: Tensor, W_gemm: Tensor) -> Tensor:  # type: ignore[override]
        xc = (x - b_dec).to(W_gemm.dtype)
        ctx.save_for_backward(xc, W_enc, W_gemm)
        ctx.x_dtype = x.dtype
        return (xc @ W_gemm).to(b_enc.dtype) + b_enc

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        xc, W_enc, W_gemm = ctx.saved_tensors
        gc = g.to(xc.dtype)
        grad_b_enc = g.sum(0)
        grad_W_enc = (xc.t() @ gc).to(W_enc.dtype)
        grad_x = (gc @ W_gemm.t()).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        return grad_x, -(W_enc.detach() @ grad_b_enc), grad_W_enc, grad_b_enc, None


@torch.no_grad()
def geometric_median(x: Tensor, *, max_iter: int = 100, tol: float = 1e-6) -> Tensor:
    """Weiszfeld's algorithm: the point minimising the sum of Euclidean distances to rows of x."""
    guess = x.mean(0, dtype=torch.float64)
    for _ in range(max_iter):
        w = 1.0 / (x - guess.to(x.dtype)).norm(dim=1).clamp_min(1e-12)
        new = (w[:, None] * x).sum(0, dtype=torch.float64) / w.sum(dtype=torch.float64)
        done = (new - guess).norm() <= tol * new.norm().clamp_min(1e-12)
        guess = new
        if done:
            break
    return guess.to(x.dtype)
