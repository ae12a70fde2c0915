"""Where inspect's rows come from: a store's shards in order, or the model run live.

Either way a chunk is whole windows (so an example's context is inside its chunk) of about
`batch_size` rows, with each row's token id, window and global row id, plus the activations
of the sites asked for.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from sae_train.data import TokenSpec
from sae_train.data.packing import keep_mask
from sae_train.errors import UserError
from sae_train.inspect.stream import Chunk
from sae_train.lm import LanguageModel, Site
from sae_train.store import ActivationStore
from sae_train.store.manifest import RESERVED

Rows = Iterator[tuple[dict[str, Tensor], Chunk]]


def window_starts(position: Tensor) -> Tensor:
    """Row indices where a window starts: the first row and every row whose position does not
    exceed the previous row's (rows of a window have increasing positions)."""
    starts = torch.ones(len(position), dtype=torch.bool)
    starts[1:] = position[1:] <= position[:-1]
    return starts.nonzero().squeeze(1)


def chunk_bounds(starts: Tensor, n_rows: int, batch_size: int) -> list[tuple[int, int]]:
    """[a, b) row ranges of whole windows, each about batch_size rows (at least one window)."""
    bounds, begin = [], 0
    for start in [*starts.tolist()[1:], n_rows]:
        if start - begin >= batch_size or start == n_rows:
            if start > begin:
                bounds.append((begin, start))
            begin = start
    return bounds


def check_store(store: ActivationStore, sites: Sequence[str], n_tokens: int) -> None:
    """A UserError unless the store holds the sites, token ids and positions, and n_tokens rows."""
    missing = [s for s in sites if s not in store.sites]
    if missing:
        raise UserError(
            f"Activation store {store.root} lacks site(s) {missing} that the checkpoint(s) read; it holds "
            f"{sorted(store.sites)}. Cache them (`sae-train cache sites=[...] out_dir=...`) or pass a store that "
            "has them, or leave store= empty to run the model live."
        )
    if n_tokens > store.n_tokens:
        raise UserError(
            f"n_tokens={n_tokens:,} but activation store {store.root} holds {store.n_tokens:,} rows. Lower n_tokens "
            "or cache more tokens into the store (rerun `sae-train cache` with a larger n_tokens)."
        )
    if store.n_shards:
        tensors = store.shard(0)
        absent = [name for name in RESERVED if name not in tensors]
        if absent:
            raise UserError(
                f"Activation store {store.root} has no {' or '.join(absent)} in its shards, so the examples' "
                "contexts cannot be rebuilt. Recreate it with `sae-train cache` (every shard it writes keeps each "
                "row's token id and position), or leave store= empty to run the model live."
            )


def store_rows(
    store: ActivationStore, sites: Sequence[str], n_tokens: int, batch_size: int, device: torch.device
) -> Rows:
    """The first n_tokens rows of the store, in shard order."""
    offset, window_offset = 0, 0
    for i in range(store.n_shards):
        if offset >= n_tokens:
            return
        tensors = store.shard(i)
        n = min(len(tensors["token_ids"]), n_tokens - offset)
        position = tensors["position"][:n]
        starts = window_starts(position)
        window = torch.zeros(n, dtype=torch.long)
        window[starts] = 1
        window = window.cumsum(0) + window_offset
        for a, b in chunk_bounds(starts, n, batch_size):
            acts = {site: tensors[site][a:b].to(device) for site in sites}
            chunk = Chunk(
                tokens=tensors["token_ids"][a:b].long().to(device),
                window=window[a:b].to(device),
                rows=torch.arange(offset + a, offset + b, device=device),
            )
            yield acts, chunk
        offset += n
        window_offset = int(window[-1]) + 1 if n else window_offset


def live_rows(lm: LanguageModel, sites: Sequence[Site], windows: Tensor, tokens: TokenSpec, batch_size: int) -> Rows:
    """The kept rows (keep_mask: the store's rule) of `windows` [n, context], run through the model."""
    n, context = windows.shape
    per_batch = max(1, batch_size // context)
    for start in range(0, n, per_batch):
        ids = windows[start : start + per_batch].to(lm.device)
        acts = lm.capture(sites, ids)
        keep = keep_mask(ids, tokens)
        index = torch.arange(start * context, start * context + ids.numel(), device=lm.device).view(ids.shape)
        chunk = Chunk(tokens=ids[keep], window=index[keep] // context, rows=index[keep])
        yield {site.name: acts[site.name][keep] for site in sites}, chunk
