"""Which ranks train which SAEs (train/placement.py): pure functions, no process group."""

from __future__ import annotations

import itertools

import pytest
import torch

from sae_train.errors import UserError
from sae_train.train.dist import Dist
from sae_train.train.placement import Placement, Router, spread


def test_more_saes_than_ranks_balances_parameters_longest_first():
    # 8 -> r0; 4 -> r1; 4 -> r1 (4 < 8); 2 -> r0 (8 = 8: the lower rank); 2 -> r1
    assert spread([8, 4, 4, 2, 2], 2) == ((0,), (1,), (1,), (0,), (1,))
    loads = [0, 0, 0]
    for size, (rank,) in zip([5, 1, 3, 3, 2, 2, 1], spread([5, 1, 3, 3, 2, 2, 1], 3)):
        loads[rank] += size
    assert sorted(loads) == [5, 6, 6]  # 17 parameters on 3 ranks: the best split


def test_more_ranks_than_saes_form_groups_for_the_big_ones():
    assert spread([1, 4], 3) == ((0,), (1, 2))
    assert spread([1, 1, 1], 8) == ((0, 1, 2), (3, 4, 5), (6, 7))
    assert spread([1, 3], 8) == ((0, 1), (2, 3, 4, 5, 6, 7))
    assert spread([7], 4) == ((0, 1, 2, 3),)


@pytest.mark.parametrize("n, world", list(itertools.product(range(1, 8), range(1, 8))))
def test_any_number_of_saes_on_any_world_size(n, world):
    """Every SAE has owners; every rank trains something; groups are consecutive ranks and
    either disjoint or single: the members of a group own the same SAEs."""
    sizes = [(7 * i) % 5 + 1 for i in range(n)]
    owners = spread(sizes, world)
    assert len(owners) == n and all(group for group in owners)
    assert {r for group in owners for r in group} == set(range(world))
    for group in owners:
        assert list(group) == list(range(group[0], group[0] + len(group)))
    for a, b in itertools.combinations(set(owners), 2):
        assert not set(a) & set(b) or len(a) == len(b) == 1
    by_rank = [[i for i, g in enumerate(owners) if r in g] for r in range(world)]
    for group in owners:
        assert all(by_rank[r] == by_rank[group[0]] for r in group)


def test_data_parallel_is_every_rank_on_its_own_rows():
    placement = Placement.build([3, 5], 4, 64, spread_saes=False)
    assert placement.owners == ((0, 1, 2, 3),) * 2
    assert [placement.rows(0, r) for r in range(4)] == [placement.held(r) for r in range(4)]
    router = Router(placement, [("a",), ("a", "b")], Dist(rank=1, world_size=4))
    assert not router.moves and router.bytes_sent({"a": 4, "b": 8}) == [0] * 4


def test_a_group_must_split_the_batch_evenly():
    with pytest.raises(UserError, match="batch_size=64 does not split evenly among the 3 ranks"):
        Placement.build([1, 1, 1], 8, 64, spread_saes=True)
    assert Placement.build([1, 1, 1], 8, 96, spread_saes=True).share(0, 1) == pytest.approx(1 / 3)


@pytest.mark.parametrize("sizes, world", [([1, 2, 3], 2), ([1, 4], 3), ([2, 2, 1], 8), ([1], 3), ([5, 1, 1, 1], 4)])
def test_every_owner_receives_exactly_its_rows(sizes, world):
    """The rows each rank sends (its own slice, cut by `_splits`) assembled at each receiver in
    rank order are the global rows its SAEs train on, for a source and a transcoder target."""
    batch = 24 * world
    placement = Placement.build(sizes, world, batch, spread_saes=True)
    sites = [("x",) if i % 2 else ("x", "y") for i in range(len(sizes))]
    router = Router(placement, sites, Dist(world_size=world))
    rows = torch.arange(batch)
    for owner in range(world):
        for i in placement.owned(owner):
            start, stop = placement.rows(i, owner)
            for site in sites[i]:
                received = [
                    rows[slice(*placement.held(r))][slice(*router._splits(site, r, owner))] for r in range(world)
                ]
                assert torch.equal(torch.cat(received), rows[start:stop]), (owner, i, site)
    sent = router.bytes_sent({"x": 1, "y": 10})
    assert len(sent) == world and all(b >= 0 for b in sent)


def test_bytes_sent_pay_the_data_once_per_token():
    """Two SAEs of one site on two ranks: each rank sends its half of the batch to the other."""
    placement = Placement.build([1, 1], 2, 64, spread_saes=True)
    assert Router(placement, [("x",), ("x",)], Dist(world_size=2)).bytes_sent({"x": 128}) == [32 * 128] * 2
