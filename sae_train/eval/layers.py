"""The numbers of one cross-layer transcoder, batch by batch: reconstruction of every layer's
MLP output, and the loss of the replacement model with all of them replaced at once.

Reconstruction compares, per layer and over all layers together, the CLT's outputs on the
clean MLP inputs with the clean MLP outputs (FVU per layer; the overall FVU is the summed
squared error over the summed variance). The spliced condition is the replacement model
circuit-tracer attributes through: in one forward pass every layer's MLP output is replaced by
the CLT's reconstruction from the MLP inputs of that pass (`splice_chain`: later layers read the
earlier replacements). The references ablate every MLP output at once (zero, or its batch mean
per layer), so CE recovered compares the CLT with removing all the MLPs. Positions outside the
counted tokens keep their clean values, as in the per-site eval. No layers are shared between
conditions: each spliced forward runs the whole model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from sae_train.eval.downstream import ABLATIONS, next_token_log_probs
from sae_train.eval.metrics import LossStats, ReconstructionStats, ce_recovered
from sae_train.lm import LanguageModel, Site
from sae_train.lm.hooks import ChainSpliceFn
from sae_train.sae import SAE


def _replacement(sae: Any, counted: Tensor) -> ChainSpliceFn:
    """Chain-splice function of one forward pass: target i <- the CLT's output for layer i at the
    counted positions, from the latents of layers 0..i (each layer encoded once, when reached)."""
    latents: list[Tensor] = []

    def replace(i: int, sources: list[Tensor], y: Tensor) -> Tensor:
        while len(latents) <= i:
            latents.append(sae.encode_layer(sources[len(latents)][counted].float(), len(latents)))
        out = y.clone()
        out[counted] = sae.decode_layer(latents, i, sources[i][counted].float()).to(y.dtype)
        return out

    return replace


def _ablation(values: Sequence[Tensor | float], counted: Tensor) -> ChainSpliceFn:
    def replace(i: int, sources: list[Tensor], y: Tensor) -> Tensor:
        out = y.clone()
        out[counted] = torch.as_tensor(values[i], dtype=y.dtype, device=y.device)
        return out

    return replace


class CrossLayerEvaluator:
    """Accumulates the numbers of cross-layer transcoder `name` (folded, on the model's device),
    which reads `pairs[i][0]` and writes `pairs[i][1]` at layer i. Offers what the eval stage
    reads of a `SiteEvaluator`: `saes`, `recon` (over all layers), `results`, `n_conditions`,
    `label`, and `site` (layer 0's target: resume_layer 0, no shared prefix)."""

    def __init__(
        self,
        pairs: Sequence[tuple[Site, Site]],
        name: str,
        sae: SAE,
        *,
        downstream: bool = True,
        ablations: Sequence[str] = ABLATIONS,
    ):
        self.pairs, self.name, self.downstream, self.ablations = list(pairs), name, downstream, tuple(ablations)
        self.site, self.source = self.pairs[0][1], None
        self.saes = {name: sae}
        L, d_out, d_sae, device = len(self.pairs), sae.cfg.d_out, sae.cfg.d_sae, sae.b_dec.device
        self.recon = {name: ReconstructionStats(L * d_out, L * d_sae, device)}
        self.layers = [ReconstructionStats(d_out, d_sae, device) for _ in range(L)]
        self.reference = {k: LossStats() for k in ("clean", *self.ablations)}
        self.spliced = LossStats()

    @property
    def label(self) -> str:
        return f"{self.pairs[0][0].name}..{self.pairs[-1][0].name} -> {self.pairs[0][1].name}..{self.pairs[-1][1].name}"

    @property
    def n_conditions(self) -> int:
        """Forwards per batch: clean, the replacement model, each ablation."""
        return 2 + len(self.ablations)

    @torch.no_grad()
    def add_batch(self, lm: LanguageModel, input_ids: Tensor, counted: Tensor) -> None:
        """Evaluate one batch of windows [B, T] (on lm's device); counted is bool [B, T]."""
        sae = self.saes[self.name]
        sites = [site for pair in self.pairs for site in pair]
        acts: dict[str, Tensor] = {}

        def record(i: int, sources: list[Tensor], y: Tensor) -> Tensor:
            """The identity splice: keeps layer i's clean input and output."""
            acts[self.pairs[i][0].name], acts[self.pairs[i][1].name] = sources[i], y.clone()
            return y

        if self.downstream:
            with lm.splice_chain(self.pairs, record):
                clean_out = lm.forward(input_ids)
        else:
            acts = lm.capture(sites, input_ids)
        x = torch.stack([acts[s.name][counted].float() for s, _ in self.pairs], dim=1)
        y = torch.stack([acts[t.name][counted].float() for _, t in self.pairs], dim=1)
        latents, y_hat = sae.reconstruct(x)
        self.recon[self.name].update(y.flatten(1), y_hat.flatten(1), latents.flatten(1))
        for i, stats in enumerate(self.layers):
            stats.update(y[:, i], y_hat[:, i], latents[:, i])
        if not self.downstream:
            return
        scored = counted[:, 1:]
        targets = input_ids[:, 1:][scored]
        clean = next_token_log_probs(clean_out.logits, scored)
        del clean_out
        self.reference["clean"].update(clean, clean, targets)

        def score(stats: LossStats, fn: ChainSpliceFn) -> None:
            with lm.splice_chain(self.pairs, fn):
                logits = lm.forward(input_ids).logits
            stats.update(next_token_log_probs(logits, scored), clean, targets)

        score(self.spliced, _replacement(sae, counted))
        for ablation in self.ablations:
            values = [0.0] * len(self.pairs) if ablation == "zero" else list(y.mean(0))
            score(self.reference[ablation], _ablation(values, counted))

    def results(self, dense_threshold: float) -> dict[str, dict[str, float]]:
        """{name: metrics}: over all layers (fvu, l0 per token summed over layers, dead...), then
        per layer `fvu_<i>`, `l0_<i>`, `dead_fraction_<i>`, and the replacement model's losses."""
        metrics = self.recon[self.name].metrics(dense_threshold)
        for i, stats in enumerate(self.layers):
            layer = stats.metrics(dense_threshold)
            metrics |= {f"{key}_{i}": layer[key] for key in ("fvu", "l0", "dead_fraction")}
        if self.downstream:
            clean, sae = self.reference["clean"].mean_ce, self.spliced
            metrics |= {"ce_clean": clean, "ce_sae": sae.mean_ce, "kl": sae.mean_kl, "n_predictions": sae.n}
            for ablation in self.ablations:
                ref = self.reference[ablation]
                metrics[f"ce_{ablation}"], metrics[f"kl_{ablation}"] = ref.mean_ce, ref.mean_kl
                key = "ce_recovered" if ablation == "zero" else f"ce_recovered_{ablation}"
                metrics[key] = ce_recovered(clean, sae.mean_ce, ref.mean_ce)
        return {self.name: metrics}
