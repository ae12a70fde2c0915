"""The SAE's own training step (forward + backward, no optimizer, no trainer) on each path, and
what it costs beyond its encoder GEMM.

    python benchmarks/sae_step.py [--d-sae 4608 18432] [--k 32 128] [--dtype bfloat16] [--steps 5]

For each width and k: the C-kernel path (`impl="auto"`, CPU only) and the plain-PyTorch path
(`impl="torch"`: what CUDA runs, sae/sparse.py), without AuxK (dead_mask=None) and with an
AuxK pass (a dead mask given), and the encoder GEMM alone. For a sparse step, "beyond GEMM"
grows with k (and aux_k when AuxK runs), not with d_sae. Best of --steps after one warm-up;
timings on a shared machine are noisy.
"""

from __future__ import annotations

import argparse
import time

import torch

from sae_train.sae import SAEConfig, create_sae
from sae_train.sae.kernels import keep_freed_memory

D_IN, BATCH = 576, 4096


def best_seconds(fn, steps: int) -> float:
    fn()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-sae", type=int, nargs="*", default=[4608, 18432])
    parser.add_argument("--k", type=int, nargs="*", default=[32])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--arch", default="topk", choices=["topk", "batchtopk"])
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    keep_freed_memory()
    dtype = getattr(torch, args.dtype)
    x = torch.randn(BATCH, D_IN, generator=torch.Generator().manual_seed(0))
    print(f"{args.arch}, d_in {D_IN}, batch {BATCH}, {args.dtype}, {torch.get_num_threads()} threads")
    print(
        f"{'d_sae':>6s} {'k':>4s} {'path':6s} {'auxk':5s} {'step ms':>8s} {'tok/s':>8s} {'GEMM ms':>8s} {'beyond GEMM ms':>15s}"
    )
    for d_sae in args.d_sae:
        for k in args.k:
            sae = create_sae(
                SAEConfig(architecture=args.arch, k=k, expansion_factor=d_sae // D_IN).resolved(D_IN),
                compute_dtype=dtype,
            )
            a, w = x.to(dtype), sae.W_enc.detach().to(dtype)
            gemm = best_seconds(lambda a=a, w=w: a @ w, args.steps)
            for impl in ("auto", "torch"):
                for dead in (None, torch.zeros(d_sae, dtype=torch.bool)):
                    sae.impl = impl

                    def step(sae=sae, dead=dead) -> None:
                        sae.zero_grad(set_to_none=True)
                        sae(x, dead_mask=dead).losses["loss"].backward()

                    s = best_seconds(step, args.steps)
                    print(
                        f"{d_sae:6d} {k:4d} {impl:6s} {'on' if dead is not None else 'off':5s} {s * 1e3:8.1f} "
                        f"{BATCH / s:8,.0f} {gemm * 1e3:8.1f} {(s - gemm) * 1e3:15.1f}",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
