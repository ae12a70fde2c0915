"""ShuffledBatches: the documented stream, rank splits, determinism, resume, threads."""

from __future__ import annotations

import gc
import subprocess
import sys
import threading
from collections import Counter
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch

from sae_train.errors import UserError
from sae_train.store import ActivationStore, ShuffledBatches, StoreWriter
from tests.store_util import SITES, SIZES, SPEC, make_shard, tags, write_store

N_SHARDS = 10
N_ROWS = sum(SIZES[:N_SHARDS])  # 99: not a multiple of the batch sizes below
SITE = "blocks.0.hook_resid_post"
COLS = [SITE, "token_ids", "position"]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> ActivationStore:
    root = tmp_path_factory.mktemp("store")
    write_store(root, N_SHARDS)
    return ActivationStore(root)


def stream(seed: int, epochs: int, window: int) -> list[tuple[int, int]]:
    """The slow, obviously-correct twin: the documented stream, built in full."""
    out = []
    for e in range(epochs):
        order = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0, e))).permutation(N_SHARDS)
        for w in range(0, N_SHARDS, window):
            rows = [(int(s), r) for s in order[w : w + window] for r in range(SIZES[s])]
            rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1, e, w // window)))
            perm = rng.permutation(len(rows))
            out += [rows[i] for i in perm]
    return out


def take(batches: ShuffledBatches, n: int) -> list[dict[str, torch.Tensor]]:
    return list(islice(batches, n))


