"""The cache stage: run a language model over text and write site activations to a store.

Shard `i` always holds windows [i*W, (i+1)*W) of the packed token stream (W windows per
shard), whoever writes it. That makes the store independent of how the work was split or
interrupted: rank r of N writes the shards with i % N == r, a rerun skips the shards the
manifest already holds, and the result is byte-identical to one uninterrupted run.

The model computes shard i+1 while a writer thread checksums, fsyncs and publishes shard i
(one shard in flight at most); the writes themselves, and so the crash-safety contract, are
the store writer's, unchanged. On a GPU the model runs on this process's own device (the
local rank's under torchrun or srun) and its activations reach the host by asynchronous
copies into pinned memory.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from itertools import islice

import torch
from tqdm import tqdm

from sae_train.data import DataConfig, TextConfig, TokenSpec, iter_documents, iter_windows
from sae_train.data.packing import keep_mask
from sae_train.distenv import store_writers
from sae_train.errors import UserError
from sae_train.lm import LanguageModel, ModelConfig, Site
from sae_train.lm.sites import expand_sites, model_site_names
from sae_train.store import StoreWriter
from sae_train.store.manifest import DTYPES, RESERVED

log = logging.getLogger(__name__)

STORE_DTYPES = tuple(DTYPES)
DEFAULT_SHARD_TOKENS = 65_536
SHARD_BYTES = 1 << 30
"""Memory bound of one shard's activations when tokens_per_shard is automatic (0)."""


