"""The eval stage: `sae-train eval checkpoint=... n_tokens=20000 out_dir=runs/eval`.

Loads every checkpoint found, the model and held-out text they recorded (unless overridden),
evaluates the SAEs site by site on the same windows, and writes eval.json, eval.md and
density.png to out_dir.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import asdict, replace
from typing import Any, Protocol

import torch
from tqdm import tqdm

from sae_train.data import DataConfig, TextConfig, TokenSpec
from sae_train.data.packing import keep_mask
from sae_train.errors import UserError
from sae_train.eval.checkpoints import cross_layer_pairs, group_by_site
from sae_train.eval.config import EvalConfig
from sae_train.eval.downstream import ReplacementEvaluator, SiteEvaluator, layer_forwards
from sae_train.eval.layers import CrossLayerEvaluator
from sae_train.eval.metrics import density_histogram
from sae_train.eval.report import EvalSummary, write_report
from sae_train.eval.tokens import held_out_windows
from sae_train.lm import LanguageModel, Site
from sae_train.lm.model import model_config
from sae_train.provenance import provenance
from sae_train.sae import SAE
from sae_train.sae.checkpoint import Checkpoint, load_checkpoints, recorded

log = logging.getLogger(__name__)


def data_config(recorded: dict[str, Any] | None, requested: DataConfig | None = None) -> DataConfig:
    """The eval split of `requested`, or (None) of the data source recorded."""
    if requested is not None:
        return replace(requested, split="eval")
    if not recorded:
        raise UserError("The checkpoints record no data source; pass data=... (e.g. data=python-stdlib).")
    fields = {f.name for f in dataclasses.fields(DataConfig)}
    return DataConfig(**{k: v for k, v in recorded.items() if k in fields and k != "split"}, split="eval")


def text_config(recorded: dict[str, Any] | None, context_size: int = 0) -> TextConfig:
    """The text settings recorded (TextConfig defaults where none are), with `context_size` if set."""
    fields = {f.name for f in dataclasses.fields(TextConfig)}
    resolved = TextConfig(**{k: v for k, v in (recorded or {}).items() if k in fields})
    return replace(resolved, context_size=context_size) if context_size else resolved


def _check_model(lm: LanguageModel, model: dict[str, Any] | None) -> None:
    if model and model.get("revision") != lm.identity.get("revision"):
        log.warning(
            "the checkpoints were trained on %s (revision %s); evaluating with %s (revision %s)",
            model.get("name"),
            model.get("revision"),
            lm.identity.get("name"),
            lm.identity.get("revision"),
        )


def _sae_entry(c: Checkpoint, site: str, metrics: dict[str, float], density: dict[str, list]) -> dict[str, Any]:
    cfg = c.sae.cfg
    return {
        "checkpoint": str(c.path),
        "site": site,
        **({"target": cfg.target, "d_out": cfg.d_out} if cfg.is_transcoder else {}),
        "architecture": cfg.architecture,
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "metrics": metrics,
        "density": density,
        "checkpoint_cfg": c.meta,
    }


def _replacement(groups: list[tuple[Site, Site | None, dict[str, SAE]]]) -> ReplacementEvaluator | None:
    """All transcoders spliced at once, when the checkpoints are a transcoder set: two or more
    transcoders, one per target site (a sweep at one target has no single replacement model)."""
    transcoders = [(source, target, saes) for target, source, saes in groups if source is not None]
    targets = [target.name for _, target, _ in transcoders]
    if len(transcoders) < 2 or any(len(saes) != 1 for _, _, saes in transcoders) or len(set(targets)) < len(targets):
        return None
    return ReplacementEvaluator([(s, t, *next(iter(saes.items()))) for s, t, saes in transcoders])


class BatchEvaluator(Protocol):
    def add_batch(self, lm: LanguageModel, input_ids: torch.Tensor, counted: torch.Tensor) -> None: ...


def evaluate_windows(
    lm: LanguageModel,
    windows: torch.Tensor,
    tokens: TokenSpec,
    evaluators: Sequence[BatchEvaluator],
    batch_size: int,
    progress: bool = False,
) -> tuple[int, int]:
    """Feed the held-out windows to every evaluator, batch_size windows at a time on lm's
    device, each with the mask of the positions counted; returns (tokens counted, predictions)."""
    counted_tokens = predictions = 0
    for batch in tqdm(windows.split(batch_size), desc="eval", unit="batch", disable=not progress):
        input_ids = batch.to(lm.device)
        counted = keep_mask(input_ids, tokens)
        for evaluator in evaluators:
            evaluator.add_batch(lm, input_ids, counted)
        counted_tokens += int(counted.sum())
        predictions += int(counted[:, 1:].sum())
    return counted_tokens, predictions


def run(cfg: EvalConfig, lm: LanguageModel | None = None) -> EvalSummary:
    """Evaluate the checkpoint(s) at cfg.checkpoint; writes the report to cfg.out_dir and returns
    it (the CLI prints `summary.table()`). Pass `lm` to reuse a loaded model."""
    checkpoints = load_checkpoints(cfg.checkpoint)
    recorded_model = recorded(checkpoints, "model")
    lm = lm or LanguageModel.load(model_config(recorded_model, cfg.model))
    _check_model(lm, recorded_model)
    data = data_config(None if cfg.data is not None else recorded(checkpoints, "data"), cfg.data)
    text = text_config(recorded(checkpoints, "text"), cfg.context_size)
    # before reading any text: a wrong site fails fast
    groups = group_by_site([c for c in checkpoints if not c.sae.cross_layer], lm)
    cross_layer = [(c, cross_layer_pairs(c, lm)) for c in checkpoints if c.sae.cross_layer]
    windows = held_out_windows(lm.tokenizer, data, text, cfg.n_tokens)
    tokens = TokenSpec.from_tokenizer(lm.tokenizer, text)

    evaluators: list[SiteEvaluator | CrossLayerEvaluator] = [
        SiteEvaluator(site, saes, downstream=cfg.downstream, source=source) for site, source, saes in groups
    ]
    evaluators += [
        CrossLayerEvaluator(pairs, c.name, c.sae.to(lm.device).eval(), downstream=cfg.downstream)
        for c, pairs in cross_layer
    ]
    replacement = _replacement(groups) if cfg.downstream else None
    counted_tokens, predictions = evaluate_windows(
        lm, windows, tokens, [*evaluators, *([replacement] if replacement else [])], cfg.batch_size, cfg.progress
    )

    by_name = {c.name: c for c in checkpoints}
    entries: dict[str, dict[str, Any]] = {}
    frequencies: dict[str, torch.Tensor] = {}
    cost: dict[str, dict[str, int]] = {}
    for evaluator in evaluators:
        site = evaluator.site
        for name, metrics in evaluator.results(cfg.dense_threshold).items():
            stats = evaluator.recon[name]
            frequencies[name] = stats.frequency
            entries[name] = _sae_entry(
                by_name[name], by_name[name].site, metrics, density_histogram(stats.frequency, stats.n)
            )
        if cfg.downstream:
            cost[evaluator.label] = {
                "n_layers": lm.n_layers,
                "resume_layer": site.resume_layer,
                "conditions": evaluator.n_conditions,
                **layer_forwards(lm.n_layers, site.resume_layer, evaluator.n_conditions),
            }
    payload = {
        "config": asdict(cfg),
        "provenance": provenance(),
        "model": lm.identity,
        "data": data.describe(),
        "text": asdict(text),
        "tokens": {
            "windows": len(windows),
            "context_size": text.context_size,
            "run": windows.numel(),
            "counted": counted_tokens,
            "predictions": predictions if cfg.downstream else 0,
        },
        "cost": cost,
        "saes": {c.name: entries[c.name] for c in checkpoints},
        **({"replacement": replacement.results()} if replacement else {}),
    }
    summary = EvalSummary(out_dir=cfg.out_dir, payload=payload, frequencies=frequencies)
    write_report(summary)
    return summary
