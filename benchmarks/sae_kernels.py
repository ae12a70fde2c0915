"""Forward+backward speed of each SAE architecture against the GEMM roofline, on CPU.

    python benchmarks/sae_kernels.py                        # all architectures, bf16 and fp32
    python benchmarks/sae_kernels.py --arch topk --dtype bf16 --reps 20
    python benchmarks/sae_kernels.py --keep-freed-memory    # glibc: reuse freed big buffers
    python benchmarks/sae_kernels.py --threads 1            # steadier on a shared machine

For each architecture and dtype it times (min over --reps, measurements interleaved so a noisy
machine hurts all of them alike):
- the roofline measured in the same run: the encoder GEMM [B, d_in] x [d_in, d_sae] for the
  TopK family (everything else there is sparse); the five dense GEMMs of a step (encoder,
  decoder, latent gradient, W_dec gradient, W_enc gradient) for the ReLU family;
- one training forward+backward (`sae(x).losses["loss"].backward()`), fused path, and with
  --torch also the plain-PyTorch twin;
and prints tokens/s and the ratio step / roofline. The TopK-family step includes AuxK when
--dead-frac > 0.

--keep-freed-memory calls `kernels.keep_freed_memory()` (glibc mallopt) so that tensors above
32 MB are recycled instead of being page-faulted in again on every allocation (~10-15 ms per
38 MB buffer on the development machine). It affects every allocation of the process,
roofline included; the trainer can do the same.
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import torch

from sae_train.sae import SAE, SAEConfig, create_sae, kernels
from sae_train.train.roofline import step_gemms

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", nargs="+", default=["topk", "batchtopk", "relu", "jumprelu"])
    p.add_argument("--dtype", nargs="+", default=["bf16", "fp32"], choices=list(DTYPES))
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--d-in", type=int, default=576)
    p.add_argument("--expansion", type=int, default=8)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--dead-frac", type=float, default=0.0, help="fraction of latents marked dead (AuxK)")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    p.add_argument("--torch", action="store_true", help="also time the plain-PyTorch twin")
    p.add_argument("--keep-freed-memory", action="store_true")
    args = p.parse_args()
    if args.keep_freed_memory:
        kernels.keep_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)

    B, d_in, d_sae = args.batch, args.d_in, args.d_in * args.expansion
    print(
        f"B={B} d_in={d_in} d_sae={d_sae} k={args.k} threads={torch.get_num_threads()} "
        f"keep_freed_memory={args.keep_freed_memory}\nfast path: {kernels.describe()}"
    )
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(B, d_in, generator=gen)
    x /= x.norm(dim=1).mean()
    for dname in args.dtype:
        cd = DTYPES[dname]
        for arch in args.arch:
            cfg = SAEConfig(architecture=arch, k=args.k).resolved(d_in)
            sae = create_sae(cfg, compute_dtype=cd)
            sae.init_from_data(x[:2048])
            dead = None
            if args.dead_frac > 0:
                dead = torch.rand(d_sae, generator=gen) < args.dead_frac

            def step(impl: str, sae: SAE = sae, dead: torch.Tensor | None = dead) -> None:
                sae.impl = impl
                sae.zero_grad(set_to_none=True)
                sae(x, dead_mask=dead).losses["loss"].backward()

            impls = ["auto", "torch"] if args.torch else ["auto"]
            # encoder; for the ReLU family also decoder, latent grad, W_dec grad, W_enc grad
            gemms = dict(enumerate(step_gemms(arch, B, d_in, d_sae, cd, x.device)))
            best: dict[int | str, float] = {}
            for rep in range(args.reps + 1):  # rep 0 warms up
                times: dict[int | str, float] = {n: timed(fn) for n, fn in gemms.items()}
                times.update({impl: timed(partial(step, impl)) for impl in impls})
                if rep:
                    best = {n: min(best.get(n, float("inf")), t) for n, t in times.items()}
            roof = sum(best[n] for n in gemms)
            what = (
                "encoder GEMM"
                if len(gemms) == 1
                else (f"{len(gemms)} GEMMs (" + " + ".join(f"{best[n] * 1e3:.1f}" for n in gemms) + ")")
            )
            print(f"{arch:9s} {dname}: roofline {what} = {roof * 1e3:.1f} ms")
            for impl in impls:
                t = best[impl]
                label = "torch" if impl == "torch" else ("fused" if kernels.available() else "auto (kernels off)")
                print(f"    {label}: fwd+bwd {t * 1e3:7.1f} ms  {B / t:9.0f} tokens/s  {t / roof:5.2f}x roofline")


if __name__ == "__main__":
    main()