def windows_per_shard(cfg: CacheConfig, widths: dict[str, int], bytes_per_value: int) -> int:
    """Windows per shard: cfg.tokens_per_shard's, or (0) the automatic size (see CacheConfig)."""
    tokens = cfg.tokens_per_shard or min(DEFAULT_SHARD_TOKENS, SHARD_BYTES // (bytes_per_value * sum(widths.values())))
    return max(1, tokens // cfg.text.context_size)


@dataclass
class CacheConfig:
    """`sae-train cache`: which activations to compute and where to store them."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    text: TextConfig = field(default_factory=TextConfig)
    """How the text becomes windows (text.context_size, text.prepend_bos, text.exclude_special_tokens)."""
    sites: list[str] = field(default_factory=lambda: ["blocks.8.hook_resid_post"])
    """Activation sites to record in one pass (TransformerLens names or module paths);
    `blocks.*.KIND` = that site at every layer (a transcoder set: blocks.*.mlp.hook_in and
    blocks.*.hook_mlp_out)."""
    n_tokens: int = 200_000
    """Tokens to run through the model (window count = n_tokens / text.context_size, rounded up).
    Raising it on a finished store extends the store."""
    out_dir: str = "runs/acts"
    tokens_per_shard: int = 0
    """Shard size in tokens, rounded down to whole windows: the unit of resume and shuffling.
    0 = 65,536, or fewer when the sites are many, so that one shard's activations stay within
    `SHARD_BYTES` in the model's dtype (the cache holds about two shards in memory at once):
    all 60 MLP sites of SmolLM2-135M in fp32 give 7,680 tokens."""
    batch_size: int = 8192
    """Tokens per forward pass (whole windows, at least one): the GPU's work per launch."""
    store_dtype: str = "bfloat16"
    """bfloat16 | float16 | float32. Halving the width halves disk and read bandwidth."""
    rank: int = -1
    """This process's rank; -1 = from the environment (torchrun RANK, Slurm array or srun)."""
    world_size: int = -1
    """Number of cooperating processes; -1 = from the environment (1 when unset)."""
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.sites:
            raise UserError("sites is empty; name at least one activation site, e.g. sites=[blocks.8.hook_resid_post].")
        if self.store_dtype not in STORE_DTYPES:
            raise UserError(f"store_dtype='{self.store_dtype}' must be one of {', '.join(STORE_DTYPES)}.")
        if self.n_tokens <= 0 or self.batch_size <= 0:
            raise UserError("n_tokens and batch_size must be positive.")
        if self.tokens_per_shard and self.tokens_per_shard < self.text.context_size:
            raise UserError(
                f"tokens_per_shard={self.tokens_per_shard} is smaller than one window (text.context_size="
                f"{self.text.context_size}); raise tokens_per_shard."
            )


@dataclass
class CacheSummary:
    out_dir: str
    n_tokens: int
    """Rows (token activations) in the whole store."""
    n_shards: int
    n_bytes: int
    written_tokens: int
    """Rows this process computed (0 when everything was already cached)."""
    seconds: float
    exhausted: bool
    """The corpus ended before n_tokens."""

    @property
    def tokens_per_second(self) -> float:
        return self.written_tokens / self.seconds if self.seconds > 0 else 0.0

    def table(self) -> str:
        lines = [
            f"store        {self.out_dir}",
            f"tokens       {self.n_tokens:,} in {self.n_shards} shards ({self.n_bytes / 2**20:,.1f} MiB)",
            f"this run     {self.written_tokens:,} tokens in {self.seconds:,.1f} s ({self.tokens_per_second:,.0f} tok/s)",
        ]
        if self.exhausted:
            lines.append("note         the corpus ran out before n_tokens; the store holds all of it")
        return "\n".join(lines)


def store_spec(cfg: CacheConfig, lm: LanguageModel, tokens: TokenSpec, windows_per_shard: int) -> dict:
    """Everything that determines the store's bytes; a resume with a different spec is refused."""
    return {
        "model": lm.identity,
        "data": cfg.data.describe(),
        "text": asdict(cfg.text),
        "tokens": {"bos": tokens.bos, "separator": tokens.separator, "special": list(tokens.special)},
        "windows_per_shard": windows_per_shard,
        "store_dtype": cfg.store_dtype,
    }


def check_space(cfg: CacheConfig, widths: dict[str, int], windows_left: list[int]) -> None:
    """Refuse a cache whose shards still to write (`windows_left`: each one's windows, every
    rank's, as ranks share the store's disk) cannot fit on out_dir's disk, before any forward
    pass: the writer stops cleanly on a full disk, but only after the forwards before it. Each
    token is counted as stored (activations, int32 token id and position); a window holds
    context_size tokens at most."""
    per_token = sum(widths.values()) * DTYPES[cfg.store_dtype].itemsize + 4 * len(RESERVED)  # RESERVED: int32
    tokens_left = sum(windows_left) * cfg.text.context_size
    need, free = tokens_left * per_token, shutil.disk_usage(cfg.out_dir).free
    if need <= free:
        return
    fits = cfg.n_tokens - tokens_left + free // per_token
    smaller = ", or store_dtype=bfloat16 (half of float32)" if cfg.store_dtype == "float32" else ""
    raise UserError(
        f"Caching the {tokens_left:,} tokens left ({len(widths)} site(s), {per_token:,} bytes a token in "
        f"{cfg.store_dtype}) needs about {need / 2**30:,.1f} GiB in {cfg.out_dir}, whose disk has "
        f"{free / 2**30:,.1f} GiB free; nothing has been computed. Free some space, or lower n_tokens (about "
        f"{max(fits, 0):,} fit), or cache fewer sites{smaller}, then rerun. (A corpus smaller than n_tokens "
        "makes a smaller store: then set n_tokens to its size.)"
    )


def _shard_rows(
    lm: LanguageModel, sites: list[Site], windows: torch.Tensor, batch_tokens: int, tokens: TokenSpec
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Activations of one shard's windows, one row per kept token."""
    rows = lm.capture_rows(sites, windows, batch_tokens)
    token_ids = windows.flatten()
    positions = torch.arange(windows.shape[1], dtype=torch.int32).repeat(len(windows))
    keep = keep_mask(token_ids, tokens)
    acts = {name: site_rows[keep] for name, site_rows in rows.items()}
    return acts, token_ids[keep].to(torch.int32), positions[keep]


def _shards(
    windows: Iterator[torch.Tensor], per_shard: int, n_windows: int
) -> Iterator[tuple[int, list[torch.Tensor]]]:
    """(shard index, its windows) for the first n_windows windows; the last shard may be short."""
    index = 0
    while index * per_shard < n_windows:
        chunk = list(islice(windows, min(per_shard, n_windows - index * per_shard)))
        if not chunk:
            return
        yield index, chunk
        index += 1


def run(cfg: CacheConfig, lm: LanguageModel | None = None) -> CacheSummary:
    """Cache activations as `cfg` says (resuming what a previous run left); returns a summary."""
    rank, world = store_writers(cfg.rank, cfg.world_size)
    lm = lm or LanguageModel.load(cfg.model)
    sites = [lm.site(name) for name in expand_sites(cfg.sites, model_site_names(lm.n_layers), where="the model")]
    tokens = TokenSpec.from_tokenizer(lm.tokenizer, cfg.text)
    windows = iter_windows(iter_documents(cfg.data), lm.tokenizer, cfg.text, tokens)
    first = next(windows, None)
    if first is None:
        raise UserError(
            f"The {cfg.data.split} split of data source '{cfg.data.source}' {cfg.data.path} holds no text "
            f"(or less than one window of {cfg.text.context_size} tokens). Check data.path/data.split, or lower "
            "text.context_size."
        )
    windows = _prepend(first, windows)

    n_windows = math.ceil(cfg.n_tokens / cfg.text.context_size)
    widths = {site.name: lm.site_width(site) for site in sites}
    per_shard = windows_per_shard(cfg, widths, lm.dtype.itemsize)
    spec = store_spec(cfg, lm, tokens, per_shard)
    with (
        StoreWriter(cfg.out_dir, spec, widths, DTYPES[cfg.store_dtype], rank=rank, world_size=world) as writer,
        ThreadPoolExecutor(1, thread_name_prefix="store-writer") as background,
    ):
        done = writer.done
        n_shards = math.ceil(n_windows / per_shard)
        check_space(cfg, widths, [min(per_shard, n_windows - i * per_shard) for i in range(n_shards) if i not in done])
        mine = [i for i in range(n_shards) if i % world == rank]
        todo = sum(1 for i in mine if i not in done)
        log.info("rank %d/%d: %d of my %d shards to compute", rank, world, todo, len(mine))

        written, seen_windows, started = 0, 0, time.perf_counter()
        bar = tqdm(
            total=todo * per_shard * cfg.text.context_size,
            unit="tok",
            unit_scale=True,
            disable=not cfg.progress or todo == 0,
            desc=f"cache r{rank}",
        )
        writing: Future | None = None  # the previous shard, being written while this one is computed
        for index, chunk in _shards(windows, per_shard, n_windows):
            seen_windows += len(chunk)
            if index % world != rank or index in done:
                continue
            acts, token_ids, positions = _shard_rows(lm, sites, torch.stack(chunk), cfg.batch_size, tokens)
            if writing is not None:
                writing.result()  # raises the write's error here
            writing = background.submit(writer.write_shard, index, acts, token_ids, positions)
            written += len(token_ids)
            bar.update(len(chunk) * cfg.text.context_size)
        if writing is not None:
            writing.result()
        bar.close()
        manifest = writer.close()
    return CacheSummary(
        out_dir=str(cfg.out_dir),
        n_tokens=manifest.n_tokens,
        n_shards=manifest.n_shards,
        n_bytes=manifest.n_bytes,
        written_tokens=written,
        seconds=time.perf_counter() - started,
        exhausted=seen_windows < n_windows,
    )


def _prepend(first: torch.Tensor, rest: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
    yield first
    yield from rest