@pytest.mark.parametrize("seed, window", [(0, 3), (5, 1), (7, 20)])
def test_batches_are_the_documented_stream(store: ActivationStore, seed: int, window: int) -> None:
    B = 12
    expected = stream(seed, 3, window)
    got = take(ShuffledBatches(store, COLS, B, seed=seed, window_shards=window), 3 * N_ROWS // B)
    for t, batch in enumerate(got):
        assert Counter(tags(batch)) == Counter(expected[t * B : (t + 1) * B])  # straddles epochs too
        assert batch[SITE].shape == (B, SITES[SITE]) and batch[SITE].dtype == torch.bfloat16
        for (shard, row), x in zip(tags(batch), batch[SITE]):  # activations follow their tags
            assert torch.equal(x, make_shard(shard)[0][SITE][row].to(torch.bfloat16))


@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_row_once_per_epoch_and_ranks_split_the_single_process_batch(store: ActivationStore, world: int) -> None:
    B = 6 * world
    single = list(ShuffledBatches(store, COLS, B, seed=3, window_shards=4, loop=False))
    ranks = [
        list(ShuffledBatches(store, COLS, B, seed=3, window_shards=4, loop=False, rank=r, world_size=world))
        for r in range(world)
    ]
    assert all(len(r) == len(single) == -(-N_ROWS // B) for r in ranks)  # same count on every rank
    seen = [tags(b) for r in ranks for b in r]
    flat = [t for batch in seen for t in batch]
    assert sorted(flat) == sorted((s, r) for s in range(N_SHARDS) for r in range(SIZES[s]))  # each row once
    for t, batch in enumerate(single):
        for col in COLS:
            assert torch.equal(torch.cat([r[t][col] for r in ranks]), batch[col])
    m = N_ROWS % B  # the last, smaller batch: rank r gets rows [r*m//W, (r+1)*m//W)
    assert [len(r[-1][SITE]) for r in ranks] == [(k + 1) * m // world - k * m // world for k in range(world)]


def test_a_rank_can_get_an_empty_last_batch(store: ActivationStore) -> None:
    # 99 rows in batches of 14: the last one holds 1 row, so rank 0 of 2 gets none.
    assert N_ROWS % 14 == 1
    last = [list(ShuffledBatches(store, COLS, 14, rank=r, world_size=2, loop=False, shuffle=False))[-1] for r in (0, 1)]
    assert last[0][SITE].shape == (0, SITES[SITE]) and last[0]["token_ids"].shape == (0,)
    assert tags(last[1]) == [(9, SIZES[9] - 1)]


def test_every_row_once_per_epoch_when_looping(store: ActivationStore) -> None:
    B = 10
    batches = take(ShuffledBatches(store, COLS, B, seed=1, window_shards=3), -(-3 * N_ROWS // B))
    rows = [t for b in batches for t in tags(b)]
    everything = sorted((s, r) for s in range(N_SHARDS) for r in range(SIZES[s]))
    for e in range(3):
        assert sorted(rows[e * N_ROWS : (e + 1) * N_ROWS]) == everything


def test_deterministic_and_seeded(store: ActivationStore) -> None:
    def run(seed: int) -> list[list[tuple[int, int]]]:
        return [tags(b) for b in take(ShuffledBatches(store, COLS, 8, seed=seed), 22)]

    assert run(0) == run(0)
    assert run(0) != run(1)
    epochs = run(0)
    assert [t for b in epochs[:11] for t in b] != [t for b in epochs[11:] for t in b]  # epochs reshuffle


@pytest.mark.parametrize("consumed", [3, 12, 13, 25])  # mid-epoch, straddling and past the boundary
@pytest.mark.parametrize("prefetch", [0, 2])
def test_resume_from_position(store: ActivationStore, consumed: int, prefetch: int) -> None:
    B = 8  # 99 rows: batch 12 (rows 96..103) straddles epochs 0 and 1
    full = take(ShuffledBatches(store, COLS, B, seed=4, window_shards=3, rank=1, world_size=2), consumed + 6)
    first = ShuffledBatches(store, COLS, B, seed=4, window_shards=3, rank=1, world_size=2, prefetch=prefetch)
    it = iter(first)
    for _ in range(consumed):
        next(it)
    assert first.position == consumed * B  # what the consumer has seen, not what was prefetched
    it.close()
    resumed = take(
        ShuffledBatches(store, COLS, B, seed=4, window_shards=3, rank=1, world_size=2, position=first.position), 6
    )
    for a, b in zip(resumed, full[consumed:], strict=True):
        assert all(torch.equal(a[c], b[c]) for c in COLS)


def test_unshuffled_is_the_store_in_order(store: ActivationStore) -> None:
    batches = list(ShuffledBatches(store, COLS, 32, shuffle=False, loop=False, window_shards=2))
    assert [len(b[SITE]) for b in batches] == [32, 32, 32, N_ROWS - 96]
    assert [t for b in batches for t in tags(b)] == [(s, r) for s in range(N_SHARDS) for r in range(SIZES[s])]


def test_dtype_and_fresh_tensors(store: ActivationStore) -> None:
    batch = next(iter(ShuffledBatches(store, COLS, 16, dtype=torch.float32, shuffle=False)))
    assert batch[SITE].dtype == torch.float32 and batch["token_ids"].dtype == torch.int32
    assert torch.equal(batch[SITE][:7], make_shard(0)[0][SITE].to(torch.bfloat16).float())
    for t in batch.values():  # owns exactly its bytes: not a view into a mapped shard
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size()
    raw = next(iter(ShuffledBatches(store, [SITE], 16, shuffle=False)))[SITE]
    assert raw.untyped_storage().nbytes() == raw.numel() * raw.element_size()


def prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "store-prefetch"]


def test_prefetch_thread_stops_when_closed_or_dropped(store: ActivationStore) -> None:
    it = iter(ShuffledBatches(store, COLS, 8, prefetch=2))
    next(it)
    assert prefetch_threads()
    it.close()  # joins the thread
    assert not prefetch_threads()
    it = iter(ShuffledBatches(store, COLS, 8, prefetch=2))
    next(it)
    del it
    gc.collect()
    assert not prefetch_threads()


def test_exit_with_a_live_iterator_is_clean(tmp_path: Path) -> None:
    # A daemon thread that had run torch's parallel gathers, still alive at interpreter exit,
    # aborted the process ("terminate called without an active exception").
    code = """if True:
        import sys, torch
        from sae_train.store import ActivationStore, ShuffledBatches, StoreWriter
        with StoreWriter(sys.argv[1], {}, {"a": 64}, torch.float16) as w:
            for i in range(4):
                w.write_shard(i, {"a": torch.randn(1000, 64)}, torch.full((1000,), i), torch.arange(1000))
        it = iter(ShuffledBatches(ActivationStore(sys.argv[1]), ["a"], 256, prefetch=1))
        next(it)
    """
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "terminate" not in proc.stderr, proc.stderr


def test_errors_in_the_prefetch_thread_reach_the_consumer(tmp_path: Path) -> None:
    write_store(tmp_path, 3)
    store = ActivationStore(tmp_path)
    (tmp_path / "shard-r000-000001.safetensors").write_bytes(b"\0" * 4)  # damaged after opening
    with pytest.raises(UserError, match="shard-r000-000001.safetensors is corrupt"):
        list(ShuffledBatches(store, COLS, 4, shuffle=False, loop=False, prefetch=2))
    assert not prefetch_threads()


def test_bad_reader_settings(store: ActivationStore, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="batch_size=10 must be a positive multiple of the world size \\(3\\)"):
        ShuffledBatches(store, COLS, 10, world_size=3)
    with pytest.raises(UserError, match=r"no site\(s\) \['blocks.9.hook_resid_post'\]"):
        ShuffledBatches(store, ["blocks.9.hook_resid_post"], 8)
    with pytest.raises(UserError, match="window_shards=0"):
        ShuffledBatches(store, COLS, 8, window_shards=0)
    StoreWriter(tmp_path, SPEC, SITES, torch.bfloat16).close()
    with pytest.raises(UserError, match="holds no tokens"):
        ShuffledBatches(ActivationStore(tmp_path), COLS, 8)


def test_origin_names_the_shard_rows_of_every_batch(store):
    """origin(start, stop) is where stream rows [start, stop) were read: every rank's share of a batch."""
    reader = ShuffledBatches(store, ["token_ids", "position"], 16, seed=3, window_shards=4, prefetch=0)
    for t, batch in enumerate(islice(iter(reader), 15)):  # more than one epoch of 99 rows
        rows = [
            (int(store.manifest.shards[s].index), int(r))
            for s, shard_rows in reader.origin(16 * t, 16 * (t + 1))
            for r in shard_rows
        ]
        assert sorted(rows) == sorted(tags(batch))
