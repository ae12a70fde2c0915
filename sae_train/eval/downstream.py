"""Every number of the SAEs at one site, batch by batch, with the model's shared layers run once.

Per batch, `SharedPrefix` runs the clean forward once; each condition — every SAE at the
site, zero ablation, mean ablation — then reruns only the layers from the site on (the lm
tests pin this to a full spliced forward, bit for bit). The SAE's reconstruction is computed
once and serves both the reconstruction metrics and the splice. Logits are [B, T, vocab]: each
condition's are reduced to CE and KL at once and dropped; only the clean log-probs of the
scored predictions live for the whole batch, because every KL needs them.

Mean ablation replaces the site by its mean over the batch's counted tokens: an extra pass to
get the mean over all eval tokens would cost a forward per batch, and over B x T tokens the
batch mean is already that mean to within noise.

Transcoders (an evaluator with a `source`): the site is their target (e.g. an MLP's output),
the reconstruction metrics compare their output with the target's activation, and the
spliced condition replaces the target by the transcoder applied to the source's activation
read in that same forward (the MLP's actual input). The ablations ablate the target.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from sae_train.eval.metrics import LossStats, ReconstructionStats, ce_recovered
from sae_train.lm import LanguageModel, Site
from sae_train.lm.hooks import SourceSpliceFn, SpliceFn
from sae_train.sae import SAE

ABLATIONS = ("zero", "mean")


def layer_forwards(n_layers: int, resume_layer: int, n_conditions: int) -> dict[str, int]:
    """Decoder-layer forwards of one eval batch at one site, shared vs one full forward per condition.

    n_conditions counts the clean run. Shared: the clean forward runs all n_layers, each other
    condition only layers resume_layer..n_layers-1, so shared = n_layers + (n_conditions - 1) *
    (n_layers - resume_layer); naive = n_conditions * n_layers. The embeddings and the LM head run
    once per condition either way and are not counted.
    """
    shared = n_layers + (n_conditions - 1) * (n_layers - resume_layer)
    return {"shared": shared, "naive": n_conditions * n_layers}


def next_token_log_probs(logits: Tensor, scored: Tensor) -> Tensor:
    """fp32 log-probs [N, vocab] of the scored predictions; scored is bool [B, T-1] (target counted)."""
    return torch.log_softmax(logits[:, :-1][scored].float(), dim=-1)


def _transcode_at(counted: Tensor, sae: SAE) -> SourceSpliceFn:
    """Source-splice function: the transcoder's output on the source at the counted positions,
    the clean target elsewhere."""

    def replace(source: Tensor, target: Tensor) -> Tensor:
        out = target.clone()
        out[counted] = sae.reconstruct(source[counted].float())[1].to(target.dtype)
        return out

    return replace


def _replace_at(counted: Tensor, values: Tensor) -> SpliceFn:
    """Splice function: values at the counted positions, the clean activation elsewhere."""

    def replace(activation: Tensor) -> Tensor:
        out = activation.clone()
        out[counted] = values.to(activation.dtype)
        return out

    return replace


class SiteEvaluator:
    """Accumulates reconstruction, sparsity and (with `downstream`) loss numbers of the SAEs at one site.

    `saes` maps a name to an inference SAE (folded: it acts on raw activations) on the model's
    device; `ablations` names the reference conditions to run besides clean ("zero", "mean").
    `source`: the site transcoders read (their target being `site`); None for SAEs.
    """

    def __init__(
        self,
        site: Site,
        saes: Mapping[str, SAE],
        *,
        downstream: bool = True,
        ablations: Sequence[str] = ABLATIONS,
        source: Site | None = None,
    ):
        unknown = set(ablations) - set(ABLATIONS)
        if unknown:
            raise ValueError(f"unknown ablations {sorted(unknown)}; use {ABLATIONS}")
        self.site, self.saes, self.downstream, self.ablations = site, dict(saes), downstream, tuple(ablations)
        self.source = source
        self.recon = {
            name: ReconstructionStats(sae.cfg.d_out, sae.cfg.d_sae, sae.W_dec.device) for name, sae in self.saes.items()
        }
        self.reference = {name: LossStats() for name in ("clean", *self.ablations)}
        self.spliced = {name: LossStats() for name in self.saes}

    @property
    def label(self) -> str:
        """The site, or source->target for transcoders (the report's cost entries)."""
        return self.site.name if self.source is None else f"{self.source.name}->{self.site.name}"

    @property
    def n_conditions(self) -> int:
        """Downstream forwards per batch: clean, each SAE, each ablation."""
        return 1 + len(self.saes) + len(self.ablations)

    @torch.no_grad()
    def add_batch(self, lm: LanguageModel, input_ids: Tensor, counted: Tensor) -> None:
        """Evaluate one batch of windows [B, T] (on lm's device); counted is bool [B, T]."""
        sources = [] if self.source is None else [self.source]
        if not self.downstream:
            acts = lm.capture([self.site, *sources], input_ids)
            y = acts[self.site.name][counted].float()
            x = y if self.source is None else acts[self.source.name][counted].float()
            for name, sae in self.saes.items():
                latents, y_hat = sae.reconstruct(x)
                self.recon[name].update(y, y_hat, latents)
            return

        prefix = lm.shared_prefix(self.site, input_ids, sources)
        y = prefix.activation[counted].float()
        x = y if self.source is None else prefix.sources[self.source.name][counted].float()
        scored = counted[:, 1:]
        targets = input_ids[:, 1:][scored]
        clean = next_token_log_probs(prefix.clean.logits, scored)
        prefix.clean = None  # drop the [B, T, vocab] clean logits: only `clean` is needed from here on
        self.reference["clean"].update(clean, clean, targets)

        def score(stats: LossStats, output: Any) -> None:
            stats.update(next_token_log_probs(output.logits, scored), clean, targets)

        for name, sae in self.saes.items():
            latents, y_hat = sae.reconstruct(x)
            self.recon[name].update(y, y_hat, latents)
            if self.source is None:
                score(self.spliced[name], prefix.run(_replace_at(counted, y_hat)))
            else:
                score(self.spliced[name], prefix.run_from(self.source, _transcode_at(counted, sae)))
        for ablation in self.ablations:
            score(
                self.reference[ablation],
                prefix.run(_replace_at(counted, y.new_zeros(()) if ablation == "zero" else y.mean(0))),
            )

    def results(self, dense_threshold: float) -> dict[str, dict[str, float]]:
        """Per SAE name: its metrics (see sae_train/eval/metrics.py and the report's Definitions)."""
        results = {}
        for name in self.saes:
            metrics = self.recon[name].metrics(dense_threshold)
            if self.downstream:
                metrics |= self._loss_metrics(self.spliced[name])
            results[name] = metrics
        return results

    def _loss_metrics(self, sae: LossStats) -> dict[str, float]:
        clean = self.reference["clean"].mean_ce
        metrics = {"ce_clean": clean, "ce_sae": sae.mean_ce, "kl": sae.mean_kl, "n_predictions": sae.n}
        for ablation in self.ablations:
            ref = self.reference[ablation]
            metrics[f"ce_{ablation}"] = ref.mean_ce
            metrics[f"kl_{ablation}"] = ref.mean_kl
        if "zero" in self.ablations:
            metrics["ce_recovered"] = ce_recovered(clean, sae.mean_ce, metrics["ce_zero"])
            kl_zero = metrics["kl_zero"]
            metrics["kl_score"] = (kl_zero - sae.mean_kl) / kl_zero if kl_zero else float("nan")
        if "mean" in self.ablations:
            metrics["ce_recovered_mean"] = ce_recovered(clean, sae.mean_ce, metrics["ce_mean"])
        return metrics


class ReplacementEvaluator:
    """CE and KL with every transcoder of a set spliced in at once: each target (an MLP's output)
    replaced by its transcoder applied to its source as computed in that same forward, so errors
    compound through the layers as in circuit tracing's replacement model (per-site numbers
    splice one transcoder at a time). Two full forwards per batch: clean and replaced. The
    splice is `LanguageModel.splice_chain`, as for a cross-layer transcoder (eval/layers.py).

    `transcoders`: (source, target, name, inference transcoder) with distinct targets.
    """

    def __init__(self, transcoders: Sequence[tuple[Site, Site, str, SAE]]):
        targets = [target.name for _, target, _, _ in transcoders]
        if len(set(targets)) != len(targets):
            raise ValueError(f"one transcoder per target site, got targets {targets}")
        # forward order, as splice_chain reads the pairs
        self.transcoders = sorted(transcoders, key=lambda t: (t[1].resume_layer, t[0].resume_layer))
        self.clean, self.replaced = LossStats(), LossStats()

    @torch.no_grad()
    def add_batch(self, lm: LanguageModel, input_ids: Tensor, counted: Tensor) -> None:
        scored = counted[:, 1:]
        targets = input_ids[:, 1:][scored]
        clean = next_token_log_probs(lm.forward(input_ids).logits, scored)
        self.clean.update(clean, clean, targets)
        swaps = [_transcode_at(counted, sae) for _, _, _, sae in self.transcoders]

        def replace(i: int, sources: list[Tensor], target: Tensor) -> Tensor:
            return swaps[i](sources[i], target)

        with lm.splice_chain([(source, target) for source, target, _, _ in self.transcoders], replace):
            logits = lm.forward(input_ids).logits
        self.replaced.update(next_token_log_probs(logits, scored), clean, targets)

    def results(self) -> dict[str, Any]:
        return {
            "saes": [name for _, _, name, _ in self.transcoders],
            "ce_clean": self.clean.mean_ce,
            "ce_replaced": self.replaced.mean_ce,
            "kl": self.replaced.mean_kl,
            "n_predictions": self.replaced.n,
        }
