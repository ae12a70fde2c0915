"""Latent sharding (parallel.latent_shards) against data parallel: what each rank holds and sends per step (computed), and measured peak
memory on CPU.

    python benchmarks/latent_shards.py                 # both parts
    python benchmarks/latent_shards.py --no-measure    # the computed table only

Computed, per layout, for one TopK SAE at d_in 4096, d_sae 2^20 (1M latents, 8.6B parameters),
k 32, aux_k 2048, a global batch of 4096 tokens on 8 ranks: parameters per rank and their
fp32 bytes with gradients and Adam state (2 moments), and the bytes each rank sends per step
with ring collectives (all-reduce of S bytes over P ranks: 2 (P-1)/P S; all_gather of S bytes
from each: (P-1) S). Data parallel: every rank holds the SAE and all-reduces every gradient.
Latent shards N (x 8/N data ranks): the decoder all-reduce of [B_local, d_in] and the TopK merge
(each rank's k best per token) over the N shards; the AuxK merge (aux_k per token) while
latents are dead; the gradients of a shard over its 8/N data ranks. Statistics, b_dec and the
clip norm (a few KB) are left out of both.

Measured (CPU, gloo): peak RSS of every rank for a small SAE (TopK, d_in 512, d_sae 65536, batch
256: 67M parameters, 1.07 GB with gradients and Adam state)
trained by torchrun as one process and as 2 latent shards: during training (the largest RSS
seen after each step) and over the whole run (ru_maxrss: also the initialisation, which rank 0
makes for the whole SAE, and the final save, which gathers the whole SAE on rank 0).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

GB = 1e9


def _allreduce(size: float, ranks: int) -> float:
    return 2 * (ranks - 1) / ranks * size


def _allgather(size: float, ranks: int) -> float:
    return (ranks - 1) * size


def computed_rows(
    d_in: int = 4096, d_sae: int = 2**20, k: int = 32, aux_k: int = 2048, batch: int = 4096, world: int = 8
) -> list[dict[str, str]]:
    rows = []
    for shards in (1, 4, 8):
        data = world // shards
        params = 2 * d_in * d_sae // shards + d_sae // shards + d_in  # W_enc, W_dec, b_enc; b_dec
        local = batch // data
        grads = _allreduce(4 * params, data)
        decoder = _allreduce(4 * local * d_in, shards) if shards > 1 else 0.0
        merge = _allgather(4 * local * k, shards) if shards > 1 else 0.0
        aux = _allgather(4 * local * aux_k, shards) if shards > 1 else 0.0
        name = "data parallel x8" if shards == 1 else f"latent x{shards} (x{data} data)"
        rows.append(
            {
                "layout": name,
                "params/rank": f"{params / 1e9:.2f}B",
                "params GB": f"{4 * params / GB:.1f}",
                "+grads +Adam GB": f"{16 * params / GB:.1f}",
                "grads MB/step": f"{grads / 1e6:,.0f}",
                "decoder+merge MB/step": f"{(decoder + merge) / 1e6:,.0f}",
                "+AuxK merge MB/step": f"{aux / 1e6:,.0f}",
            }
        )
    return rows


def markdown(rows: list[dict[str, str]]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(row[k] for k in keys) + " |" for row in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- measured


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(store: str, out: str, shards: int) -> None:
    """One torchrun rank: train, recording the largest RSS seen after each step."""
    from sae_train.sae import SAEConfig
    from sae_train.train import TrainConfig, run
    from sae_train.train.config import ParallelConfig

    peak = [0]

    def watch(info) -> None:
        peak[0] = max(peak[0], _rss_now())

    cfg = TrainConfig(
        store=store,
        out_dir=out,
        sae=SAEConfig(architecture="topk", k=32, d_sae=65536),
        n_tokens=16 * 256,
        batch_size=256,
        dtype="float32",
        progress=False,
        init_tokens=4096,
        parallel=ParallelConfig(latent_shards=shards),
    )
    run(cfg, callbacks=[watch])
    rank = int(os.environ.get("RANK", 0))
    total = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    (Path(out) / f"rss-{rank}.json").write_text(json.dumps({"training": peak[0], "whole run": total}))


def measured_rows() -> list[dict[str, str]]:
    from sae_train.store import StoreWriter

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        writer = StoreWriter(store, {"benchmark": "latent_shards"}, {"x": 512}, torch.float32)
        gen = torch.Generator().manual_seed(0)
        for i in range(4):
            writer.write_shard(
                i, {"x": torch.randn(4096, 512, generator=gen)}, torch.zeros(4096, dtype=torch.int32),
                torch.zeros(4096, dtype=torch.int32),
            )  # fmt: skip
        writer.close()
        for shards in (1, 2):
            out = Path(tmp) / f"shards{shards}"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={shards}"]
            cmd += [__file__, "--worker", str(store), str(out), str(shards)]
            env = os.environ | {"OMP_NUM_THREADS": "1"}
            subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=600)
            for rank in range(shards):
                rss = json.loads((out / f"rss-{rank}.json").read_text())
                rows.append(
                    {
                        "layout": "one process" if shards == 1 else f"{shards} latent shards",
                        "rank": str(rank),
                        "peak RSS training MB": f"{rss['training'] / 1e6:,.0f}",
                        "peak RSS whole run MB": f"{rss['whole run'] / 1e6:,.0f}",
                    }
                )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-measure", action="store_true", help="print the computed table only")
    parser.add_argument("--worker", nargs=3, metavar=("STORE", "OUT", "SHARDS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        store, out, shards = args.worker
        worker(store, out, int(shards))
        return
    print("One TopK SAE, d_in 4096, d_sae 2^20, k 32, global batch 4096, 8 ranks (fp32; computed):\n")
    print(markdown(computed_rows()))
    if not args.no_measure:
        print("\nMeasured on this CPU (TopK, d_in 512, d_sae 65536, batch 256, torchrun + gloo):\n")
        print(markdown(measured_rows()))


if __name__ == "__main__":
    main()
