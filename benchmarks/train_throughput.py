"""Training-step throughput of every architecture against this machine's GEMM roofline, and
against SAELens and EleutherAI's sparsify on the same workload when they are installed.

    python benchmarks/train_throughput.py [--arch topk relu ...] [--dtype float32 bfloat16]
                                          [--steps 8] [--store runs/demo/acts] [--dead-frac 0.03]
                                          [--kernels auto c torch] [--d-sae 4608 18432] [--k 32] [--transcoder]

--kernels times our step once per SAE_TRAIN_KERNELS mode (auto: the C kernels where they beat
PyTorch; c: always; torch: plain PyTorch), each against the same roofline, and prints each
mode's speed relative to the first. With SAE_TRAIN_CFLAGS=-mno-avx512f the C kernels are the
portable (AVX2) build that CPUs without AVX-512 get, e.g. the reference TopK step:

    SAE_TRAIN_CFLAGS=-mno-avx512f python benchmarks/train_throughput.py --arch topk --dtype bfloat16 --kernels c torch

`--kernels torch` is the plain-PyTorch path CUDA runs; `--d-sae 4608 18432` shows that its sparse
TopK step grows with k, not d_sae, beyond the encoder GEMM.

Workload (the reference run): d_in 576, d_sae 4608 (8x), batch 4096 tokens, k 32. Our number is
the trainer's real optimizer step (`Trainer.train_step`: forward, backward, gradient clipping,
Adam, decoder-norm constraint, dead-latent bookkeeping). The roofline is the time of the dense
GEMMs the step cannot avoid, measured here in the same dtype: one encoder GEMM for the TopK
family, five GEMMs for ReLU/JumpReLU. Targets: TopK step <= 2x its roofline, ReLU <= 1.3x.
Our step and the roofline GEMMs are timed alternately in one loop, so host noise hits both
alike; the ratio is best step / best roofline over N rounds (medians shown too).
--transcoder times each architecture as a skip transcoder instead (sae.target set, sae.skip:
it reads the batch and reconstructs a second site of the same width, y = tanh(x); the
roofline shown is still the SAE's, so the ratio includes the skip term's two GEMMs; no other
library is timed).
Other libraries run forward + backward + Adam (their minimal step, in the same dtype via CPU
autocast with fp32 master weights, like ours); no dead latents exist at initialisation, so
nobody pays for AuxK (--dead-frac 0.03 shows what it costs us).
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from sae_train.sae import SAEConfig, kernels
from sae_train.train import TrainConfig, Trainer
from sae_train.train.dist import Dist
from sae_train.train.roofline import step_gemms

D_IN, D_SAE, BATCH, K = 576, 4608, 4096, 32
ARCHS = ["topk", "batchtopk", "matryoshka", "relu", "jumprelu"]
TARGET = {"topk": 2.0, "batchtopk": 2.0, "matryoshka": 2.5, "relu": 1.3, "jumprelu": 1.3}
SITE, TARGET_SITE = "x", "y"


class FixedBatch:
    """An activation source serving one batch forever (so only the training step is timed);
    with `target`, a transcoder's second site too."""

    def __init__(self, x: torch.Tensor, target: torch.Tensor | None = None):
        self.rows = {SITE: x} if target is None else {SITE: x, TARGET_SITE: target}
        self.sites, self.provenance, self.position = list(self.rows), {"source": "benchmark"}, 0

    def d_in(self, site: str) -> int:
        return self.rows[site].shape[1]

    def batches(self, position: int) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            yield self.rows

    def sample(self, n_tokens: int) -> dict[str, torch.Tensor]:
        return {site: rows[:n_tokens] for site, rows in self.rows.items()}


def activations(store: str | None) -> torch.Tensor:
    """A batch of real activations from a store, or LM-like synthetic ones (offset mean,
    heavy-tailed norms, a few massive dimensions)."""
    if store:
        from sae_train.store import ActivationStore, ShuffledBatches

        s = ActivationStore(store)
        return next(iter(ShuffledBatches(s, [next(iter(s.sites))], BATCH, dtype=torch.float32, prefetch=0)))[
            next(iter(s.sites))
        ]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, D_IN, generator=gen) * torch.empty(BATCH, 1).exponential_(1.0, generator=gen)
    x[:, :4] *= 20
    return x + torch.randn(D_IN, generator=gen)


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def time_steps(step: Callable[[], object], steps: int, warmup: int = 2) -> float:
    """Best-of-N seconds per call (the statistic least disturbed by other work on a shared
    machine); for the other libraries."""
    for _ in range(warmup):
        step()
    return min(_seconds(step) for _ in range(steps))


