"""The checkpoints of one eval call: found below a directory, loaded, checked against the model.

A sweep is any directory holding several checkpoint directories (a trainer's `out_dir`, whose
SAE directories are named after their tags). All of them must come from one model; the
model, data and text settings they recorded become the eval's defaults.
"""

from __future__ import annotations

from sae_train.errors import UserError
from sae_train.lm import LanguageModel, Site
from sae_train.sae import SAE
from sae_train.sae.checkpoint import CFG_FILE, Checkpoint

__all__ = ["cross_layer_pairs", "group_by_site"]


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
    for c in checkpoints:
        cfg = c.sae.cfg
        source = lm.checked_site(c.site, "d_in", cfg.d_in, f"Checkpoint {c.path}")
        target = lm.checked_site(cfg.target, "d_out", cfg.d_out, f"Checkpoint {c.path}") if cfg.is_transcoder else None
        key = (source.name, cfg.target)
        spliced, read = (source, None) if target is None else (target, source)
        groups.setdefault(key, (spliced, read, {}))[2][c.name] = c.sae.to(lm.device).eval()
    return list(groups.values())
