"""Where training activations come from: an activation store or the model itself, live.

Both give the trainer the same thing: an endless stream of this rank's share of each global
batch ({site: [batch_size / world_size, d_in]}), a `position` to save in checkpoints so a
resumed run continues with exactly the batches it would have seen, and `sample(n)` rows for
the one-off initialisation statistics.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import asdict
from itertools import islice
from typing import Protocol

import numpy as np
import torch

from sae_train.data import DataConfig, TextConfig, TokenSpec, iter_documents, iter_windows
from sae_train.data.packing import keep_mask
from sae_train.errors import UserError
from sae_train.lm import LanguageModel
from sae_train.store import ActivationStore, ShuffledBatches
from sae_train.store.shardfile import read_header
from sae_train.train.dist import Dist


class ActivationSource(Protocol):
    sites: list[str]
    provenance: dict
    """What produced the activations (model identity, data, context size...), for checkpoints."""

    def d_in(self, site: str) -> int: ...

    def batches(self, position: int) -> Iterator[dict[str, torch.Tensor]]: ...

    @property
    def position(self) -> int: ...

    def sample(self, n_tokens: int) -> dict[str, torch.Tensor]: ...

    def nonfinite_error(self, site: str, start: int, stop: int, *, sample: bool = False) -> UserError | None:
        """An error naming where non-finite activations of `site` among global rows [start, stop)
        of the training stream (of the `sample` stream) come from, with the fix; None when
        those rows are finite. Called only once training has failed, never per step."""
        ...


class StoreSource:
    """Shuffled batches from an activation store (see `ShuffledBatches` for the exact order).

    For a GPU the prefetch thread gathers rows in the store's dtype (bf16: half the bytes)
    into pinned memory, and the trainer converts on the device; for the CPU, fp32 rows."""

    def __init__(
        self,
        path: str,
        sites: list[str],
        batch_size: int,
        dist: Dist,
        *,
        seed: int,
        window_shards: int,
        targets: Sequence[str] = (),
    ):
        self.store = ActivationStore(path)
        if self.store.n_tokens == 0:
            raise UserError(
                f"Activation store {path} holds no tokens yet; run (or finish) `sae-train cache ... out_dir={path}` first."
            )
        self.sites = sites or list(self.store.sites)
        if targets:
            self._check_targets(list(dict.fromkeys(targets)), [s for s in self.sites if s not in targets])
        unknown = [s for s in self.sites if s not in self.store.sites]
        if unknown:
            raise UserError(f"Store {path} has no site {unknown}; it holds {list(self.store.sites)}. Fix sites=[...].")
        self.batch_size, self.dist, self.seed, self.window_shards = batch_size, dist, seed, window_shards
        spec = self.store.manifest.spec
        self.provenance = {"source": "store", "store": str(path), **{k: spec.get(k) for k in ("model", "data", "text")}}
        self._reader: ShuffledBatches | None = None

    def _check_targets(self, targets: list[str], sources: list[str]) -> None:
        """Transcoder targets must be in the store, row for row with their sources (each shard
        one tensor per site over the same tokens; checked on the shard headers)."""
        fix = (
            f"A transcoder trains on its source and target sites cached in one pass, so their rows are the same "
            f"tokens: `sae-train cache sites=[{','.join([*sources, *targets]) if sources else '<sources>,...'}] ...` "
            "into a new out_dir, or train with source=live."
        )
        missing = [t for t in targets if t not in self.store.sites]
        if missing:
            raise UserError(
                f"sae.target={','.join(missing)} is not in activation store {self.store.root}, which holds "
                f"{list(self.store.sites)}. {fix}"
            )
        for info in self.store.manifest.shards:
            entries = read_header(self.store.root / info.file)
            rows = {s: entries[s].shape[0] for s in (*sources, *targets) if s in entries}
            if any(n != info.n_tokens for n in rows.values()):
                raise UserError(
                    f"Shard {info.file} of activation store {self.store.root} records {info.n_tokens} tokens "
                    f"but holds rows {rows}: the target's rows do not line up with the source's. {fix}"
                )

    def d_in(self, site: str) -> int:
        return self.store.sites[site].d_in

    def _stream(self, batch_size: int, *, sample: bool = False, position: int = 0) -> ShuffledBatches:
        """This rank's training stream, or (`sample`) the stream `sample` draws from, as a single
        process would, so it does not depend on the world size."""
        if sample:
            return ShuffledBatches(
                self.store,
                self.sites,
                batch_size,
                seed=self.seed + 1,
                window_shards=self.window_shards,
                dtype=torch.float32,
                prefetch=0,
            )
        cuda = self.dist.device.type == "cuda"
        return ShuffledBatches(
            self.store,
            self.sites,
            batch_size,
            seed=self.seed,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            window_shards=self.window_shards,
            position=position,
            dtype=None if cuda else torch.float32,
            pin_memory=cuda,
        )

    def batches(self, position: int) -> Iterator[dict[str, torch.Tensor]]:
        self._reader = self._stream(self.batch_size, position=position)
        return iter(self._reader)

    @property
    def position(self) -> int:
        return self._reader.position if self._reader else 0

    def sample(self, n_tokens: int) -> dict[str, torch.Tensor]:
        """n rows drawn like a single-process run would (independent of the world size)."""
        return next(iter(self._stream(min(n_tokens, self.store.n_tokens), sample=True)))

    def nonfinite_error(self, site: str, start: int, stop: int, *, sample: bool = False) -> UserError | None:
        stream = self._stream(self.batch_size, sample=sample)
        bad = {
            shard: self.store.nonfinite_rows(shard, site)  # every bad row of a shard the rows touch
            for shard, rows in stream.origin(start, stop)
            if len(self.store.nonfinite_rows(shard, site, rows))
        }
        if not bad:
            return None
        shards = self.store.manifest.shards
        listing = "; ".join(
            f"{shards[i].file} rows {_ranges(rows)} (of {shards[i].n_tokens})" for i, rows in list(bad.items())[:5]
        )
        more = f"; and {len(bad) - 5} more shards" if len(bad) > 5 else ""
        damaged = [shards[i].file for i in bad if self.store.damaged(i)]
        if damaged:
            fix = (
                f"The bytes of {', '.join(damaged)} changed after they were written (sha256 differs from the "
                "manifest's): delete these files and rerun the same `sae-train cache` command, which rewrites "
                "exactly the missing shards."
            )
        else:
            fix = (
                "These shards hold the values as written (their sha256 matches the manifest's): the store's writer "
                "stored non-finite activations (sae-train's refuses them; an older version or another tool does "
                "not), typically the model overflowing its dtype. Re-cache into a new out_dir with "
                "model.dtype=float32 (or bfloat16; float16 overflows easily)."
            )
        return UserError(
            f"Activations of site {site} in store {self.store.root} are not finite (NaN or inf): "
            f"{listing}{more}. Training stopped; no checkpoint was overwritten. {fix}"
        )


def _ranges(rows: np.ndarray, limit: int = 8) -> str:
    """Sorted row indices as "3-5, 9, 12-40" (the first `limit` runs)."""
    runs: list[list[int]] = []
    for row in rows.tolist():
        if runs and row == runs[-1][1] + 1:
            runs[-1][1] = row
        else:
            runs.append([row, row])
    text = ", ".join(f"{a}-{b}" if b > a else str(a) for a, b in runs[:limit])
    return text + (f" and {len(runs) - limit} more runs" if len(runs) > limit else "")


def _rows(tensors: dict[str, torch.Tensor]) -> int:
    """Rows of each of the (equally long) tensors; 0 for none."""
    return len(next(iter(tensors.values()))) if tensors else 0


def _finite(x: torch.Tensor) -> bool:
    """Whether every entry of x is finite. A sum is finite only if every entry is (NaN and inf
    propagate), and summing costs ~30x less than `isfinite(x).all()` on CPU bf16; only a
    non-finite sum (those entries, or an overflow of finite ones) takes the exact test."""
    return bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all())


class LiveSource:
    """Activations computed on the fly, shuffled within blocks of `buffer_tokens` tokens.

    Rank r runs the windows i of the packed corpus with i % world_size == r, in blocks of
    buffer_tokens / context_size windows, cycling through the corpus. Block b's rows are
    permuted by a generator seeded by (seed, rank, b); the stream is the blocks one after the
    other and position counts global rows consumed. A resume recomputes only the block it
    stopped in.
    """

    def __init__(
        self,
        lm: LanguageModel,
        sites: list[str],
        data: DataConfig,
        text: TextConfig,
        batch_size: int,
        dist: Dist,
        *,
        seed: int,
        buffer_tokens: int,
    ):
        if data.split != "train":
            raise UserError("source=live trains on data.split=train; eval text must stay held out.")
        self.lm, self.data, self.text, self.dist, self.seed = lm, data, text, dist, seed
        self.sites = list(sites)
        self._sites = [lm.site(s) for s in sites]
        self._widths = {s.name: lm.site_width(s) for s in self._sites}
        self._tokens = TokenSpec.from_tokenizer(lm.tokenizer, text)
        self.local_batch = batch_size // dist.world_size
        self.windows_per_block = max(1, buffer_tokens // text.context_size)
        self.provenance = {"source": "live", "model": lm.identity, "data": data.describe(), "text": asdict(text)}
        self._position = 0
        if next(self._rank_windows(dist.rank, dist.world_size), None) is None:
            raise UserError(
                f"Data source '{data.source}' {data.path} yields no full window of {text.context_size} tokens."
            )

    def d_in(self, site: str) -> int:
        return self._widths[site]

    def _corpus_windows(self) -> Iterator[torch.Tensor]:
        return iter_windows(iter_documents(self.data), self.lm.tokenizer, self.text, self._tokens)

    def _rank_windows(self, rank: int, world: int) -> Iterator[torch.Tensor]:
        """Rank `rank` of `world`'s windows, cycling through the corpus forever."""
        while True:
            produced = False
            for i, window in enumerate(self._corpus_windows()):
                if i % world == rank:
                    produced = True
                    yield window
            if not produced:
                return

    def _block_rows(self, windows: list[torch.Tensor], block: int, rank: int) -> dict[str, torch.Tensor]:
        """The block's kept rows of every site, shuffled, in fp32: one gather per site (the kept
        tokens in permuted order, `index_select`: ~3x faster than boolean then fancy indexing),
        then the conversion."""
        batch = torch.stack(windows)
        rows = self.lm.capture_rows(self._sites, batch, 16 * self.text.context_size)
        kept = keep_mask(batch.flatten(), self._tokens).nonzero().squeeze(1)
        rng = np.random.default_rng([self.seed, rank, block])
        order = kept[torch.from_numpy(rng.permutation(kept.numel()))]
        out = {}
        for name, site_rows in rows.items():
            x = site_rows.index_select(0, order)
            if not _finite(x):  # one check per block of windows, not per training step
                model = self.lm.identity
                raise UserError(
                    f"Model {model['name']} ({model['dtype']}) produced non-finite activations (NaN or inf) at site "
                    f"{name} on block {block} of rank {rank}'s windows of data source '{self.data.source}'. "
                    "Nothing was trained on them. This is usually the model overflowing its dtype: use "
                    "model.dtype=float32 (or bfloat16; float16 overflows easily)."
                )
            out[name] = x.float()
        return out

    def _blocks(self, start_block: int, rank: int, world: int) -> Iterator[dict[str, torch.Tensor]]:
        """Rank `rank` of `world`'s shuffled blocks of rows, from block `start_block` on."""
        windows = self._rank_windows(rank, world)
        for _ in islice(windows, start_block * self.windows_per_block):
            pass
        block = start_block
        while chunk := list(islice(windows, self.windows_per_block)):
            yield self._block_rows(chunk, block, rank)
            block += 1

    def batches(self, position: int) -> Iterator[dict[str, torch.Tensor]]:
        # Rows per block vary (special tokens are dropped), so the block to restart from is
        # found by recounting block sizes; only that block's activations are recomputed.
        local_start = position // self.dist.world_size
        start_block, skip = self._locate(local_start)
        self._position = position
        size = self.local_batch
        head: dict[str, torch.Tensor] = {}  # the rows short of a batch that the last block left
        for rows in self._blocks(start_block, self.dist.rank, self.dist.world_size):
            if skip:
                rows = {k: v[skip:] for k, v in rows.items()}
                skip = 0
            if _rows(head):  # a batch straddling blocks: the only rows copied
                need = size - _rows(head)
                if _rows(rows) < need:
                    head = {k: torch.cat([head[k], v]) for k, v in rows.items()}
                    continue
                self._position += size * self.dist.world_size
                yield {k: torch.cat([head[k], v[:need]]) for k, v in rows.items()}
                rows = {k: v[need:] for k, v in rows.items()}
            start = 0
            while _rows(rows) - start >= size:
                self._position += size * self.dist.world_size
                yield {k: v[start : start + size] for k, v in rows.items()}
                start += size
            head = {k: v[start:] for k, v in rows.items()}

    def _locate(self, local_rows: int) -> tuple[int, int]:
        """(block, rows to skip in it) for a rank-local row offset, counting kept tokens per block."""
        if local_rows == 0:
            return 0, 0
        windows, block = self._rank_windows(self.dist.rank, self.dist.world_size), 0
        while chunk := list(islice(windows, self.windows_per_block)):
            tokens = torch.stack(chunk).flatten()
            size = int(keep_mask(tokens, self._tokens).sum())
            if local_rows < size:
                return block, local_rows
            local_rows -= size
            block += 1
        raise RuntimeError("unreachable: the window stream is endless")

    @property
    def position(self) -> int:
        return self._position

    def nonfinite_error(self, site: str, start: int, stop: int, *, sample: bool = False) -> UserError | None:
        return None  # every block is checked when it is computed (`_block_rows`)

    def sample(self, n_tokens: int) -> dict[str, torch.Tensor]:
        """n rows computed as a single-process run would (the same on every rank, whatever the
        world size: any rank may initialise an SAE, parallel.saes)."""
        rows: dict[str, list[torch.Tensor]] = {s: [] for s in self.sites}
        got = 0
        for block_rows in self._blocks(0, 0, 1):
            for k, v in block_rows.items():
                rows[k].append(v)
            got += len(next(iter(block_rows.values())))
            if got >= n_tokens:
                break
        return {k: torch.cat(v)[:n_tokens] for k, v in rows.items()}
