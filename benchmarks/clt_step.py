"""What a cross-layer transcoder's training step costs per token, next to a per-layer transcoder
set of the same width (L BatchTopK transcoders, one per layer): time, and the L^2 that a CLT
adds in its decoders (parameter bytes, Adam state, multiply-adds).

    python benchmarks/clt_step.py [--layers 4 8 16] [--d 576] [--d-sae 2304] [--k 32] [--batch 1024]
                                  [--dtype bfloat16] [--steps 3] [--device cpu]

One step = forward + backward + the optimizer step (sae_train.train.update: Adam and the decoder
constraint), on random activations, no AuxK; best of --steps after one warm-up. Counted per
token (k active latents per layer on average):
  encoder   2 L d d_sae FLOPs (dense GEMMs, the same for both),
  decoder   CLT 2 k d L (L + 1) / 2 FLOPs forward (the set: 2 k d L), about 3x that with backward,
  weights   CLT decoders d_sae d L (L + 1) / 2 floats (the set: d_sae d L), x4 with Adam's moments
            and gradient, all touched by every optimizer step.
Timings on a shared machine are noisy.
"""

from __future__ import annotations

import argparse
import time

import torch

from sae_train.sae import SAEConfig, create_sae
from sae_train.sae.kernels import keep_freed_memory
from sae_train.train.update import update


def best_seconds(fn, steps: int, device: torch.device) -> float:
    def timed() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    timed()
    return min(timed() for _ in range(steps))


def step_fn(sae, x: torch.Tensor, y: torch.Tensor):
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=x.device.type in ("cpu", "cuda"))

    def step() -> None:
        sae(x, target=y).losses["loss"].backward()
        update(sae, optimizer, 1.0)
        optimizer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="*", default=[4, 8, 16])
    parser.add_argument("--d", type=int, default=576, help="d_model (MLP input and output width)")
    parser.add_argument("--d-sae", type=int, default=2304, help="latents per layer")
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    keep_freed_memory()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    d, d_sae, k, B = args.d, args.d_sae, args.k, args.batch
    print(
        f"d {d}, d_sae {d_sae} per layer, k {k}, batch {B}, {args.dtype} GEMMs on {device}"
        + (f" ({torch.get_num_threads()} threads)" if device.type == "cpu" else "")
    )
    print(
        f"{'L':>3s} {'what':12s} {'step ms':>8s} {'us/token':>9s} {'tok/s':>9s} {'dec MFLOP/tok':>14s} "
        f"{'enc MFLOP/tok':>14s} {'decoder MiB':>12s}"
    )
    gen = torch.Generator().manual_seed(0)
    for L in args.layers:
        x = torch.randn(B, L, d, generator=gen).to(device)
        y = torch.randn(B, L, d, generator=gen).to(device)
        clt = create_sae(
            SAEConfig(architecture="clt", target="blocks.{layer}.hook_mlp_out", k=k, d_sae=d_sae, n_layers=L).resolved(
                d, d
            ),
            compute_dtype=dtype,
        ).to(device)
        per_layer = [
            create_sae(
                SAEConfig(architecture="batchtopk", target="out", k=k, d_sae=d_sae, seed=i).resolved(d, d),
                compute_dtype=dtype,
            ).to(device)
            for i in range(L)
        ]
        clt_step = step_fn(clt, x, y)
        set_steps = [step_fn(t, x[:, i].contiguous(), y[:, i].contiguous()) for i, t in enumerate(per_layer)]
        pairs = L * (L + 1) // 2
        rows = [
            ("CLT", best_seconds(clt_step, args.steps, device), 2 * k * d * pairs, pairs),
            (
                "per-layer",
                best_seconds(lambda steps=set_steps: [s() for s in steps], args.steps, device),
                2 * k * d * L,
                L,
            ),
        ]
        for what, seconds, dec_flops, blocks in rows:
            print(
                f"{L:3d} {what:12s} {seconds * 1e3:8.1f} {seconds / B * 1e6:9.2f} {B / seconds:9,.0f} "
                f"{dec_flops / 1e6:14.3f} {2 * L * d * d_sae / 1e6:14.1f} {blocks * d_sae * d * 4 / 2**20:12.1f}"
            )


if __name__ == "__main__":
    main()
