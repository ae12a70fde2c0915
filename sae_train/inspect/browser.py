"""The static feature browser: `index.html` plus its data as JavaScript files, readable from disk.

Chromium blocks fetch() of file:// URLs but runs <script src> from them, so the data ships as
scripts that hand it to the page: `saes.js` (the dictionaries), per dictionary
`<name>/browser/index.js` (one line per latent: id, frequency, max, top-example tokens,
promoted tokens; for the list and the search) and `<name>/browser/shard-<n>.js` (the full
records of SHARD latents, loaded when one of them is opened). No network, no CDN: the page's
JavaScript and CSS are inline (browser.html).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

INDEX = "index.html"
LISTING = "saes.js"
SHARD = 128
"""Latents per shard script."""
TEMPLATE = Path(__file__).with_name("browser.html")


def _script(call: str, *args: Any) -> str:
    return f"{call}({', '.join(json.dumps(a, ensure_ascii=False, separators=(',', ':')) for a in args)});\n"


def _summary(record: dict) -> list:
    """A latent's line in the index: [id, frequency, act_max, top-example tokens, promoted tokens]."""
    tokens: list[str] = []
    for group in record["examples_quantiles"][:1]:
        for ex in group["examples"]:
            token = ex["tokens"][ex["train_token_ind"]]
            if token not in tokens:
                tokens.append(token)
    return [
        record["index"],
        record["activation_frequency"],
        round(record["act_max"], 4),
        tokens[:8],
        record["top_logits"][:5],
    ]


def _shown(record: dict) -> dict:
    """A record without what the page does not show (token ids, percentiles): a smaller download."""
    groups = [
        {**g, "examples": [{k: v for k, v in ex.items() if k != "token_ids"} for ex in g["examples"]]}
        for g in record["examples_quantiles"]
    ]
    hidden = ("top_logits_ids", "bottom_logits_ids", "quantile_values")
    return {**{k: v for k, v in record.items() if k not in hidden}, "examples_quantiles": groups}


def write_sae(root: Path, name: str, meta: dict, records: list[dict]) -> None:
    """The browser data of one dictionary under root/<name>/browser/."""
    directory = root / name / "browser"
    directory.mkdir(parents=True, exist_ok=True)
    index = {"meta": meta, "shard": SHARD, "latents": [_summary(r) for r in records]}
    (directory / "index.js").write_text(_script("saeIndexLoaded", name, index), encoding="utf-8")
    for start in range(0, len(records), SHARD):
        shown = [_shown(r) for r in records[start : start + SHARD]]
        (directory / f"shard-{start // SHARD:05d}.js").write_text(
            _script("saeShardLoaded", name, start, shown), encoding="utf-8"
        )


def write_index(root: Path, saes: dict[str, dict[str, Any]]) -> None:
    """root/index.html and root/saes.js listing the dictionaries (name -> {dir, site, d_sae, ...})."""
    listing = [{"name": name, **info} for name, info in saes.items()]
    (root / LISTING).write_text(_script("saesLoaded", listing), encoding="utf-8")
    (root / INDEX).write_text(TEMPLATE.read_text(encoding="utf-8"), encoding="utf-8")
