"""Which ranks train which SAEs, and how each SAE's rows of the global batch reach them.

Every rank reads (or computes) its own slice of every global batch of B rows, whatever the
layout: rank r holds rows [r*B/W, (r+1)*B/W). An SAE is trained by its owners, a group of g
consecutive ranks; owner j of the group trains on rows [j*B/g, (j+1)*B/g), which reach it from
the ranks holding them through one all-to-all per site and step, so the data cost is paid once
per token.

- Data parallel (the default): every SAE's owners are all W ranks, so every rank trains on
  the rows it holds (nothing moves) and gradients are averaged over all ranks.
- Spread (`parallel.saes=true`), N SAEs on W ranks:
  - N >= W: each SAE has one owner, assigned greedily by parameter count (longest processing
    time first: the biggest SAE goes to the least loaded rank, ties to the lower rank), so the
    ranks hold about the same parameters and optimizer state. The owner trains on the whole
    global batch.
  - N < W: each SAE gets one rank, then each of the W - N others goes to the SAE with the
    most parameters per rank (ties: the earlier SAE). An SAE's ranks (usually one node) form a
    data-parallel group: the global batch split evenly among them (B must divide by the
    group's size), gradients averaged among them only.

Owner groups are therefore all ranks, single ranks or disjoint blocks: the members of a group
own the same SAEs in the same order, so the group's collectives always match, and all SAEs a
rank trains read the same rows of a site.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as tdist

from sae_train.errors import UserError
from sae_train.train.dist import Dist


def spread(sizes: Sequence[int], world_size: int) -> tuple[tuple[int, ...], ...]:
    """Owner ranks of each SAE (ascending) for SAEs of `sizes` parameters on `world_size`
    ranks: the spread rule of the module docstring. Every rank owns at least one SAE."""
    n = len(sizes)
    if n >= world_size:
        load, owner = [0] * world_size, [0] * n
        for i in sorted(range(n), key=lambda i: (-sizes[i], i)):
            owner[i] = min(range(world_size), key=lambda r: (load[r], r))
            load[owner[i]] += sizes[i]
        return tuple((r,) for r in owner)
    counts = [1] * n
    for _ in range(world_size - n):
        counts[max(range(n), key=lambda i: (sizes[i] / counts[i], -i))] += 1
    starts = itertools.accumulate(counts, initial=0)
    return tuple(tuple(range(start, start + count)) for start, count in zip(starts, counts))


@dataclass(frozen=True)
class Placement:
    owners: tuple[tuple[int, ...], ...]
    """Per SAE of the run (in `sae_plan` order): the ranks that train it, ascending."""
    world_size: int
    batch_size: int
    """The global batch, in rows."""

    @classmethod
    def build(cls, sizes: Sequence[int], world_size: int, batch_size: int, *, spread_saes: bool) -> Placement:
        """The layout for SAEs of `sizes` parameters: spread or data parallel."""
        owners = spread(sizes, world_size) if spread_saes else tuple(tuple(range(world_size)) for _ in sizes)
        uneven = sorted({len(group) for group in owners if batch_size % len(group)})
        if uneven:
            raise UserError(
                f"batch_size={batch_size} does not split evenly among the {uneven[0]} ranks that train one SAE "
                f"together (parallel.saes=true with {len(sizes)} SAEs on {world_size} ranks gives SAE groups of "
                f"{sorted({len(g) for g in owners})} ranks). Pick a batch_size divisible by each group size, or a "
                "number of ranks that is a multiple of the number of SAEs."
            )
        return cls(owners, world_size, batch_size)

    def owned(self, rank: int) -> list[int]:
        return [i for i, group in enumerate(self.owners) if rank in group]

    def rows(self, sae: int, owner: int) -> tuple[int, int]:
        """[start, stop) of the global batch that owner `owner` of SAE `sae` trains on."""
        group = self.owners[sae]
        j, g = group.index(owner), len(group)
        return j * self.batch_size // g, (j + 1) * self.batch_size // g

    def held(self, rank: int) -> tuple[int, int]:
        """[start, stop) of the global batch that rank `rank` reads."""
        return rank * self.batch_size // self.world_size, (rank + 1) * self.batch_size // self.world_size

    def share(self, sae: int, owner: int) -> float:
        """The fraction of the global batch that owner `owner` of SAE `sae` trains on."""
        start, stop = self.rows(sae, owner)
        return (stop - start) / self.batch_size

    def owner_dists(self, dist: Dist) -> dict[tuple[int, ...], Dist]:
        """A `Dist` per owner group of this rank's SAEs (all ranks: `dist` itself; one rank: a
        world of one). Every rank calls this once, in the same order: it creates the process
        groups of the other groups, which every rank of the world must join in turn."""
        out: dict[tuple[int, ...], Dist] = {}
        for group in dict.fromkeys(self.owners):
            if len(group) == self.world_size:
                handle, rank = dist.group, dist.rank
            elif len(group) == 1:
                handle, rank = None, 0
            else:
                handle = tdist.new_group(list(group))
                rank = group.index(dist.rank) if dist.rank in group else -1
            if dist.rank in group:
                out[group] = Dist(rank=rank, world_size=len(group), device=dist.device, group=handle)
        return out


def _overlap(a: tuple[int, int], b: tuple[int, int] | None) -> tuple[int, int]:
    if b is None:
        return a[0], a[0]
    start, stop = max(a[0], b[0]), min(a[1], b[1])
    return start, max(start, stop)


class Router:
    """Moves the rows of each site from the ranks that read them to the ranks whose SAEs read
    (or, a transcoder's target, write) that site: one all-to-all per site per step, in bytes so
    any dtype travels; none at all when every rank trains on the rows it holds (data parallel,
    or one rank)."""

    def __init__(self, placement: Placement, sites: Sequence[tuple[str, ...]], dist: Dist):
        """sites: per SAE of the run, the sites its step reads (source, then target)."""
        self.placement, self.dist = placement, dist
        self.wanted: dict[str, list[tuple[int, int] | None]] = {}  # per site, per rank: the rows it trains on
        for i, used in enumerate(sites):
            for site in used:
                per_rank = self.wanted.setdefault(site, [None] * placement.world_size)
                for owner in placement.owners[i]:
                    rows = placement.rows(i, owner)
                    if per_rank[owner] not in (None, rows):
                        raise ValueError(f"rank {owner}'s SAEs read different rows of {site}")  # excluded by the rules
                    per_rank[owner] = rows
        self.moves = any(
            rows not in (None, placement.held(rank))
            for per_rank in self.wanted.values()
            for rank, rows in enumerate(per_rank)
        )

    def _splits(self, site: str, sender: int, receiver: int) -> tuple[int, int]:
        """[start, stop) of `sender`'s own rows of `site` that go to `receiver`."""
        held = self.placement.held(sender)
        start, stop = _overlap(held, self.wanted[site][receiver])
        return start - held[0], stop - held[0]

    def route(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{site: the rows this rank's SAEs train on}, from this rank's own rows of every site."""
        if not self.moves:
            return {site: batch[site] for site in self.wanted}
        rank, world = self.dist.rank, self.placement.world_size
        out = {}
        for site in sorted(self.wanted):  # the same order on every rank
            rows = batch[site].contiguous()
            raw = rows.view(torch.uint8).view(rows.shape[0], -1)
            sends = [self._splits(site, rank, d) for d in range(world)]
            receives = [self._splits(site, r, rank) for r in range(world)]
            received = raw.new_empty(sum(stop - start for start, stop in receives), raw.shape[1])
            self.dist.all_to_all_(
                received,
                torch.cat([raw[start:stop] for start, stop in sends]),
                [stop - start for start, stop in receives],
                [stop - start for start, stop in sends],
            )
            out[site] = received.view(rows.dtype).view(-1, *rows.shape[1:])
        return out

    def bytes_sent(self, row_bytes: Mapping[str, int]) -> list[int]:
        """Per rank, the bytes of rows it sends to other ranks per step (row_bytes: per site)."""
        world = self.placement.world_size
        sent = [0] * world
        for site in self.wanted if self.moves else ():
            for sender, receiver in itertools.permutations(range(world), 2):
                start, stop = self._splits(site, sender, receiver)
                sent[sender] += (stop - start) * row_bytes[site]
        return sent
