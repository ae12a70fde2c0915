"""Per-latent statistics gathered in one streaming pass, in memory bounded by the dictionary's
width (never by the number of tokens).

For every latent: firing count, largest and smallest positive activation, an exact
equal-width histogram, its `top_k` largest activations and a uniform sample of its firings
(Algorithm R, for the quantile bands), each example with its context: the tokens around it in
its window and the latent's activation on each. Chunks hold whole windows, so an example's
context is read from the chunk it fires in, when it is kept.

Everything is vectorised over the chunk's nonzero entries (n_rows x L0 of them): no Python loop
per latent or per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Chunk:
    """Consecutive rows holding whole windows: what one `LatentStats.update` sees."""

    tokens: Tensor
    """[n] token ids (int64)."""
    window: Tensor
    """[n] window id: rows with the same id belong to one window (in row order)."""
    rows: Tensor
    """[n] global row ids (the store's row index over its shards; live: window * context + position)."""


class Examples:
    """`slots` examples per latent: activation, global row, context tokens (-1 = outside the
    window) and the latent's activation on each context token; the example's own token sits at
    index `before` of its context."""

    def __init__(self, d_sae: int, slots: int, context: int, device: torch.device) -> None:
        self.value = torch.full((d_sae, slots), float("-inf"), device=device)
        self.row = torch.full((d_sae, slots), -1, dtype=torch.long, device=device)
        self.tokens = torch.full((d_sae, slots, context), -1, dtype=torch.int32, device=device)
        self.acts = torch.zeros(d_sae, slots, context, device=device)

    def put(self, latents: Tensor, slots: Tensor, value: Tensor, row: Tensor, tokens: Tensor, acts: Tensor) -> None:
        at = latents * self.value.shape[1] + slots  # flat (latent, slot) index: one-index writes are faster
        self.value.view(-1)[at] = value
        self.row.view(-1)[at] = row
        self.tokens.view(-1, self.tokens.shape[2])[at] = tokens
        self.acts.view(-1, self.acts.shape[2])[at] = acts


def group_rank(sorted_keys: Tensor) -> Tensor:
    """Position of each entry within its run of equal keys (keys sorted ascending)."""
    return torch.arange(sorted_keys.numel(), device=sorted_keys.device) - torch.searchsorted(sorted_keys, sorted_keys)


class LatentStats:
    """The streaming statistics of one dictionary's latents (see the module docstring)."""

    def __init__(
        self,
        d_sae: int,
        *,
        top_k: int,
        sample_size: int,
        histogram_bins: int,
        before: int,
        after: int,
        seed: int,
        device: torch.device,
    ) -> None:
        self.d_sae, self.top_k, self.sample_size, self.bins = d_sae, top_k, sample_size, histogram_bins
        self.before, self.after = before, after
        self.n_tokens = 0
        self.count = torch.zeros(d_sae, dtype=torch.long, device=device)
        self.act_max = torch.zeros(d_sae, device=device)
        self.act_min = torch.full((d_sae,), float("inf"), device=device)
        self.histogram = torch.zeros(d_sae, histogram_bins, dtype=torch.long, device=device)
        self.bin_width = torch.zeros(d_sae, dtype=torch.float64, device=device)
        """Per latent, a power of two (0 until it first fires): bin i is [i w, (i+1) w)."""
        context = before + 1 + after
        self.top = Examples(d_sae, top_k, context, device)
        self.sample = Examples(d_sae, sample_size, context, device)
        self.generator = torch.Generator().manual_seed(seed)
        self._offsets = torch.arange(-before, after + 1, device=device)

    @torch.no_grad()
    def update(self, latents: Tensor, chunk: Chunk) -> None:
        """Add a chunk's dense latents [n, d_sae] (>= 0)."""
        flat = latents.view(-1)
        at = (flat > 0).nonzero().squeeze(1)  # row-major: by row, then latent
        values = flat[at]
        rows = at // self.d_sae
        ids = at - rows * self.d_sae
        self.n_tokens += latents.shape[0]
        self.count += torch.bincount(ids, minlength=self.d_sae)
        self.act_max.scatter_reduce_(0, ids, values, "amax")
        self.act_min.scatter_reduce_(0, ids, values, "amin")
        self._update_histogram(ids, values)
        self._update_top(latents, chunk, rows, ids, values)
        self._update_sample(latents, chunk, rows, ids, values)

    def _context(self, latents: Tensor, chunk: Chunk, rows: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
        """(tokens [m, C] int32, activations [m, C]) around chunk rows `rows` for latents `ids`."""
        around = rows[:, None] + self._offsets
        inside = (around >= 0) & (around < latents.shape[0])
        around = around.clamp(0, latents.shape[0] - 1)
        inside &= chunk.window[around] == chunk.window[rows][:, None]
        tokens = torch.where(inside, chunk.tokens[around], -1).to(torch.int32)
        acts = torch.where(inside, latents.view(-1)[around * self.d_sae + ids[:, None]], 0.0)
        return tokens, acts

    def _update_histogram(self, ids: Tensor, values: Tensor) -> None:
        """Bins of width w (a power of two per latent) covering [0, bins * w); a value past the
        range doubles w as often as needed, merging pairs of bins, so counts stay exact."""
        if ids.numel() == 0:
            return
        chunk_max = torch.zeros(self.d_sae, dtype=torch.float64, device=ids.device)
        chunk_max.scatter_reduce_(0, ids, values.double(), "amax")
        # frexp: x = m 2^e with m in [0.5, 1), so x < 2^e.
        new = (self.bin_width == 0) & (chunk_max > 0)
        self.bin_width[new] = torch.ldexp(torch.ones_like(chunk_max[new]), torch.frexp(chunk_max[new] / self.bins)[1])
        grow = chunk_max >= self.bins * self.bin_width
        grow &= ~new
        if grow.any():
            latent_ids = grow.nonzero().squeeze(1)
            doublings = torch.frexp(chunk_max[latent_ids] / (self.bins * self.bin_width[latent_ids]))[1]
            target = torch.arange(self.bins, device=ids.device)[None, :] >> doublings[:, None].long()
            merged = torch.zeros_like(self.histogram[latent_ids]).scatter_add_(1, target, self.histogram[latent_ids])
            self.histogram[latent_ids] = merged
            self.bin_width[latent_ids] = torch.ldexp(self.bin_width[latent_ids], doublings)
        bins = (values.double() / self.bin_width[ids]).long().clamp_(max=self.bins - 1)
        self.histogram.view(-1).index_add_(0, ids * self.bins + bins, torch.ones_like(bins))

    def _update_top(self, latents: Tensor, chunk: Chunk, rows: Tensor, ids: Tensor, values: Tensor) -> None:
        """Merge the chunk's entries into each latent's top_k, ties going to the earlier row."""
        k, top = self.top_k, self.top
        candidate = values > top.value[ids, -1]  # beats the current k-th best (-inf while not full)
        if not candidate.any():
            return
        c_rows, c_ids, c_values = rows[candidate], ids[candidate], values[candidate]
        touched = torch.unique(c_ids)
        held = top.value[touched] > float("-inf")
        held_ids = touched[:, None].expand(-1, k)[held]
        held_slot = torch.arange(k, device=ids.device)[None, :].expand(len(touched), -1)[held]
        # Held entries first (earlier rows, already ordered), then the chunk's in row order;
        # stable sorts by value, then by latent, keep that order among equal values.
        all_ids = torch.cat([held_ids, c_ids])
        all_values = torch.cat([top.value[held_ids, held_slot], c_values])
        source = torch.cat([-1 - held_slot, torch.arange(len(c_ids), device=ids.device)])
        order = torch.sort(all_values, descending=True, stable=True).indices
        order = order[torch.sort(all_ids[order], stable=True).indices]
        rank = group_rank(all_ids[order])
        keep = order[rank < k]
        slot = rank[rank < k]
        kept_ids, kept_source = all_ids[keep], source[keep]

        old = kept_source < 0
        old_slot = -1 - kept_source[old]
        o_ids = kept_ids[old]
        saved = (top.value[o_ids, old_slot], top.row[o_ids, old_slot], top.tokens[o_ids, old_slot])
        saved_acts = top.acts[o_ids, old_slot]
        top.value[touched] = float("-inf")
        top.row[touched] = -1
        top.put(o_ids, slot[old], *saved, saved_acts)
        n_ids, n_src = kept_ids[~old], kept_source[~old]
        tokens, acts = self._context(latents, chunk, c_rows[n_src], n_ids)
        top.put(n_ids, slot[~old], c_values[n_src], chunk.rows[c_rows[n_src]], tokens, acts)

    def _update_sample(self, latents: Tensor, chunk: Chunk, rows: Tensor, ids: Tensor, values: Tensor) -> None:
        """Algorithm R per latent: its i-th firing (from 0) fills slot i while i < size, then
        replaces a uniformly drawn slot j <= i if j < size; a uniform sample of all its firings."""
        size = self.sample_size
        order = torch.sort(ids, stable=True).indices  # per latent, rows stay ascending
        s_ids = ids[order]
        ordinal = self.count[s_ids] - torch.bincount(ids, minlength=self.d_sae)[s_ids] + group_rank(s_ids)
        draw = torch.rand(len(order), generator=self.generator, dtype=torch.float64).to(ids.device)
        slot = torch.where(ordinal < size, ordinal, (draw * (ordinal + 1)).long())
        taken = slot < size
        order, s_ids, slot = order[taken], s_ids[taken], slot[taken]
        # Several firings of one chunk may draw the same slot: the last one (in stream order) wins.
        key = s_ids * size + slot
        by_key = torch.sort(key, stable=True).indices
        last = torch.ones_like(by_key, dtype=torch.bool)
        last[:-1] = key[by_key][1:] != key[by_key][:-1]
        winners = by_key[last]
        entry, w_ids, w_slot = order[winners], s_ids[winners], slot[winners]
        tokens, acts = self._context(latents, chunk, rows[entry], w_ids)
        self.sample.put(w_ids, w_slot, values[entry], chunk.rows[rows[entry]], tokens, acts)
