"""Periodic eval during training: the current SAEs on a small, fixed set of held-out windows.

The windows are tokenized once, so a call costs only the forwards and every call sees the
same tokens: the numbers are comparable from step to step. train/ knows nothing of eval; the
stage that owns both wires it in as a trainer callback, e.g.

    periodic = PeriodicEval.from_data(lm, data, text, n_tokens=4096)

    def callback(info: StepInfo) -> dict[str, dict[str, float]] | None:
        if info.step % every and info.step != info.n_steps:
            return None
        return periodic({run.tag: (run.layers or run.site, run.inference()) for run in info.runs})
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

import torch

from sae_train.data import DataConfig, TextConfig, TokenSpec
from sae_train.data.packing import keep_mask
from sae_train.eval.downstream import SiteEvaluator
from sae_train.eval.layers import CrossLayerEvaluator
from sae_train.eval.tokens import held_out_windows
from sae_train.lm import LanguageModel
from sae_train.sae import SAE


class PeriodicEval:
    """Callable: {tag: (site, folded SAE)} -> {tag: {"eval/fvu", "eval/ce_recovered", "eval/kl", "eval/l0"}}.

    Same definitions as the eval stage (sae_train/eval/metrics.py); CE recovered is against
    zero ablation, and the mean-ablation condition is skipped to keep each call cheap.
    """

    def __init__(self, lm: LanguageModel, windows: torch.Tensor, text: TextConfig, batch_size: int = 8):
        """windows: int64 [n, context_size] of held-out text, tokenized as `text` says."""
        self.lm = lm
        tokens = TokenSpec.from_tokenizer(lm.tokenizer, text)
        self.batches = [(ids, keep_mask(ids, tokens)) for ids in windows.to(lm.device).split(batch_size)]

    @classmethod
    def from_data(
        cls, lm: LanguageModel, data: DataConfig, text: TextConfig, n_tokens: int = 4096, batch_size: int = 8
    ) -> PeriodicEval:
        """About n_tokens of data's eval split (whatever data.split says)."""
        windows = held_out_windows(lm.tokenizer, replace(data, split="eval"), text, n_tokens)
        return cls(lm, windows, text, batch_size)

    @torch.no_grad()
    def __call__(self, saes: Mapping[str, tuple[str | Sequence[tuple[str, str]], SAE]]) -> dict[str, dict[str, float]]:
        """saes: tag -> (site name, inference SAE acting on raw activations, i.e. `sae.fold(scale)`);
        for a cross-layer transcoder, its (source, target) sites per layer instead of the site.
        Each SAE is moved to the model's device (pass copies, as fold makes)."""
        by_site: dict[tuple[str, str], dict[str, SAE]] = {}  # (site read, target: "" for SAEs)
        evaluators: list[SiteEvaluator | CrossLayerEvaluator] = []
        for tag, (site, sae) in saes.items():
            if not sae.folded:
                raise ValueError(
                    f"{tag}: pass the folded inference copy (sae.fold(scale)), which acts on raw activations"
                )
            if isinstance(site, str):
                by_site.setdefault((site, sae.cfg.target), {})[tag] = sae.to(self.lm.device)
            else:
                pairs = [(self.lm.site(source), self.lm.site(target)) for source, target in site]
                evaluators.append(CrossLayerEvaluator(pairs, tag, sae.to(self.lm.device), ablations=("zero",)))
        evaluators += [
            SiteEvaluator(
                self.lm.site(target or site), group, ablations=("zero",), source=self.lm.site(site) if target else None
            )
            for (site, target), group in by_site.items()
        ]
        for input_ids, counted in self.batches:
            for evaluator in evaluators:
                evaluator.add_batch(self.lm, input_ids, counted)
        metrics = {}
        for evaluator in evaluators:
            for tag, m in evaluator.results(dense_threshold=1.0).items():  # dense fraction is not reported here
                metrics[tag] = {
                    "eval/fvu": m["fvu"],
                    "eval/ce_recovered": m["ce_recovered"],
                    "eval/kl": m["kl"],
                    "eval/l0": m["l0"],
                }
        return metrics
