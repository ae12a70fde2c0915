"""Inspect's streaming pass against the SAE's plain encode, on a real store and checkpoint.

    python benchmarks/inspect_throughput.py --store runs/demo/acts \
        --checkpoint runs/demo/sae/blocks.8.hook_resid_post [--tokens 100000] [--dtype bfloat16]

Both read the same store rows in the same chunks (whole windows, `--batch` rows); the pass adds
the per-latent statistics (top-k, firing sample, histogram, counts) to the encode. Run alternately
(`--repeats`), best of each: the pass should run at about the encode's speed (ratio near 1).
Reports wall and CPU seconds (CPU time is the honest figure on a shared machine).
"""

from __future__ import annotations

import argparse
import time

import torch

from sae_train.inspect.rows import store_rows
from sae_train.inspect.stream import LatentStats
from sae_train.sae import load_sae, load_sae_cfg
from sae_train.store import ActivationStore


def timed(store: ActivationStore, sae, site: str, args: argparse.Namespace, stats: bool) -> tuple[float, float]:
    """(wall, cpu) seconds of one pass over args.tokens rows; the encode alone unless `stats`."""
    device = torch.device(args.device)
    keep = (
        LatentStats(
            sae.cfg.d_sae, top_k=20, sample_size=40, histogram_bins=64, before=16, after=8, seed=0, device=device
        )
        if stats
        else None
    )
    wall, cpu = time.perf_counter(), time.process_time()
    with torch.no_grad():
        for acts, chunk in store_rows(store, [site], args.tokens, args.batch, device):
            latents = sae.encode(acts[site])
            if keep is not None:
                keep.update(latents, chunk)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", required=True)
    parser.add_argument("--checkpoint", required=True, help="one SAE directory")
    parser.add_argument("--tokens", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    store = ActivationStore(args.store)
    site = load_sae_cfg(args.checkpoint)["site"]
    sae = load_sae(args.checkpoint, compute_dtype=getattr(torch, args.dtype)).to(args.device).eval()
    best: dict[str, tuple[float, float]] = {}
    for _ in range(args.repeats):
        for name, stats in (("encode", False), ("inspect pass", True)):
            wall, cpu = timed(store, sae, site, args, stats)
            if name not in best or wall < best[name][0]:
                best[name] = (wall, cpu)
    print(
        f"{args.tokens:,} tokens, d_sae {sae.cfg.d_sae}, {args.dtype} on {args.device}, {torch.get_num_threads()} threads"
    )
    for name, (wall, cpu) in best.items():
        print(f"{name:<13} {wall:7.2f} s wall ({args.tokens / wall:9,.0f} tok/s)  {cpu:7.2f} s CPU")
    print(f"pass / encode: {best['inspect pass'][0] / best['encode'][0]:.2f}x wall")


if __name__ == "__main__":
    main()
