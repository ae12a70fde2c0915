"""Feature examples of a transcoder set in the layout circuit-tracer's graph viewer reads.

circuit-tracer 0.5.0's viewer (frontend/assets/feature_examples/init-feature-examples.js)
loads a graph node's feature page from `<scan>/<feature>.json` when the graph's `scan` starts
with `./`, where `feature` is the Cantor pair of (layer, latent) (frontend/graph_models.py);
any other scan is fetched from the Hugging Face hub or a CDN. Its local server serves
`/data/...` from `--graph_file_dir`, so features written to `<graph_file_dir>/features/<name>/`
are found offline by graphs whose scan is `./data/features/<name>` — the `scan` key of the
transcoder set's config.yaml, which circuit-tracer copies into every graph it attributes.

A page holds circuit-tracer's `feature_models.Model` fields. Its histogram is drawn over
[act_min, act_max]; ours starts at 0, so the page's act_min is 0 (that is also where its
colour scale starts).
"""

from __future__ import annotations

import json
from pathlib import Path

GRAPH_DIR = "circuit_tracer"
"""The folder of inspect's out_dir to pass as circuit-tracer's --graph_file_dir."""


def cantor(layer: int, index: int) -> int:
    """circuit-tracer's feature id of latent `index` at `layer` (frontend/graph_models.py)."""
    return (layer + index) * (layer + index + 1) // 2 + index


def page(record: dict, transcoder_id: str) -> dict:
    """circuit-tracer's feature page (feature_models.Model) for one of our records."""
    seen: set[int] = set()
    groups = []
    for group in record["examples_quantiles"]:
        examples = []
        for ex in group["examples"]:
            examples.append(
                {
                    "tokens": ex["tokens"],
                    "tokens_acts_list": ex["tokens_acts_list"],
                    "train_token_ind": ex["train_token_ind"],
                    "is_repeated_datapoint": ex["row"] in seen,
                }
            )
            seen.add(ex["row"])
        groups.append({"quantile_name": group["quantile_name"], "examples": examples})
    return {
        "transcoder_id": transcoder_id,
        "index": record["index"],
        "examples_quantiles": groups,
        "top_logits": record["top_logits"],
        "bottom_logits": record["bottom_logits"],
        "act_min": 0.0,
        "act_max": record["act_max"],
        "quantile_values": record["quantile_values"],
        "histogram": [float(c) for c in record["histogram"]],
        "activation_frequency": record["activation_frequency"],
    }


def write_features(records_by_layer: dict[int, list[dict]], graph_dir: Path, name: str) -> str:
    """Write every layer's records as `<graph_dir>/features/<name>/<cantor(layer, i)>.json` and
    return the scan that finds them: `./data/features/<name>`."""
    target = graph_dir / "features" / name
    target.mkdir(parents=True, exist_ok=True)
    for layer, records in sorted(records_by_layer.items()):
        for record in records:
            content = page(record, f"{name}/layer_{layer}")
            (target / f"{cantor(layer, record['index'])}.json").write_text(json.dumps(content, ensure_ascii=False))
    return f"./data/features/{name}"
