"""The training loop: several SAEs on one activation stream, single process or DDP.

Per step every SAE takes its site's batch (normalised by its own constant; a transcoder also
its target site's rows of the same tokens, normalised by the target's constant; a cross-layer
transcoder every layer's source and target, each by its own constant), computes its loss
and gradients, and starts averaging them over ranks (in place, fp32, asynchronously); then ONE
small all-reduce carries every SAE's batch statistics (loss terms, FVU sums, L0, which latents
fired) and the stop flags. Every rank therefore makes the same decisions (clip, step, dead
latents, stop on a signal or a non-finite loss) at the same step, and the number of
collectives never depends on the data.

No step makes the host wait for the device: metrics are summed on the device and read at log
steps; dead-latent tracking is masked arithmetic; what the host must act on (a non-finite
loss, a stop signal) is copied to host memory asynchronously and read one step later
(`DeferredRead`), and always before a checkpoint is written, so a non-finite step never
reaches a checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from tqdm import tqdm

from sae_train.atomic import staging_dir
from sae_train.errors import UserError
from sae_train.lm.model import resolve_dtype
from sae_train.provenance import provenance
from sae_train.sae import (
    ARCHITECTURES,
    SAE,
    SAEConfig,
    SAEOutput,
    create_sae,
    kernels,
    load_folded,
    load_weights,
    save_sae,
    sparse,
)
from sae_train.sae import checkpoint as ckpt
from sae_train.sae.kernels import keep_freed_memory
from sae_train.train.config import TrainConfig, comparable
from sae_train.train.deferred import DeferredRead
from sae_train.train.dist import Dist
from sae_train.train.feed import device_batches
from sae_train.train.latent_shards import LatentGroups, check_config, shard_config
from sae_train.train.logger import MetricsLogger
from sae_train.train.placement import Placement, Router
from sae_train.train.resample import resample_dead_
from sae_train.train.roofline import step_gemm_seconds
from sae_train.train.schedule import lr_factor, sparsity_factor
from sae_train.train.signals import Preempted, StopSignals
from sae_train.train.sources import ActivationSource
from sae_train.train.update import update

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class SAESlot:
    """What every rank tracks of each SAE of the run, whether it trains it or not: its
    statistics arrive with the step's all-reduce, so every rank makes the same decisions and
    rank 0 logs every SAE (train/placement.py: which ranks own which SAEs)."""

    tag: str
    site: str
    """The site the SAE reads."""
    target: str
    """The site it reconstructs: `site` for an SAE, sae.cfg.target for a transcoder."""
    layers: tuple[tuple[str, str], ...] = ()
    """A cross-layer transcoder (`SAE.cross_layer`): the (source, target) sites of each of its
    layers, in layer order (`site` and `target` are layer 0's); empty for every other SAE."""
    d_sae: int
    """The whole SAE's tracked latents (`SAE.n_latents`: d_sae, L * d_sae for a cross-layer
    transcoder; more than sae.cfg.d_sae when sae is one latent shard of it)."""
    lr: float
    directory: Path
    since_fired: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    """Tokens since each latent last fired (dead-latent tracking)."""
    loss_names: tuple[str, ...] = ()
    """The SAE's loss terms, in the order of its rows in `totals` and the step statistics."""
    stat_sizes: tuple[int, ...] = ()
    """Elements of each of its per-batch `SAEOutput.stats`, in order (the step statistics)."""
    totals: torch.Tensor | None = None
    """On the device: sums since the last log line of the loss terms, then the squared error,
    the variance and the active-latent count (read at log steps only)."""
    lr_now: float = 0.0
    dead_bound: int | None = None
    """Known on the host: an upper bound on the latents dead at the next step (those one batch
    from the dead threshold at the end of the step before, read one step late like the losses).
    0: none can be dead, so the step skips revival work; None: unknown (first step of a call)."""
    dead_count: torch.Tensor | None = None
    """On the device: the whole SAE's dead latents after the last step (read at log steps)."""

    def dead_mask(self, after_tokens: int) -> torch.Tensor:
        return self.since_fired >= after_tokens

    @property
    def all_sites(self) -> tuple[str, ...]:
        """Every site the SAE reads: its sources and targets."""
        pairs = self.layers or ((self.site, self.target),)
        return tuple(dict.fromkeys(site for pair in pairs for site in pair))

    @property
    def stats_size(self) -> int:
        """Elements of its part of the step statistics (`Trainer._batch_stats`)."""
        return len(self.loss_names) + 3 + sum(self.stat_sizes) + self.d_sae


@dataclass(kw_only=True)
class SAERun(SAESlot):
    """One SAE that this rank trains, with everything that belongs to it alone."""

    index: int
    """Its position among the run's SAEs (`sae_plan` order)."""
    sae: SAE
    optimizer: torch.optim.Optimizer
    dist: Dist
    """The ranks that train it together (all of them under data parallel, see train/placement.py)."""
    share: float
    """The fraction of each global batch this rank trains it on."""
    bound_seconds: float
    """Time of the dense GEMMs of one step on this machine (the roofline)."""
    scale: float | list[float] = 1.0
    """Normalisation constant: the SAE sees x * scale, which has unit mean L2 norm (a cross-layer
    transcoder: one per layer)."""
    target_scale: float | list[float] = 1.0
    """The target's (a transcoder's target is y * target_scale, of unit mean norm; = scale for an SAE)."""

    def inference(self) -> SAE:
        """The inference copy acting on raw activations (`SAE.fold` with this run's scales)."""
        return self.sae.fold(self.scale, self.target_scale if self.target != self.site else None)  # type: ignore[arg-type]

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [p for p in self.sae.parameters() if p.requires_grad]


@dataclass
class StepInfo:
    """What callbacks see after each optimizer step."""

    step: int
    n_steps: int
    tokens: int
    runs: list[SAERun]
    """The SAEs this rank trains: all of the run's, unless parallel.saes spreads them."""
    is_main: bool
    """Rank 0 (or the only process): where work like periodic eval belongs."""


Callback = Callable[[StepInfo], dict[str, dict[str, float]] | None]
"""Called after every step on every rank; may return {sae tag: metrics} to log (rank 0's are; e.g. a
periodic eval). It must make the same collective calls on every rank, or none."""


@dataclass
class TrainSummary:
    out_dir: str
    steps: int
    new_steps: int
    """Steps trained by this call (0: the run had already finished and was reused)."""
    tokens: int
    seconds: float
    tokens_per_second: float
    bound_fraction: float
    saes: dict[str, dict[str, Any]]
    """Per SAE: checkpoint directory and the last logged metrics."""

    def table(self) -> str:
        if self.new_steps:
            lines = [
                f"trained      {self.tokens:,} tokens in {self.steps} steps, {self.seconds:,.1f} s "
                f"({self.tokens_per_second:,.0f} tok/s, {self.bound_fraction:.0%} of the GEMM bound)"
            ]
        else:
            lines = [f"finished     {self.tokens:,} tokens in {self.steps} steps (an earlier run; nothing to do)"]
        for tag, info in self.saes.items():
            m = info["metrics"]
            lines.append(
                f"{tag:36s} fvu {m.get('fvu', float('nan')):.4f}  l0 {m.get('l0', float('nan')):7.1f}  "
                f"dead {m.get('dead_fraction', float('nan')):.1%}  -> {info['checkpoint']}"
            )
        return "\n".join(lines)


_step_gemm_seconds = functools.cache(step_gemm_seconds)  # timed once per shape, not once per SAE of a sweep


def enable_tf32() -> None:
    """Let fp32 matmuls on CUDA use TF32 tensor cores (fp32 range and accumulation, 10-bit
    mantissa inputs): what `dtype=float32` means on a GPU, ~8x faster than true FP32.
    Process-wide; NVIDIA_TF32_OVERRIDE=0 in the environment turns it off for strict FP32."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):  # torch >= 2.9
        matmul.fp32_precision = "tf32"
    else:
        matmul.allow_tf32 = True


CROSS_LAYER_TAG = "clt"
"""The tag (checkpoint directory) of a run's cross-layer transcoder, which reads every site."""

Plan = list[tuple[str, tuple[tuple[str, str], ...], dict[str, Any]]]
"""(tag, (site read, site written) pairs, SAE-field overrides) per SAE of the run: one pair for
an SAE or a transcoder, one per layer for a cross-layer transcoder."""


def sae_plan(cfg: TrainConfig, pairs: Sequence[tuple[str, str]]) -> Plan:
    """Every SAE of the run: (source, target) pairs x sweep combinations -- or, for a
    cross-layer architecture, one SAE per sweep combination reading all the pairs."""
    keys = sorted(cfg.sweep)
    cross_layer = ARCHITECTURES[cfg.sae.architecture].cross_layer
    groups = [(CROSS_LAYER_TAG, tuple(pairs))] if cross_layer else [(site, ((site, target),)) for site, target in pairs]
    plan: Plan = []
    for name, read in groups:
        for values in itertools.product(*(cfg.sweep[k] for k in keys)):
            overrides = dict(zip(keys, values))
            suffix = "-".join(f"{k}={v}" for k, v in overrides.items())
            plan.append((f"{name}/{suffix}" if suffix else name, read, overrides))
    return plan


def check_layer_widths(layers: Sequence[tuple[str, str]], width: Callable[[str], int]) -> None:
    """A cross-layer transcoder's sources share one width, and its targets another."""
    for side, name in ((0, "source"), (1, "target")):
        widths = {pair[side]: width(pair[side]) for pair in layers}
        if len(set(widths.values())) > 1:
            raise UserError(
                f"A cross-layer transcoder needs one width for all its {name} sites; got {widths}. "
                "Pick sites of one kind (sites=[blocks.*.mlp.hook_in], sae.target=blocks.{layer}.hook_mlp_out)."
            )


class Trainer:
    def __init__(self, cfg: TrainConfig, source: ActivationSource, dist: Dist, callbacks: Sequence[Callback] = ()):
        self.cfg, self.source, self.dist, self.callbacks = cfg, source, dist, list(callbacks)
        keep_freed_memory()  # reuse the step's big buffers instead of page-faulting them in every step
        self.out_dir = Path(cfg.out_dir)
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise UserError(f"out_dir={self.out_dir} is a file; choose a directory path.")
        self.n_steps = cfg.n_steps
        self.compute_dtype = resolve_dtype(cfg.dtype, dist.device)
        # parallel.latent_shards: each rank holds a range of every SAE's latents (train/latent_shards.py)
        self.shards = None
        if cfg.parallel.latent_shards > 1:
            check_config(cfg)
            self.shards = LatentGroups(dist, cfg.parallel.latent_shards)
        data_ranks = dist.world_size // cfg.parallel.latent_shards
        if cfg.batch_size % data_ranks:
            raise UserError(f"batch_size={cfg.batch_size} must divide evenly across {data_ranks} data ranks.")
        if dist.device.type == "cuda" and self.compute_dtype == torch.float32:
            enable_tf32()
        pairs = cfg.site_pairs(source.sites, where="the activation stream")  # targets are no training sites
        self._place(sae_plan(cfg, pairs))
        self.step = self.tokens = self.position = 0
        self._pending: DeferredRead | None = None  # the last step's losses and stop flags
        self._pending_step = self._pending_start = 0
        self.wandb_id = ""
        self.config_dict = asdict(cfg)
        if dist.is_main:
            ckpt.remove_stale(self.out_dir, [r.directory for r in self.slots])
        if not (cfg.resume and self._restore()):
            self._initialise()
        self.logger = MetricsLogger(self.out_dir, dist.is_main, cfg.wandb, self.config_dict, self.wandb_id)
        self.logger.rewind(self.step)
        self.wandb_id = self.logger.run_id

    # ---- set-up -------------------------------------------------------------------------
    def _place(self, plan: Plan) -> None:
        """Decide which ranks train which SAEs (train/placement.py) and build this rank's:
        `runs` (the SAEs trained here) and `slots` (every SAE of the run, `runs` among them)."""
        configs = [self._sae_config(pairs, overrides) for _, pairs, overrides in plan]
        with torch.device("meta"):  # shapes, parameter counts and default lrs, without memory
            shapes = [create_sae(sae_cfg, compute_dtype=self.compute_dtype) for sae_cfg, _ in configs]
        self.placement = Placement.build(
            [sum(p.numel() for p in shape.parameters()) for shape in shapes],
            self.dist.world_size,
            self.cfg.batch_size,
            spread_saes=self.cfg.parallel.saes,
        )
        groups = self.placement.owner_dists(self.dist)
        owned = set(self.placement.owned(self.dist.rank))
        self.slots: list[SAESlot] = []
        for index, ((tag, pairs, _), (sae_cfg, lr), shape) in enumerate(zip(plan, configs, shapes)):
            slot = SAESlot(
                tag=tag,
                site=pairs[0][0],
                target=pairs[0][1],
                layers=pairs if shape.cross_layer else (),
                d_sae=shape.n_latents,
                lr=lr or shape.default_lr(),
                directory=self.out_dir / tag,
                since_fired=torch.zeros(shape.n_latents, dtype=torch.long, device=self.dist.device),
            )
            if index in owned:
                slot = self._build_run(slot, index, sae_cfg, groups[self.placement.owners[index]])
            self.slots.append(slot)
        self.runs = [slot for slot in self.slots if isinstance(slot, SAERun)]
        self.router = Router(self.placement, [slot.all_sites for slot in self.slots], self.dist)
        if any(len(group) < self.dist.world_size for group in self.placement.owners):  # some rank lacks some SAE
            self._exchange_layouts()

    def _sae_config(self, pairs: tuple[tuple[str, str], ...], overrides: dict[str, Any]) -> tuple[SAEConfig, float]:
        """The resolved config of the SAE reading and writing the (source, target) `pairs` (one
        per layer for a cross-layer transcoder) with sweep `overrides`, and its lr (0: the
        architecture's default)."""
        site, target = pairs[0]
        d_in = self.source.d_in(site)
        overrides = dict(overrides)
        lr = overrides.pop("lr", self.cfg.lr)
        sae_cfg = replace(self.cfg.sae, **overrides, target="" if target == site else target)
        if ARCHITECTURES[sae_cfg.architecture].cross_layer:
            check_layer_widths(pairs, self.source.d_in)
            sae_cfg = replace(sae_cfg, n_layers=len(pairs))
        if sae_cfg.d_in not in (0, d_in):
            raise UserError(
                f"sae.d_in={sae_cfg.d_in} does not match site {site} of the data, whose activations have "
                f"d_in={d_in}. Remove sae.d_in (it is read from the data) or pick the matching site."
            )
        d_out = self.source.d_in(sae_cfg.target) if sae_cfg.target else 0
        return sae_cfg.resolved(d_in, d_out), lr

    def _build_run(self, slot: SAESlot, index: int, sae_cfg: SAEConfig, dist: Dist) -> SAERun:
        mine = sae_cfg if self.shards is None else shard_config(sae_cfg, self.shards.size)
        sae = create_sae(mine, compute_dtype=self.compute_dtype).to(self.dist.device)
        if self.shards is not None:
            self.shards.attach(sae, sae_cfg.d_sae)
        beta1, beta2 = self.cfg.adam_betas
        # The fused kernel is ~3x faster than the default multi-tensor Adam on CPU (one pass over
        # parameter, gradient and both moments): a sixth of a TopK step at the reference size.
        optimizer = torch.optim.Adam(
            sae.parameters(),
            lr=slot.lr,
            betas=(beta1, beta2),
            eps=self.cfg.adam_eps,
            fused=self.dist.device.type in ("cpu", "cuda"),
        )
        share = self.placement.share(index, self.dist.rank)
        rows = (
            round(share * self.cfg.batch_size) if self.shards is None else self.cfg.batch_size // self.shards.data_ranks
        )
        bound = _step_gemm_seconds(
            sae.cfg.architecture,
            rows * max(1, len(slot.layers)),  # a cross-layer transcoder's L encoder GEMMs
            sae.cfg.d_in,
            sae.cfg.d_sae,
            self.compute_dtype,
            self.dist.device,
        )
        fields = {f.name: getattr(slot, f.name) for f in dataclasses.fields(SAESlot)}
        if self.shards is not None:  # this shard's latents only
            fields["since_fired"] = torch.zeros(sae.cfg.d_sae, dtype=torch.long, device=self.dist.device)
        return SAERun(**fields, index=index, sae=sae, optimizer=optimizer, dist=dist, share=share, bound_seconds=bound)

    @torch.no_grad()
    def _exchange_layouts(self) -> None:
        """Tell every rank every SAE's loss terms and per-batch statistics, which only its
        owners can compute (a forward of two random rows), so that all ranks lay out the step's
        statistics alike when some do not train every SAE: one all-gather, at start-up."""
        gen, mine = torch.Generator().manual_seed(0), {}
        for run in self.runs:
            rows = (2, len(run.layers)) if run.layers else (2,)  # a cross-layer transcoder: [B, L, d]
            x = torch.randn(*rows, run.sae.cfg.d_in, generator=gen).to(self.dist.device)
            y = None
            if run.target != run.site:
                y = torch.randn(*rows, self.source.d_in(run.target), generator=gen).to(self.dist.device)
            out = run.sae(x, target=y)
            mine[run.index] = (tuple(out.losses), tuple(v.numel() for v in out.stats.values()))
        for layouts in self.dist.gather_objects(mine):
            assert isinstance(layouts, dict)
            for index, (names, sizes) in layouts.items():
                self.slots[index].loss_names, self.slots[index].stat_sizes = names, sizes

    @torch.no_grad()
    def _initialise(self) -> None:
        """Normalisation constants and data-dependent init (b_dec) from one sample, made by the
        first owner of each SAE (rank 0 under data parallel) and broadcast to its other owners,
        so they start from identical weights (latent shards: rank 0 initialises the whole SAE and
        scatters each shard its range)."""
        sample = self.source.sample(self.cfg.init_tokens) if any(r.dist.is_main for r in self.runs) else None
        for run in self.runs:
            if run.layers:
                self._initialise_layers(run, sample)
                continue
            scales = torch.zeros(2, dtype=torch.float64, device=self.dist.device)  # source's, target's
            # latent shards: rank 0 initialises the whole SAE once, in host memory, then scatters its ranges
            init = run.sae if self.shards is None or not run.dist.is_main else self.shards.whole_sae(run.sae)
            if run.dist.is_main:
                assert sample is not None
                rows = {}
                for i, site in enumerate(dict.fromkeys((run.site, run.target))):
                    rows[site] = sample[site].to(init.b_dec.device, torch.float32)
                    mean_norm = float(rows[site].norm(dim=1).mean())
                    if not math.isfinite(mean_norm) or mean_norm == 0.0:
                        raise self.source.nonfinite_error(site, 0, len(rows[site]), sample=True) or UserError(
                            f"Activations of {site} have mean norm {mean_norm}; the data is degenerate (all zero or non-finite)."
                        )
                    scales[i] = 1.0 / mean_norm
                if run.target == run.site:
                    scales[1] = scales[0]
                    init.init_from_data(rows[run.site] * scales[0].item())
                else:
                    init.init_from_data(rows[run.site] * scales[0].item(), rows[run.target] * scales[1].item())
            run.scale, run.target_scale = run.dist.broadcast_(scales).tolist()
            if self.shards is not None:
                self.shards.scatter_(run.sae, init.state_dict() if run.dist.is_main else None)
                continue
            for tensor in itertools.chain(run.sae.parameters(), run.sae.buffers()):
                run.dist.broadcast_(tensor.data)
                torch.autograd.graph.increment_version(tensor)  # .data writes skip the version counter

    def _initialise_layers(self, run: SAERun, sample: dict[str, torch.Tensor] | None) -> None:
        """`_initialise` for a cross-layer transcoder (never latent-sharded): one constant per
        source and target site. Sources go to unit mean norm as every SAE input does; targets to
        unit variance (mean squared distance from their mean), which makes the CLT's summed MSE
        the sum of its layers' FVUs: the encoders, which serve every later layer, then weigh each
        layer by how much of it they leave unexplained rather than by its norm (sae/clt.py)."""
        scales = torch.zeros(2, len(run.layers), dtype=torch.float64, device=self.dist.device)  # sources', targets'
        if run.dist.is_main:
            assert sample is not None
            stacked = []
            for side in range(2):
                rows = []
                for layer, pair in enumerate(run.layers):
                    x = sample[pair[side]].to(self.dist.device, torch.float32)
                    mean_norm = float(x.norm(dim=1).mean())
                    if not math.isfinite(mean_norm) or mean_norm == 0.0:
                        raise self.source.nonfinite_error(pair[side], 0, len(x), sample=True) or UserError(
                            f"Activations of {pair[side]} have mean norm {mean_norm}; the data is degenerate."
                        )
                    spread = float((x - x.mean(0)).pow(2).sum(1).mean().sqrt()) if side else mean_norm
                    spread = spread if spread > 0 else mean_norm  # a constant target keeps its norm
                    scales[side, layer] = 1.0 / spread
                    rows.append(x / spread)
                stacked.append(torch.stack(rows, dim=1))
            run.sae.init_from_data(stacked[0], stacked[1])
        run.scale, run.target_scale = run.dist.broadcast_(scales).tolist()
        for tensor in itertools.chain(run.sae.parameters(), run.sae.buffers()):
            run.dist.broadcast_(tensor.data)
            torch.autograd.graph.increment_version(tensor)  # .data writes skip the version counter

    def _restore(self) -> bool:
        state = ckpt.read_run_state(self.out_dir)
        if state is None:
            return False
        saved, now = comparable(state["config"]), comparable(self.config_dict)
        if saved != now:
            diffs = [
                f"{k}: {saved.get(k)!r} -> {now.get(k)!r}"
                for k in sorted(set(saved) | set(now))
                if saved.get(k) != now.get(k)
            ]
            raise UserError(
                f"{self.out_dir} holds a training run with a different config ({'; '.join(diffs)}). Use the original "
                "settings to resume it, a new out_dir, or resume=false to start over in this directory."
            )
        if self.dist.is_main:  # one rank repairs what a crash during a save left; the others wait
            for slot in self.slots:
                ckpt.restore_committed(slot.directory, state["step"])
        self.dist.barrier()
        for slot in self.slots:
            if not isinstance(slot, SAERun):  # trained elsewhere: only its dead-latent counters, for the logs
                slot.since_fired = ckpt.read_training_tensor(slot.directory, "since_fired").to(self.dist.device)
        for run in self.runs:
            # latent shards: the checkpoint holds the whole SAE; each rank reads its range
            select = None if self.shards is None else self.shards.select(run.sae)
            tensors, optimizer, sae_state = ckpt.read_training_state(run.directory, select)
            if self.shards is not None:
                optimizer = self.shards.split_optimizer(run.sae, optimizer)
            run.since_fired = tensors.pop("since_fired").to(self.dist.device)
            load_weights(run.sae, tensors, run.sae.state_dict(), source=f"Training checkpoint {run.directory}")
            run.optimizer.load_state_dict(optimizer)
            run.scale = sae_state["scale"]
            run.target_scale = sae_state.get("target_scale", run.scale)
        self.step, self.tokens, self.position = state["step"], state["tokens"], state["position"]
        self.wandb_id = state.get("wandb_id", "")
        log.info("resumed %s at step %d (%d tokens)", self.out_dir, self.step, self.tokens)
        return True

    # ---- the loop -------------------------------------------------------------------------
    def fit(self) -> TrainSummary:
        started, window_start, window_steps = time.perf_counter(), time.perf_counter(), 0
        bar = tqdm(
            total=self.n_steps * self.cfg.batch_size,
            initial=self.tokens,
            unit="tok",
            unit_scale=True,
            disable=not (self.cfg.progress and self.dist.is_main),
            desc="train",
        )
        first_step, last = self.step, {}
        batches: Iterator[tuple[dict[str, torch.Tensor], int]] = (
            device_batches(self.source, self.position, self.dist.device) if self.step < self.n_steps else iter(())
        )
        try:
            with StopSignals() as signals:
                while self.step < self.n_steps:
                    batch, position = next(batches)
                    stop = self.train_step(batch, signals.received)
                    self.position = position
                    bar.update(self.cfg.batch_size)
                    window_steps += 1
                    extra = self._callbacks()
                    if self.step % self.cfg.log_every == 0 or self.step == self.n_steps or extra or stop:
                        elapsed = time.perf_counter() - window_start
                        last = self._log(window_steps, elapsed, extra)
                        bar.set_postfix(tok_s=f"{window_steps * self.cfg.batch_size / elapsed:,.0f}")
                        window_start, window_steps = time.perf_counter(), 0
                    if stop:
                        self.save()
                        raise Preempted(stop, self.step)
                    if self._checkpoint_due():
                        self.save()
        finally:
            bar.close()
            self.logger.close()
        if first_step < self.n_steps:
            self.save()
        return self._summary(time.perf_counter() - started, self.step - first_step, last)

    def train_step(self, batch: dict[str, torch.Tensor], signal_received: int) -> int:
        """One optimizer step of every SAE; returns the signal number if the run must stop.

        The stop decision (and the non-finite check) is the previous step's, read now: one
        step late on every rank alike, so the host never waits for the step it just queued.
        """
        sparsity = sparsity_factor(self.step, self.n_steps, self.cfg.sparsity_warmup)
        needed = {site for slot in self.slots for site in slot.all_sites}
        batch = {site: batch[site].to(self.dist.device, non_blocking=True) for site in needed}  # once per site
        routed = self.router.route(batch)  # each SAE's rows to the ranks that train it
        stats, outs, finishers = [], [], []
        for run in self.runs:
            if run.layers:  # a cross-layer transcoder: every layer's source and target
                x, y, var = self._normalised_layers(routed, run)
            else:
                x, var = self._normalised(routed[run.site], cast(float, run.scale))
                y = None
                if run.target != run.site:  # a transcoder: the FVU's variance is the target's
                    y, var = self._normalised(routed[run.target], cast(float, run.target_scale))
            run.sae.max_dead, run.sae.progress = run.dead_bound, self.step / self.n_steps
            dead = None if run.dead_bound == 0 else run.dead_mask(self.cfg.dead_after_tokens)
            with sparse.selection_span(run.dist.group, run.dist.world_size):
                out = run.sae(x, target=y, dead_mask=dead, sparsity_scale=sparsity)
            out.losses["loss"].backward()
            finishers.append(
                run.dist.start_grad_average(run.params)
                if self.shards is None
                else self.shards.start_grad_average(run.sae)
            )
            layout = tuple(out.losses), tuple(v.numel() for v in out.stats.values())
            if run.loss_names and (run.loss_names, run.stat_sizes) != layout:
                raise RuntimeError(f"{run.tag}: statistics {layout} differ from the layout the ranks agreed on")
            run.loss_names, run.stat_sizes = layout
            stats.append(self._batch_stats(x.shape[0], var, out, run.share))
            outs.append(out)
        reduced, flags = self._reduce_stats(stats, outs, signal_received)
        stop = self._settle()  # the previous step's: its copy is done by now
        lr_scale = lr_factor(self.step, self.n_steps, self.cfg.lr_warmup, self.cfg.lr_decay)
        for run, out, finish in zip(self.runs, outs, finishers):
            finish()
            run.lr_now = run.lr * lr_scale
            for group in run.optimizer.param_groups:
                group["lr"] = run.lr_now
            update(run.sae, run.optimizer, self.cfg.grad_clip)  # projection, clipping, Adam, constraint
            run.optimizer.zero_grad(set_to_none=True)
            run.sae.after_step(out)
        for slot, (losses, sums, fired) in zip(self.slots, reduced):  # every SAE of the run, trained here or not
            slot.lr_now = slot.lr * lr_scale
            slot.since_fired.add_(self.cfg.batch_size).masked_fill_(fired, 0)
            head = torch.cat([losses, sums])
            slot.totals = head if slot.totals is None else slot.totals.add_(head)
        # Per SAE: the latents one batch from the dead threshold (a bound on the dead count at the
        # end of the next step, which the step after it reads: dead_bound), and the dead ones.
        after = self.cfg.dead_after_tokens
        soon = after - self.cfg.batch_size
        counts = torch.stack(
            [torch.stack([(s.since_fired >= soon).sum(), s.dead_mask(after).sum()]) for s in self.slots]
        )
        if self.shards is not None:  # over the shards: all of them must agree whether to run AuxK
            self.shards.all_reduce_sum_(counts)
        for slot, dead in zip(self.slots, counts[:, 1]):
            slot.dead_count = dead
        self._pending = DeferredRead(
            torch.cat([losses for losses, _, _ in reduced] + [flags, counts[:, 0].to(flags.dtype)])
        )
        self._pending_step, self._pending_start = self.step, self.position  # its batch: global rows from here
        self.step += 1
        self.tokens += self.cfg.batch_size
        self._maybe_resample()
        return stop

    def _settle(self) -> int:
        """Act on the last step's deferred numbers: raise on a non-finite loss, else return the
        stop signal every rank agreed on (0: none). Every rank calls this at the same steps."""
        if self._pending is None:
            return 0
        values, offset = self._pending.read(), 0
        for slot in self.slots:
            losses = dict(zip(slot.loss_names, values[offset : offset + len(slot.loss_names)]))
            offset += len(slot.loss_names)
            if not all(math.isfinite(v) for v in losses.values()):
                start = self._pending_start
                stop = start + self.cfg.batch_size
                raise next(
                    (err for site in slot.all_sites if (err := self.source.nonfinite_error(site, start, stop))),
                    None,
                ) or UserError(
                    f"Non-finite loss for SAE {slot.tag} at step {self._pending_step} ({losses}). Training stopped; the "
                    "last checkpoint was left untouched. Lower lr, use dtype=float32, or check the activations."
                )
        flags = values[offset : offset + len(StopSignals.SIGNALS)]
        for slot, dying in zip(self.slots, values[offset + len(flags) :]):
            slot.dead_bound = int(dying)
        return next((int(sig) for sig, flag in zip(StopSignals.SIGNALS, flags) if flag > 0), 0)

    @staticmethod
    @torch.no_grad()
    def _normalised(raw: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The SAE input x = raw * scale and sum_b ||x_b - mean(x)||^2 (the FVU denominator):
        in one pass over the batch on CPU (`kernels.scale_moments`), else the plain way (the
        centred variance: sum x^2 - B |mean|^2 cancels for residual streams with a large mean; as
        the norm of x - mean, ~10x faster on CPU than `Tensor.var`'s Welford pass)."""
        if raw.device.type == "cpu" and raw.dtype == torch.float32 and raw.dim() == 2 and kernels.available():
            x, var = kernels.scale_moments(raw.contiguous(), scale)
            return x, torch.tensor(var, dtype=torch.float64)
        x = raw.float() * scale
        return x, torch.linalg.vector_norm(x - x.mean(0)).square()

    @classmethod
    @torch.no_grad()
    def _normalised_layers(
        cls, batch: dict[str, torch.Tensor], run: SAERun
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A cross-layer transcoder's inputs [B, L, d_in] and targets [B, L, d_out], each site
        scaled by its own constant, and the targets' variance summed over layers."""
        assert isinstance(run.scale, list) and isinstance(run.target_scale, list)
        xs = [cls._normalised(batch[source], scale)[0] for (source, _), scale in zip(run.layers, run.scale)]
        ys, var = [], torch.zeros((), dtype=torch.float64, device=xs[0].device)
        for (_, target), scale in zip(run.layers, run.target_scale):
            y, v = cls._normalised(batch[target], scale)
            ys.append(y)
            var = var + v.to(var.device)
        return torch.stack(xs, dim=1), torch.stack(ys, dim=1), var

    @staticmethod
    @torch.no_grad()
    def _batch_stats(n: int, var: torch.Tensor, out: SAEOutput, share: float) -> torch.Tensor:
        """This rank's statistics of one SAE as one fp64 vector: loss terms, squared error,
        variance, active-latent count, `out.stats` (the fired mask travels apart: `_reduce_stats`).
        The means (loss terms, `out.stats`) are weighted by the rank's share of the global batch,
        so their sum over the SAE's ranks is their mean over the global batch."""
        parts = [
            torch.stack([v.detach().double() for v in out.losses.values()]) * share,
            (out.losses["mse"].detach().double() * n).view(1),
            var.double().view(1),
            (out.l0.double() * n).view(1),
        ]
        parts += [v.detach().double().flatten() * share for v in out.stats.values()]
        return torch.cat(parts)

    def _reduce_stats(
        self, stats: list[torch.Tensor], outs: list[SAEOutput], signal_received: int
    ) -> tuple[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], torch.Tensor]:
        """Sum the statistics and stop flags over all ranks (one small collective, zeros for the
        SAEs a rank does not train); returns per SAE of the run (mean loss terms, [error,
        variance, active count] sums, fired mask) and the flags.

        The SAEs' own per-batch statistics (`out.stats`, e.g. BatchTopK's smallest kept
        activation) are averaged in place, so state updated from them stays identical on
        every rank that trains the SAE.
        """
        # One flag per signal: summing signal numbers across ranks would invent other signals.
        flags = torch.zeros(len(StopSignals.SIGNALS), dtype=torch.float64, device=self.dist.device)
        if signal_received:
            flags[StopSignals.SIGNALS.index(signal_received)] = 1.0
        mine = {run.index: (vector, out) for run, vector, out in zip(self.runs, stats, outs)}
        shard_fired: Sequence[torch.Tensor] = ()
        if self.shards is None:  # one collective; each SAE's fired mask rides with its statistics
            parts = [
                torch.cat([mine[i][0], mine[i][1].fired.double()]) if i in mine else flags.new_zeros(slot.stats_size)
                for i, slot in enumerate(self.slots)
            ]
            flat = self.dist.all_reduce_sum_(torch.cat([*parts, flags]))
        else:  # a shard's fired mask: summed over the data ranks holding the same latents
            flat = self.dist.all_reduce_sum_(torch.cat([*stats, flags]))
            shard_fired = self.shards.data_sum_(torch.cat([out.fired.double() for out in outs])).split(
                [run.sae.cfg.d_sae for run in self.runs]
            )
        offset, reduced = 0, []

        def take(n: int) -> torch.Tensor:
            nonlocal offset
            offset += n
            return flat[offset - n : offset]

        for i, slot in enumerate(self.slots):
            losses, sums = take(len(slot.loss_names)), take(3)
            values = [take(n) for n in slot.stat_sizes]
            if i in mine:
                out = mine[i][1]
                for (key, value), total in zip(out.stats.items(), values):
                    out.stats[key] = total.view_as(value).to(value.dtype)
            fired = shard_fired[i] if shard_fired else take(slot.d_sae)
            reduced.append((losses, sums, fired > 0))
        return reduced, take(len(StopSignals.SIGNALS))

    def _maybe_resample(self) -> None:
        every = self.cfg.resample_every
        if every <= 0:
            return
        boundary = max(1, round(every * self.n_steps))
        if self.step % boundary or self.step >= self.n_steps:
            return
        sample = functools.cache(self.source.sample)  # one read (or forward) for every SAE resampled now
        for run in self.runs:
            if run.sae.revival == "resample":
                count = resample_dead_(
                    run.sae,
                    run.optimizer,
                    run.dead_mask(self.cfg.dead_after_tokens),
                    sample,
                    run.dist,
                    (run.site, cast(float, run.scale)),  # cross-layer transcoders revive by AuxK
                    (run.target, cast(float, run.target_scale)),
                    self._generator(run),
                )
                if count:
                    log.info("%s: resampled %d dead latents at step %d", run.tag, count, self.step)

    def _generator(self, run: SAERun) -> torch.Generator:
        """Randomness for one SAE at this step, from (seed, SAE, step) alone: the same whichever
        ranks train the SAE, whatever else the process drew before, and after a resume."""
        seed = int(np.random.SeedSequence([self.cfg.seed, run.index, self.step]).generate_state(1, np.uint64)[0])
        return torch.Generator(self.dist.device).manual_seed(seed)

    def _callbacks(self) -> dict[str, dict[str, float]]:
        info = StepInfo(
            step=self.step, n_steps=self.n_steps, tokens=self.tokens, runs=self.runs, is_main=self.dist.is_main
        )
        merged: dict[str, dict[str, float]] = {}
        for callback in self.callbacks:
            for tag, metrics in (callback(info) or {}).items():
                merged.setdefault(tag, {}).update(metrics)
        return merged

    def _log(self, steps: int, seconds: float, extra: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
        """One metrics line per SAE of the run (written by rank 0, which has every SAE's sums,
        trained there or not): where the host reads the device's sums (one read per SAE).
        bound_fraction is this rank's: the GEMM time of the SAEs it trains over the wall time."""
        tokens_per_s = steps * self.cfg.batch_size / seconds
        bound = sum(r.bound_seconds for r in self.runs) * steps
        last = {}
        for run in self.slots:
            assert run.totals is not None and run.dead_count is not None  # a log step follows at least one step
            dead = (run.dead_count.double() / run.d_sae).view(1)
            *losses, err, var, active, dead_fraction = torch.cat([run.totals, dead]).tolist()
            metrics = {k: v / steps for k, v in zip(run.loss_names, losses)}
            metrics.update(
                l0=active / (steps * self.cfg.batch_size),
                fvu=err / max(var, 1e-30),
                dead_fraction=dead_fraction,
                lr=run.lr_now,
                tokens_per_s=tokens_per_s,
                bound_fraction=bound / seconds,
                **extra.get(run.tag, {}),
            )
            self.logger.log(self.step, self.tokens, run.tag, metrics)
            run.totals = None
            last[run.tag] = metrics
        return last

    def _checkpoint_due(self) -> bool:
        every = self.cfg.checkpoint_every_tokens
        return (
            every > 0
            and self.step < self.n_steps
            and self.tokens // every != (self.tokens - self.cfg.batch_size) // every
        )

    # ---- saving -----------------------------------------------------------------------------
    def save(self) -> None:
        """Checkpoint every SAE, after checking the last step's losses: a non-finite step raises
        here instead of being saved. The first owner of each SAE (rank 0 under data parallel)
        stages its directory; then rank 0 swaps them all in and commits the run state (Contract
        2). Each phase ends with every rank learning whether any rank's writes failed, so all
        stop together and none runs ahead."""
        self._settle()
        # latent shards: every rank takes part in gathering each SAE to rank 0, which writes it
        staging = self.runs if self.shards is not None else [run for run in self.runs if run.dist.is_main]

        def stage() -> None:
            for run in staging:
                self._stage(run)

        self._together(stage, [run.directory for run in staging if run.dist.is_main])
        committing = [slot.directory for slot in self.slots] if self.dist.is_main else []
        state = {
            "step": self.step,
            "tokens": self.tokens,
            "position": self.position,
            "n_steps": self.n_steps,
            "config": self.config_dict,
            "saes": [slot.tag for slot in self.slots],
            "wandb_id": self.wandb_id,
            "world_size": self.dist.world_size,
            "provenance": provenance(),
        }

        def commit() -> None:
            if self.dist.is_main:
                ckpt.commit(self.out_dir, committing, state)

        self._together(commit, committing)

    def _together(self, write: Callable[[], None], sae_dirs: list[Path]) -> None:
        """This rank's part of a save phase (`write`, touching `sae_dirs`), then one all-reduce
        that tells every rank whether any rank's writes failed: then each stops with an error
        (the failing one with its own), its staged directories removed, the previous checkpoint
        intact."""
        failure: UserError | None = None
        try:
            with ckpt.failed_writes_stop(self.out_dir, sae_dirs, self.step):
                write()
        except UserError as err:  # raised once every rank knows, so none waits for this one
            failure = err
        failed = self.dist.all_reduce_sum_(torch.tensor([float(failure is not None)], device=self.dist.device))
        if failure is not None:
            raise failure
        if failed.item():
            ckpt.remove_stale(self.out_dir, sae_dirs)
            raise UserError(
                f"Another rank could not write its part of the checkpoint of step {self.step} into {self.out_dir} "
                "(its error says why). Training stopped; the previous checkpoint is intact. Fix that, then rerun the "
                "same command to resume from it."
            )

    def _stage(self, run: SAERun) -> None:
        """Write one SAE's checkpoint under its staging name (`ckpt.commit` swaps it in); with
        latent shards, each piece is gathered to rank 0 (a collective), written, dropped."""
        inference = self._whole_inference(run)
        staging = None
        if inference is not None:  # the writing rank
            staging = staging_dir(run.directory)
            save_sae(inference, staging, self._inference_metadata(run))
        del inference
        training = self._whole_training_state(run)
        if training is not None:
            assert staging is not None  # the same rank
            tensors, optimizer = training
            state = {
                "step": self.step,
                "tokens": self.tokens,
                "scale": run.scale,
                "target_scale": run.target_scale,
                "tag": run.tag,
                "site": run.site,
                "sae": asdict(replace(run.sae.cfg, d_sae=run.d_sae)),
            }
            ckpt.write_training_state(staging, tensors, optimizer, state)

    def _whole_inference(self, run: SAERun) -> SAE | None:
        """On the SAE's first owner: the inference SAE (`SAERun.inference`); latent shards fold
        their own ranges, gathered into one SAE on rank 0 (a collective every rank makes). None
        on the other ranks."""
        if self.shards is None:
            return run.inference() if run.dist.is_main else None
        folded = run.inference()
        tensors = self.shards.gather_tensors(folded, {n: folded.state_dict()[n] for n in folded.inference_tensors})
        if tensors is None:
            return None
        cfg = replace(folded.cfg, d_sae=run.d_sae)
        return load_folded(cfg, tensors, normalization_scale=folded.normalization_scale,
                           target_normalization_scale=folded.target_normalization_scale,
                           compute_dtype=folded.compute_dtype, source=f"The gathered shards of {run.tag}")  # fmt: skip

    def _whole_training_state(self, run: SAERun) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """On the SAE's first owner: the training tensors (+ dead-latent counters) and optimizer
        state as one process holds them -- gathered to rank 0 from the latent shards (a
        collective every rank makes). None on the other ranks."""
        tensors = {**run.sae.state_dict(), "since_fired": run.since_fired}
        if self.shards is None:
            return (tensors, run.optimizer.state_dict()) if run.dist.is_main else None
        whole = self.shards.gather_tensors(run.sae, tensors)
        optimizer = self.shards.gather_optimizer(run.sae, run.optimizer.state_dict())
        return None if whole is None or optimizer is None else (whole, optimizer)

    def _inference_metadata(self, run: SAERun) -> dict[str, Any]:
        layers = {"sites": [s for s, _ in run.layers], "targets": [t for _, t in run.layers]} if run.layers else {}
        return {
            **layers,
            "site": run.site,
            "tag": run.tag,
            "normalization_scale": run.scale,
            "tokens_trained": self.tokens,
            "source": self.source.provenance,
            "provenance": provenance(),
            "train": {k: self.config_dict[k] for k in ("batch_size", "lr", "seed", "n_tokens", "dtype")}
            | {"lr_used": run.lr},
        }

    def _last_logged(self, tag: str) -> dict[str, float]:
        """The last metrics line of an SAE in metrics.jsonl (a run that had already finished)."""
        path = self.out_dir / "metrics.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        mine = [row for row in rows if row.get("sae") == tag]
        return {k: v for k, v in mine[-1].items() if k not in ("step", "tokens", "sae")} if mine else {}

    def _summary(self, seconds: float, steps: int, last: dict[str, dict[str, float]]) -> TrainSummary:
        tokens = steps * self.cfg.batch_size
        bound = sum(r.bound_seconds for r in self.runs) * steps
        last = {
            tag: metrics or self._last_logged(tag)
            for tag, metrics in ((s.tag, last.get(s.tag, {})) for s in self.slots)
        }
        return TrainSummary(
            out_dir=str(self.out_dir),
            steps=self.step,
            new_steps=steps,
            tokens=self.tokens,
            seconds=seconds,
            tokens_per_second=tokens / seconds if seconds else 0.0,
            bound_fraction=bound / seconds if seconds else 0.0,
            saes={
                s.tag: {"checkpoint": str(s.directory), "site": s.site, "metrics": last.get(s.tag, {})}
                for s in self.slots
            },
        )
