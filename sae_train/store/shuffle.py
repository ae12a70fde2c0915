"""Shuffled, rank-split, resumable batches from an activation store.

The stream. Epoch e orders the shards by a permutation seeded by (seed, e) and cuts that
order into windows of `window_shards` shards; the rows of window w (its shards' rows
concatenated in window order) are permuted by a generator seeded by (seed, e, w). The epoch's
stream is its windows' permuted rows one after the other, and epochs follow each other
(`loop=True`) so a batch may straddle two epochs. With `shuffle=False` the stream is every
shard in index order, rows in order.

The batches. Global batch t is the set of stream rows [p0 + t*B, p0 + (t+1)*B) where p0 is
the starting `position`. Its rows are gathered per shard with sorted indices (locality), so
they come grouped by window, then by shard in window order, then by ascending row: that
canonical order is the same on every rank, and rank r of W yields the r-th contiguous W-th
of it. Concatenating the ranks' batches therefore gives exactly the single-process batch,
and every rank yields the same number of batches. With `loop=False` the last batch holds the
m < B rows left and rank r gets its rows [r*m//W, (r+1)*m//W) (possibly none: tensors with
0 rows, which every rank still receives, so collectives stay matched).

Seeds go through numpy's SeedSequence with (domain, epoch[, window]) spawn keys, so the
streams are independent and the same on every platform.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Generator, Iterator, Sequence

import numpy as np
import torch

from sae_train.errors import UserError
from sae_train.store.manifest import RESERVED
from sae_train.store.prefetch import prefetched
from sae_train.store.reader import ActivationStore

Pieces = list[tuple[int, np.ndarray]]  # (shard position, sorted row indices within the shard)


class ShuffledBatches:
    """Iterable of {name: tensor [batch_size // world_size, ...]} for training and eval.

    `sites` may also name "token_ids" and "position" (int32, never converted by `dtype`).
    Output tensors are fresh (never views of the mmapped files). Iterating continues from
    `position`, the global number of stream rows consumed so far: it is the same on every
    rank, and a new reader built with `position=` yields exactly the batches this one would
    have yielded next. Use one iterator at a time. `prefetch` batches are prepared in a
    background thread (0: none); it stops when the iterator is closed or dropped, and its
    exceptions are raised in the consumer. `pin_memory` gathers into page-locked memory, from
    which a GPU copies asynchronously (and converts, with `dtype`, into page-locked memory too).
    """

    def __init__(
        self,
        store: ActivationStore,
        sites: Sequence[str],
        batch_size: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        window_shards: int = 8,
        position: int = 0,
        shuffle: bool = True,
        loop: bool = True,
        dtype: torch.dtype | None = None,
        prefetch: int = 2,
        pin_memory: bool = False,
    ) -> None:
        known = list(store.sites) + list(RESERVED)
        unknown = [s for s in sites if s not in known]
        if not sites or unknown:
            raise UserError(f"Store {store.root} has no site(s) {unknown or '(none requested)'}; it holds {known}.")
        if world_size < 1 or not 0 <= rank < world_size:
            raise UserError(f"Reader rank {rank} is outside world_size {world_size}; expected 0 <= rank < world_size.")
        if batch_size <= 0 or batch_size % world_size:
            raise UserError(
                f"batch_size={batch_size} must be a positive multiple of the world size ({world_size}): it "
                "is the global batch, split evenly across ranks. Pick a batch_size divisible by it."
            )
        for name, value, low in (
            ("window_shards", window_shards, 1),
            ("seed", seed, 0),
            ("position", position, 0),
            ("prefetch", prefetch, 0),
        ):
            if value < low:
                raise UserError(f"{name}={value} for the store reader must be >= {low}.")
        if store.n_tokens == 0:
            raise UserError(
                f"Activation store {store.root} holds no tokens (no finished shards yet). Run or "
                "finish `sae-train cache` for it first."
            )
        if dtype is not None and not dtype.is_floating_point:
            raise UserError(f"Reader dtype {dtype} is not a floating-point dtype.")
        self.store, self.sites, self.batch_size = store, list(sites), batch_size
        self.seed, self.rank, self.world_size, self.window_shards = seed, rank, world_size, window_shards
        self.shuffle, self.loop, self.dtype, self.prefetch, self.pin_memory = shuffle, loop, dtype, prefetch, pin_memory
        self._position = position

    @property
    def position(self) -> int:
        """Global stream rows consumed so far (after t batches from 0: t * batch_size)."""
        return self._position

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        batches = self._batches(self._position)
        if self.prefetch:
            batches = prefetched(batches, self.prefetch)
        try:
            for position, batch in batches:
                self._position = position
                yield batch
        finally:
            batches.close()  # stops the prefetch thread at once, not whenever GC runs

    def origin(self, start: int, stop: int) -> Pieces:
        """Where stream rows [start, stop) come from (every rank's share): (shard position,
        sorted rows within the shard) pairs."""
        return self._plan().pieces(start, stop)

    def _plan(self) -> StreamPlan:
        sizes = [s.n_tokens for s in self.store.manifest.shards]
        return StreamPlan(sizes, self.seed, self.window_shards, self.shuffle)

    def _batches(self, start: int) -> Generator[tuple[int, dict[str, torch.Tensor]], None, None]:
        plan = self._plan()
        shards = _ShardCache(self.store, 2 * self.window_shards)
        end = None if self.loop else plan.n_rows
        while end is None or start < end:
            stop = start + self.batch_size if end is None else min(start + self.batch_size, end)
            pieces = plan.pieces(start, stop)
            m = stop - start
            mine = _cut(pieces, self.rank * m // self.world_size, (self.rank + 1) * m // self.world_size)
            yield stop, self._gather(shards, mine)
            start = stop

    def _gather(self, shards: _ShardCache, pieces: Pieces) -> dict[str, torch.Tensor]:
        n = sum(len(rows) for _, rows in pieces)
        out = {}
        for name in self.sites:
            site = self.store.sites.get(name)
            shape, dtype = ((n,), torch.int32) if site is None else ((n, site.d_in), site.torch_dtype)
            out[name] = torch.empty(shape, dtype=dtype, pin_memory=self.pin_memory)
        offset = 0
        for shard, rows in pieces:
            views, idx = shards.get(shard), torch.from_numpy(rows)
            for name in self.sites:
                torch.index_select(views[name], 0, idx, out=out[name][offset : offset + len(rows)])
            offset += len(rows)
        if self.dtype is not None:
            out = {
                k: v
                if k in RESERVED or v.dtype == self.dtype
                else torch.empty(v.shape, dtype=self.dtype, pin_memory=self.pin_memory).copy_(v)
                for k, v in out.items()
            }
        return out


class StreamPlan:
    """Index math only: which (shard, row) pairs the stream holds between two positions."""

    def __init__(self, sizes: Sequence[int], seed: int, window_shards: int, shuffle: bool) -> None:
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.n_rows = int(self.sizes.sum())
        self.seed, self.window_shards, self.shuffle = seed, window_shards, shuffle
        self._epochs: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._perms: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    def pieces(self, start: int, stop: int) -> Pieces:
        """Stream rows [start, stop) as per-shard sorted row indices, in canonical order."""
        out: Pieces = []
        while start < stop:
            epoch, offset = divmod(start, self.n_rows)
            order, bounds = self._epoch(epoch)
            w = int(np.searchsorted(bounds, offset, side="right")) - 1
            lo = offset - bounds[w]
            hi = min(lo + stop - start, bounds[w + 1] - bounds[w])
            if self.shuffle:
                local = np.sort(self._perm(epoch, w)[lo:hi])
            else:
                local = np.arange(lo, hi, dtype=np.int64)
            window = order[w * self.window_shards : (w + 1) * self.window_shards]
            firsts = np.concatenate([[0], np.cumsum(self.sizes[window])])
            cuts = np.searchsorted(local, firsts)
            out += [(int(s), local[a:b] - f) for s, f, a, b in zip(window, firsts, cuts[:-1], cuts[1:]) if b > a]
            start += hi - lo
        return out

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard order, row offset where each window starts, plus the total)."""
        if epoch not in self._epochs:
            n = len(self.sizes)
            order = _rng(self.seed, 0, epoch).permutation(n) if self.shuffle else np.arange(n)
            starts = np.cumsum(self.sizes[order])[self.window_shards - 1 :: self.window_shards]
            last = [] if n % self.window_shards == 0 else [self.n_rows]
            bounds = np.concatenate([[0], starts, last]).astype(np.int64)
            _remember(self._epochs, epoch, (order, bounds))
        return self._epochs[epoch]

    def _perm(self, epoch: int, window: int) -> np.ndarray:
        key = (epoch, window)
        if key not in self._perms:
            _, bounds = self._epoch(epoch)
            size = int(bounds[window + 1] - bounds[window])
            _remember(self._perms, key, _rng(self.seed, 1, epoch, window).permutation(size))
        return self._perms[key]


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=key)))


def _remember(cache: OrderedDict, key: object, value: object, size: int = 2) -> None:
    cache[key] = value
    while len(cache) > size:
        cache.popitem(last=False)


def _cut(pieces: Pieces, lo: int, hi: int) -> Pieces:
    """The rows at canonical positions [lo, hi) of a global batch's pieces."""
    out, offset = [], 0
    for shard, rows in pieces:
        a, b = max(lo - offset, 0), min(hi - offset, len(rows))
        if b > a:
            out.append((shard, rows[a:b]))
        offset += len(rows)
    return out


class _ShardCache:
    """The most recently used shards' mmap views (bounded: each holds a file descriptor)."""

    def __init__(self, store: ActivationStore, size: int) -> None:
        self.store, self.size = store, size
        self._views: OrderedDict[int, dict[str, torch.Tensor]] = OrderedDict()

    def get(self, i: int) -> dict[str, torch.Tensor]:
        if i in self._views:
            self._views.move_to_end(i)
        else:
            _remember(self._views, i, self.store.shard(i), self.size)
        return self._views[i]
