"""The checkpoints of one eval call: found below a directory, loaded, checked against the model.

A sweep is any directory holding several checkpoint directories (a trainer's `out_dir`, whose
SAE directories are named after their tags). All of them must come from one model; the
model, data and text settings they recorded become the eval's defaults.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sae_train.errors import UserError
from sae_train.lm import LanguageModel, Site
from sae_train.sae import SAE, load_sae, load_sae_cfg
from sae_train.sae.checkpoint import CFG_FILE, find_checkpoints


@dataclass
class Checkpoint:
    name: str
    """Label in the report: the path below the sweep directory (the trainer's tag), or for a
    single checkpoint its recorded tag."""
    path: Path
    meta: dict[str, Any]
    """The whole cfg.json: SAE config plus the trainer's metadata (site, source, provenance...)."""
    sae: SAE

    @property
    def site(self) -> str:
        return self.meta["site"]


def load_checkpoints(path: str) -> list[Checkpoint]:
    """Load every checkpoint at or below `path` (a missing or corrupt file is a UserError)."""
    root, directories = find_checkpoints(path)
    checkpoints = []
    for directory in directories:
        meta = load_sae_cfg(directory)
        sae = load_sae(directory)
        if not isinstance(meta.get("site"), str):
            raise UserError(
                f"Checkpoint {directory}: {CFG_FILE} records no activation site ('site'), so it cannot be "
                "spliced into the model. Checkpoints written by sae-train train always have one."
            )
        name = directory.relative_to(root).as_posix() if directory != root else str(meta.get("tag") or root.name)
        checkpoints.append(Checkpoint(name=name, path=directory, meta=meta, sae=sae))
    return checkpoints


def _model_key(model: dict[str, Any] | None) -> dict[str, Any] | None:
    """The parts of a recorded model identity that name the weights (dtype does not)."""
    return None if model is None else {k: model.get(k) for k in ("name", "hub_id", "revision")}


_DISAGREEMENT = {
    "model": ("different models", "Evaluate checkpoints of different models in separate calls."),
    "data": (
        "different data sources",
        "Evaluate them in separate calls, or pass data=... to evaluate all on one source.",
    ),
    "text": ("different text settings", "Evaluate them in separate calls."),
}


def recorded(checkpoints: list[Checkpoint], key: str) -> dict[str, Any] | None:
    """The `source[key]` ("model", "data" or "text") all checkpoints recorded; None when none did.

    Checkpoints that disagree cannot be evaluated against one model or on one text: an error.
    """
    values = {c.name: (c.meta.get("source") or {}).get(key) for c in checkpoints}
    compare = _model_key if key == "model" else (lambda v: v)
    distinct = {json.dumps(compare(v), sort_keys=True) for v in values.values()}
    if len(distinct) > 1:
        listing = "; ".join(f"{name}: {json.dumps(compare(v), sort_keys=True)}" for name, v in values.items())
        what, fix = _DISAGREEMENT[key]
        raise UserError(f"The checkpoints were trained on {what} ({listing}). {fix}")
    return next(iter(values.values()))


def cross_layer_pairs(c: Checkpoint, lm: LanguageModel) -> list[tuple[Site, Site]]:
    """The (source, target) sites of each layer of cross-layer transcoder checkpoint `c`
    (cfg.json's `sites` and `targets`), checked against the model like `group_by_site` does."""
    sites, targets = c.meta.get("sites"), c.meta.get("targets")
    if (
        not isinstance(sites, list)
        or not isinstance(targets, list)
        or not len(sites) == len(targets) == c.sae.cfg.n_layers
    ):
        raise UserError(
            f"Checkpoint {c.path}: a cross-layer transcoder's {CFG_FILE} must list its {c.sae.cfg.n_layers} source "
            "'sites' and 'targets'; sae-train train writes both. The file is incomplete."
        )
    model = lm.identity.get("name", "")
    pairs = []
    for source, target in zip(sites, targets):
        resolved = []
        for name, dim in ((source, "d_in"), (target, "d_out")):
            try:
                site = lm.site(name)
            except UserError as err:
                raise UserError(f"Checkpoint {c.path} uses site '{name}', which model '{model}' lacks. {err}") from err
            width = lm.site_width(site)
            if width != getattr(c.sae.cfg, dim):
                raise UserError(
                    f"Checkpoint {c.path} has {dim}={getattr(c.sae.cfg, dim)}, but model '{model}' has width "
                    f"{width} at '{name}'. Pass the model it was trained on (model.name=...)."
                )
            resolved.append(site)
        pairs.append((resolved[0], resolved[1]))
    return pairs


def group_by_site(checkpoints: list[Checkpoint], lm: LanguageModel) -> list[tuple[Site, Site | None, dict[str, SAE]]]:
    """(site spliced, site read or None, {name: SAE on lm's device}) per group, after checking
    that each SAE fits its sites. SAEs group by their site (read = spliced: None); transcoders
    by (source, target): they read the source and are spliced at the target."""
    groups: dict[tuple[str, str], tuple[Site, Site | None, dict[str, SAE]]] = {}
    widths: dict[str, int] = {}
    model = lm.identity.get("name", "")

    def resolve(c: Checkpoint, name: str, dim: str, what: str) -> Site:
        width = getattr(c.sae.cfg, dim)
        try:
            site = lm.site(name)
        except UserError as err:
            raise UserError(f"Checkpoint {c.path} {what} site '{name}', which model '{model}' lacks. {err}") from err
        if site.name not in widths:
            widths[site.name] = lm.site_width(site)
        if width != widths[site.name]:
            raise UserError(
                f"Checkpoint {c.path} has {dim}={width} for the site it {what}, '{site.name}', but model '{model}' has "
                f"width {widths[site.name]} there. The SAE was trained on another model or site; pass the "
                "model it was trained on (model.name=...) or the right checkpoint."
            )
        return site

    for c in checkpoints:
        cfg = c.sae.cfg
        source = resolve(c, c.site, "d_in", "reads")
        target = resolve(c, cfg.target, "d_out", "writes") if cfg.is_transcoder else None
        key = (source.name, cfg.target)
        spliced, read = (source, None) if target is None else (target, source)
        groups.setdefault(key, (spliced, read, {}))[2][c.name] = c.sae.to(lm.device).eval()
    return list(groups.values())
