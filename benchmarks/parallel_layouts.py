"""What each rank holds and sends per step under each parallel layout, computed from the
trainer's own placement and routing (sae_train/train/placement.py); no process group is made.

    python benchmarks/parallel_layouts.py                      # a 16-SAE sweep at d_in 2304 on 8 and 16 ranks
    python benchmarks/parallel_layouts.py --d-in 4096 --widths 65536 131072 --ks 32 --sites 4 --ranks 4 8
    python benchmarks/parallel_layouts.py --ranks 2 --per-rank   # one line per rank

Layouts:
- data parallel (the default): every rank holds every SAE and trains it on its share of the batch;
- spread (`parallel.saes=true`): each rank holds its own SAEs (more ranks than SAEs: groups).

Per rank: the parameters it holds, their fp32 weights + gradients + Adam moments (4 copies), and
the bytes it sends per step, assuming ring collectives (an all-reduce of n bytes over g ranks
sends 2(g-1)/g n per rank, an all-gather (g-1)/g of the gathered size):
- rows: the activation rows it sends to the owners of the SAEs that read them (all-to-all), in
  the store's dtype (--row-bytes: 2 for bf16);
- gradients: the fp32 gradient all-reduce of each SAE it trains with others;
- statistics: the one fp64 all-reduce of every SAE's step statistics (about d_sae + 8 numbers
  per SAE, the fired mask dominating);
- selection: BatchTopK's all-gather of each rank's k*B candidates, where an SAE's group has
  several ranks.
"""

from __future__ import annotations

import argparse
import itertools
from dataclasses import dataclass

import torch

from sae_train.errors import UserError
from sae_train.sae import SAEConfig, create_sae
from sae_train.train.dist import Dist
from sae_train.train.placement import Placement, Router

GIB, MIB = 2**30, 2**20
COPIES = 4  # fp32 weights, gradients, Adam's two moments


@dataclass
class RankLoad:
    saes: int
    parameters: int
    rows: float
    gradients: float
    statistics: float
    selection: float

    @property
    def memory(self) -> float:
        return self.parameters * 4 * COPIES

    @property
    def sent(self) -> float:
        return self.rows + self.gradients + self.statistics + self.selection


def ring_all_reduce(nbytes: float, ranks: int) -> float:
    return 2 * (ranks - 1) / ranks * nbytes if ranks > 1 else 0.0


def layout(args: argparse.Namespace, world: int, spread: bool) -> list[RankLoad]:
    """Per rank of `world`: what it holds and sends per step under one layout."""
    sites = [f"blocks.{i}.hook_resid_post" for i in range(args.sites)]
    plan = [
        (site, SAEConfig(architecture=args.arch, k=k, d_sae=width).resolved(args.d_in))
        for site, width, k in itertools.product(sites, args.widths, args.ks)
    ]
    with torch.device("meta"):
        sizes = [sum(p.numel() for p in create_sae(cfg).parameters()) for _, cfg in plan]
    placement = Placement.build(sizes, world, args.batch_size, spread_saes=spread)
    router = Router(placement, [(site,) for site, _ in plan], Dist(world_size=world))
    rows = router.bytes_sent(dict.fromkeys(sites, args.d_in * args.row_bytes))
    statistics = ring_all_reduce(8 * sum(cfg.d_sae + 8 for _, cfg in plan), world)
    loads = []
    for rank in range(world):
        owned = placement.owned(rank)
        gradients = selection = 0.0
        for i in owned:
            g = len(placement.owners[i])
            gradients += ring_all_reduce(4 * sizes[i], g)
            if args.arch == "batchtopk" and g > 1:
                start, stop = placement.rows(i, rank)
                selection += (g - 1) * 4 * plan[i][1].k * (stop - start) * g
        loads.append(RankLoad(len(owned), sum(sizes[i] for i in owned), rows[rank], gradients, statistics, selection))
    return loads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-in", type=int, default=2304)
    parser.add_argument("--sites", type=int, default=1)
    parser.add_argument("--widths", type=int, nargs="+", default=[16384, 32768, 65536, 131072])
    parser.add_argument("--ks", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--arch", default="topk")
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--row-bytes", type=int, default=2, help="bytes per stored activation (2: bf16)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--per-rank", action="store_true", help="one line per rank instead of the busiest")
    args = parser.parse_args()
    n = args.sites * len(args.widths) * len(args.ks)
    print(
        f"{n} {args.arch} SAEs ({args.sites} site(s) x widths {args.widths} x k {args.ks}), d_in {args.d_in}, "
        f"batch {args.batch_size}, rows of {args.row_bytes} bytes per value\n"
    )
    header = (
        f"{'layout':14s} {'ranks':>5s} {'rank':>6s} {'SAEs':>5s} {'params (M)':>11s} {'w+g+Adam GiB':>13s} "
        f"{'rows MiB':>9s} {'grads MiB':>10s} {'stats MiB':>10s} {'select MiB':>11s} {'sent MiB/step':>14s}"
    )
    print(header)
    print("-" * len(header))
    for world, (name, spread) in itertools.product(args.ranks, [("data parallel", False), ("spread", True)]):
        try:
            loads = layout(args, world, spread)
        except UserError as err:  # a batch that does not split over a group: say so, go on
            print(f"{name:14s} {world:5d}  {err}")
            continue
        shown = enumerate(loads) if args.per_rank else [max(enumerate(loads), key=lambda x: (x[1].memory, x[1].sent))]
        for rank, load in shown:
            label = str(rank) if args.per_rank else f"max@{rank}"
            print(
                f"{name:14s} {world:5d} {label:>6s} {load.saes:5d} {load.parameters / 1e6:11.1f} "
                f"{load.memory / GIB:13.2f} {load.rows / MIB:9.1f} {load.gradients / MIB:10.1f} "
                f"{load.statistics / MIB:10.2f} {load.selection / MIB:11.1f} {load.sent / MIB:14.1f}"
            )


if __name__ == "__main__":
    main()