def time_against_roofline(
    step: Callable[[], object], gemms: list[Callable[[], object]], steps: int, warmup: int = 2
) -> tuple[float, float, float, float]:
    """Our step and the roofline GEMMs, timed alternately in one loop, so that a noisy host
    (VM neighbours, frequency changes) hits both alike. Returns (best step, median step,
    best roofline, median roofline) in seconds; the roofline is the sum of its GEMMs' times."""
    for _ in range(warmup):
        step()
        for g in gemms:
            g()
    step_times, gemm_times = [], [[] for _ in gemms]
    for _ in range(steps):
        for g, times in zip(gemms, gemm_times):
            times.append(_seconds(g))
        step_times.append(_seconds(step))
    best_roof = sum(min(times) for times in gemm_times)
    median_roof = sum(statistics.median(times) for times in gemm_times)
    return min(step_times), statistics.median(step_times), best_roof, median_roof


def ours(
    arch: str,
    dtype: str,
    x: torch.Tensor,
    tmp: Path,
    dead_frac: float = 0.0,
    kernel_mode: str = "auto",
    d_sae: int = D_SAE,
    k: int = K,
    transcoder: bool = False,
) -> Callable[[], object]:
    """Our trainer's step on the fixed batch, built and run with SAE_TRAIN_KERNELS=kernel_mode.
    Replaying one batch, latents it never fires would count as dead after dead_after_tokens
    (5 steps by default) and switch AuxK on: so no latent is ever dead here (the tracking
    itself still runs), except, with dead_frac > 0, a fixed random fraction kept dead on
    purpose to show AuxK's cost."""
    os.environ[kernels.ENV_VAR] = kernel_mode
    cfg = TrainConfig(
        store="-",
        out_dir=str(tmp / f"{arch}-{dtype}-{kernel_mode}-{d_sae}-{k}-{transcoder}"),
        n_tokens=10**9,
        batch_size=BATCH,
        dtype=dtype,
        progress=False,
        resume=False,
        dead_after_tokens=10**15,
        sae=SAEConfig(
            architecture=arch,
            k=k,
            expansion_factor=d_sae // D_IN,
            target=TARGET_SITE if transcoder else "",
            skip=transcoder,
        ),
    )
    source = FixedBatch(x, torch.tanh(x) if transcoder else None)
    trainer = Trainer(cfg, source, Dist())
    batch = source.rows
    since_fired = trainer.runs[0].since_fired
    dead = torch.rand(since_fired.numel(), generator=torch.Generator().manual_seed(0)) < dead_frac

    def step() -> int:
        os.environ[kernels.ENV_VAR] = kernel_mode
        since_fired[dead] = cfg.dead_after_tokens
        return trainer.train_step(batch, 0)

    return step


def _autocast(dtype: str):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16")


