"""Feature records: one JSON object per latent in the documented schema (feature.schema.json),
built from a finished pass's `LatentStats` and the logit lens.

The field names follow circuit-tracer's feature pages and Neuronpedia (`examples_quantiles`
with `tokens`/`tokens_acts_list`, `top_logits`, `bottom_logits`, `act_min`/`act_max`,
`quantile_values`, `histogram`, `activation_frequency`); the extra fields (token ids, global
rows, histogram edges, logit values) make a record checkable against the store it came from.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sae_train.inspect.stream import Examples, LatentStats

SCHEMA_FILE = Path(__file__).with_name("feature.schema.json")
TOP_NAME = "Top activations"


def schema() -> dict:
    """The JSON Schema every feature record satisfies."""
    return json.loads(SCHEMA_FILE.read_text())


@dataclass
class LogitTokens:
    """The n tokens each latent promotes most (top) and least (bottom), with their logits."""

    top_ids: np.ndarray
    top_values: np.ndarray
    bottom_ids: np.ndarray
    bottom_values: np.ndarray


@torch.no_grad()
def logit_tokens(
    lens: Callable[[torch.Tensor], torch.Tensor], W_dec: torch.Tensor, n: int, chunk: int = 256
) -> LogitTokens:
    """Top and bottom n logits of every decoder row, `chunk` rows at a time (bounded memory)."""
    parts: list[list[np.ndarray]] = [[], [], [], []]
    for start in range(0, W_dec.shape[0], chunk):
        logits = lens(W_dec[start : start + chunk])
        top, bottom = logits.topk(n, dim=1), logits.topk(n, dim=1, largest=False)
        for part, value in zip(parts, (top.indices, top.values, bottom.indices, bottom.values)):
            part.append(value.cpu().numpy())
    return LogitTokens(*(np.concatenate(p) for p in parts))


def _percentiles(counts: np.ndarray, width: float, act_max: float) -> list[float]:
    """Activations at the 1st..100th percentile of a latent's firings, interpolated in its histogram."""
    total = counts.sum()
    cdf = np.cumsum(counts) / total
    wanted = np.arange(1, 101) / 100
    b = np.searchsorted(cdf, wanted - 1e-12)
    b = np.minimum(b, len(counts) - 1)
    before = np.where(b > 0, cdf[np.maximum(b - 1, 0)], 0.0)
    share = counts[b] / total
    values = (b + np.where(share > 0, (wanted - before) / np.maximum(share, 1e-300), 1.0)) * width
    values = np.minimum(values, act_max)
    values[-1] = act_max
    return np.round(values, 5).tolist()


class RecordBuilder:
    """Turns the stats of one dictionary into records; `strings` maps token ids to text."""

    def __init__(
        self,
        stats: LatentStats,
        strings: Callable[[np.ndarray], list[str]],
        logits: LogitTokens | None,
        *,
        n_quantiles: int,
        quantile_examples: int,
    ) -> None:
        self.stats, self.strings, self.logits = stats, strings, logits
        self.n_quantiles, self.quantile_examples = n_quantiles, quantile_examples
        self.count = stats.count.cpu().numpy()
        self.act_max = stats.act_max.cpu().numpy()
        self.act_min = stats.act_min.cpu().numpy()
        self.histogram = stats.histogram.cpu().numpy()
        self.width = stats.bin_width.cpu().numpy()
        self.top = _numpy(stats.top)
        self.sample = _numpy(stats.sample)

    def __iter__(self) -> Iterator[dict]:
        return (self.record(i) for i in range(self.stats.d_sae))

    def _example(self, part: dict[str, np.ndarray], latent: int, slot: int) -> dict:
        tokens = part["tokens"][latent, slot]
        inside = tokens >= 0
        ids = tokens[inside]
        return {
            "tokens": self.strings(ids),
            "token_ids": ids.tolist(),
            "tokens_acts_list": np.round(part["acts"][latent, slot][inside].astype(np.float64), 4).tolist(),
            "train_token_ind": int(inside[: self.stats.before].sum()),
            "activation": float(part["value"][latent, slot]),
            "row": int(part["row"][latent, slot]),
        }

    def _quantiles(self, latent: int) -> list[dict]:
        values = self.sample["value"][latent]
        slots = np.flatnonzero(values > -np.inf)
        slots = slots[np.argsort(values[slots], kind="stable")]
        bands = np.array_split(slots, self.n_quantiles) if len(slots) else []
        groups = []
        for b in reversed(range(len(bands))):
            band = bands[b]
            if not len(band):
                continue
            picks = band[np.unique(np.linspace(0, len(band) - 1, self.quantile_examples).round().astype(int))]
            low, high = 100 * b // self.n_quantiles, 100 * (b + 1) // self.n_quantiles
            groups.append(
                {
                    "quantile_name": f"Quantile {low}-{high}%",
                    "examples": [self._example(self.sample, latent, int(s)) for s in picks[::-1]],
                }
            )
        return groups

    def record(self, latent: int) -> dict:
        count = int(self.count[latent])
        fired = count > 0
        top_slots = np.flatnonzero(self.top["value"][latent] > -np.inf)
        counts = self.histogram[latent]
        used = int(np.flatnonzero(counts).max()) + 1 if fired else 0
        width = float(self.width[latent])
        act_max = float(self.act_max[latent]) if fired else 0.0
        record: dict = {
            "index": latent,
            "activation_frequency": count / max(self.stats.n_tokens, 1),
            "n_firings": count,
            "act_min": float(self.act_min[latent]) if fired else 0.0,
            "act_max": act_max,
            "histogram": counts[:used].tolist(),
            "histogram_edges": [i * width for i in range(used + 1)] if fired else [],
            "quantile_values": _percentiles(counts[:used], width, act_max) if fired else [],
            "examples_quantiles": (
                [{"quantile_name": TOP_NAME, "examples": [self._example(self.top, latent, int(s)) for s in top_slots]}]
                if fired
                else []
            )
            + self._quantiles(latent),
        }
        lg = self.logits
        for side in ("top", "bottom"):
            ids = getattr(lg, f"{side}_ids")[latent] if lg is not None else np.zeros(0, dtype=np.int64)
            record[f"{side}_logits"] = self.strings(ids)
            record[f"{side}_logits_ids"] = ids.tolist()
            values = getattr(lg, f"{side}_values")[latent] if lg is not None else np.zeros(0)
            record[f"{side}_logits_values"] = np.round(values.astype(np.float64), 4).tolist()
        return record


def _numpy(examples: Examples) -> dict[str, np.ndarray]:
    return {
        "value": examples.value.cpu().numpy(),
        "row": examples.row.cpu().numpy(),
        "tokens": examples.tokens.cpu().numpy(),
        "acts": examples.acts.cpu().numpy(),
    }


def token_strings(tokenizer, ids: np.ndarray) -> Callable[[np.ndarray], list[str]]:
    """A lookup from token ids to their text, decoding each id among `ids` once."""
    unique = np.unique(ids[ids >= 0])
    table = np.empty(int(unique.max()) + 1 if len(unique) else 0, dtype=object)
    for i in unique.tolist():
        table[i] = tokenizer.decode([i], clean_up_tokenization_spaces=False)

    def strings(token_ids: np.ndarray) -> list[str]:
        return table[token_ids].tolist() if len(token_ids) else []

    return strings