def saelens(arch: str, dtype: str, x: torch.Tensor) -> Callable[[], object] | None:
    try:
        from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
        from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
        from sae_lens.saes.matryoshka_batchtopk_sae import (
            MatryoshkaBatchTopKTrainingSAE,
            MatryoshkaBatchTopKTrainingSAEConfig,
        )
        from sae_lens.saes.sae import TrainStepInput
        from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
        from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    except ImportError:
        return None
    common = {"d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": "cpu"}
    classes = {
        "topk": (TopKTrainingSAE, TopKTrainingSAEConfig(k=K, **common)),
        "batchtopk": (BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig(k=K, **common)),
        "matryoshka": (
            MatryoshkaBatchTopKTrainingSAE,
            MatryoshkaBatchTopKTrainingSAEConfig(k=K, matryoshka_widths=[D_SAE // 16, D_SAE // 4, D_SAE], **common),
        ),  # our default prefixes
        "relu": (StandardTrainingSAE, StandardTrainingSAEConfig(**common)),
        "jumprelu": (JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig(**common)),
    }
    cls, cfg = classes[arch]
    sae = cls(cfg)
    coefficients = {k: (v.value if hasattr(v, "value") else v) for k, v in sae.get_coefficients().items()}
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-4)

    def step() -> None:
        with _autocast(dtype):
            out = sae.training_forward_pass(
                TrainStepInput(
                    sae_in=x,
                    coefficients=coefficients,
                    dead_neuron_mask=None,
                    n_training_steps=0,
                    is_logging_step=False,
                )
            )
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def sparsify(arch: str, dtype: str, x: torch.Tensor) -> Callable[[], object] | None:
    return sparsify_step(x, D_SAE, K, dtype) if arch == "topk" else None


def sparsify_step(
    x: torch.Tensor, d_sae: int, k: int, dtype: str, fused_adam: bool | None = None
) -> Callable[[], None] | None:
    """One training step of sparsify's SparseCoder (TopK) on x, on x's device: forward, backward,
    its gradient projection, Adam, decoder norm. None when sparsify is not installed."""
    try:
        from sparsify import SparseCoder, SparseCoderConfig
    except ImportError:
        return None
    coder = SparseCoder(x.shape[1], SparseCoderConfig(num_latents=d_sae, k=k), device=x.device)
    optimizer = torch.optim.Adam(coder.parameters(), lr=1e-4, fused=fused_adam)

    def step() -> None:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            out = coder(x)
        out.fvu.backward()
        coder.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        coder.set_decoder_norm_to_unit_norm()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", nargs="*", default=ARCHS, choices=ARCHS)
    parser.add_argument("--dtype", nargs="*", default=["bfloat16", "float32"], choices=["bfloat16", "float32"])
    parser.add_argument(
        "--steps", type=int, default=8, help="timed steps (each after its roofline GEMMs) per measurement"
    )
    parser.add_argument("--store", default=None, help="activation store to take the batch from (default: synthetic)")
    parser.add_argument(
        "--others", action=argparse.BooleanOptionalAction, default=True, help="also time SAELens/sparsify"
    )
    parser.add_argument(
        "--dead-frac",
        type=float,
        default=0.0,
        help="fraction of latents kept dead in our step (TopK family: AuxK runs; targets assume 0)",
    )
    parser.add_argument(
        "--kernels",
        nargs="+",
        default=[os.environ.get(kernels.ENV_VAR, "auto")],
        choices=["auto", "c", "torch"],
        help="SAE_TRAIN_KERNELS mode(s) to time our step with",
    )
    parser.add_argument("--d-sae", type=int, nargs="+", default=[D_SAE], help="dictionary widths (multiples of 576)")
    parser.add_argument("--k", type=int, default=K, help="active latents per token (TopK family)")
    parser.add_argument(
        "--transcoder",
        action="store_true",
        help="time skip transcoders (a second target site) instead of SAEs; see above",
    )
    args = parser.parse_args()

    import tempfile

    # As the trainer does at start-up: big freed buffers are reused, not page-faulted back in,
    # so the roofline GEMM and every library's step are timed on equal terms.
    kernels.keep_freed_memory()
    x = activations(args.store)
    print(
        f"workload: d_in {D_IN}, d_sae {' '.join(map(str, args.d_sae))}, batch {BATCH}, k {args.k}; "
        f"{torch.get_num_threads()} threads; data {'from ' + args.store if args.store else 'synthetic'}"
    )
    for kernel_mode in args.kernels:
        os.environ[kernels.ENV_VAR] = kernel_mode
        print(f"{kernels.ENV_VAR}={kernel_mode}: {kernels.describe()}")
    header = (
        f"{'arch':10s} {'d_sae':>6s} {'dtype':9s} {'kernels':7s} {'step ms':>8s} {'tok/s':>9s} {'roofline ms':>11s} {'x roofline':>10s} "
        f"{'target':>7s}   {'median: step ms':>15s} {'roofline ms':>11s} {'x roofline':>10s}"
    )
    print(header)
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in args.dtype:
            torch_dtype = getattr(torch, dtype)
            for arch, d_sae in itertools.product(args.arch, args.d_sae):
                gemms = step_gemms(arch, BATCH, D_IN, d_sae, torch_dtype, torch.device("cpu"))
                first = None
                for kernel_mode in args.kernels:
                    step = ours(arch, dtype, x, Path(tmp), args.dead_frac, kernel_mode, d_sae, args.k, args.transcoder)
                    ours_s, ours_med, bound, bound_med = time_against_roofline(step, gemms, args.steps)
                    ratio = ours_s / bound
                    first = first or ours_s
                    vs_first = (
                        f"   {first / ours_s:.2f}x the speed of {args.kernels[0]}"
                        if kernel_mode != args.kernels[0]
                        else ""
                    )
                    print(
                        f"{arch:10s} {d_sae:6d} {dtype:9s} {kernel_mode:7s} {ours_s * 1e3:8.1f} {BATCH / ours_s:9,.0f} "
                        f"{bound * 1e3:11.1f} {ratio:10.2f} {'ok' if ratio <= TARGET[arch] else 'MISS':>4s}"
                        f"<={TARGET[arch]}   {ours_med * 1e3:15.1f} {bound_med * 1e3:11.1f} "
                        f"{ours_med / bound_med:10.2f}{vs_first}",
                        flush=True,
                    )
                others = []
                # the others are SAEs built at the reference size
                if args.others and not args.transcoder and (d_sae, args.k) == (D_SAE, K):
                    for name, make in (("SAELens", saelens), ("sparsify", sparsify)):
                        step = make(arch, dtype, x)
                        if step is not None:
                            theirs = time_steps(step, max(3, args.steps // 2), warmup=1)
                            others.append(f"{name} {BATCH / theirs:,.0f} ({theirs / first:.1f}x)")
                if others:
                    print(
                        f"{'':10s} {'':6s} {'':9s} others (tok/s, speedup of {args.kernels[0]}): " + ", ".join(others),
                        flush=True,
                    )


if __name__ == "__main__":
    main()
