"""Matryoshka BatchTopK SAE (Bussmann, Nabeshima, Karvonen & Nanda 2025): BatchTopK whose
nested prefixes of latents each reconstruct the input on their own.

With prefix widths m_1 < ... < m_L = d_sae (cfg.matryoshka_prefixes) and weights w_l summing
to 1 (cfg.matryoshka_weights), the batch's BatchTopK selection f gives

    x_hat_l = f[:, :m_l] @ W_dec[:m_l] + b_dec     (b_dec in every prefix)
    loss    = sum_l w_l * mse(x_hat_l, x) + aux_coefficient * auxk

so the first latents must carry the most of the input alone: general features gather in the
small prefixes and the wide ones add detail (less feature absorption). The latents keep their
index order: the nesting is what orders them, nothing is permuted or sorted. This is the loss
of dictionary_learning's MatryoshkaBatchTopK (b_dec at every level, equal weights 1/L by
default, AuxK on the full reconstruction's residual; it then averages the weighted terms, a
further 1/L) and of SAELens's matryoshka_batchtopk with use_matryoshka_aux_loss off (it sums
the levels unweighted: L times ours). Weights summing to 1 keep aux_coefficient meaning what it
means for BatchTopK. "mse" stays the full reconstruction's, the one FVU and eval measure;
"nested_mse" is the weighted sum and "mse_<m>" each inner prefix's.

The prefix decodes cost one sparse decode, not L dense ones: the selection lists each token's
latents in ascending order, so a token's entries below m_1, then in [m_1, m_2), ... are
consecutive runs; one embedding bag sums each run (token b, level l) into D[b, l] and the
prefix reconstructions are b_dec + cumsum_l D[b, l]. Everything else is BatchTopK's sparse
step (selection global across DDP ranks, sparse encoder gradients, AuxK on the full
reconstruction's residual): in plain PyTorch (sae/sparse.py) on CUDA, through the fused CPU
kernels (sae/ops.py, `Levels`: the same bags, one CSR product) on CPU, where it runs at ~80% of
BatchTopK's speed instead of ~30%. Inference, the learned threshold and the SAELens export (as
JumpReLU) are BatchTopK's: the nesting only shapes training.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import pairwise

import torch
from torch import Tensor

from sae_train.sae import sparse
from sae_train.sae.batchtopk import BatchTopKSAE
from sae_train.sae.config import SAEConfig, config_error
from sae_train.sae.ops import Levels


def prefix_widths(prefixes: Sequence[float], d_sae: int) -> list[int]:
    """The prefix widths in latents: fractions of d_sae when every entry is <= 1 (rounded to
    the nearest latent), else widths in latents."""
    if max(prefixes) <= 1:
        return [round(p * d_sae) for p in prefixes]
    return [int(p) for p in prefixes]


class MatryoshkaSAE(BatchTopKSAE):
    architecture = "matryoshka"
    config_fields = BatchTopKSAE.config_fields | {"matryoshka_prefixes", "matryoshka_weights"}
    transcoder_k_anneal = 0.2  # its tail latents die without it (sae/topk.py)
    # inherited step_gemms ("encoder"): the decode and every gradient are sparse on the fast path
    saelens_architecture, saelens_training_architecture = "jumprelu", "matryoshka_batchtopk"
    shardable_latents = False  # its prefixes nest over the whole latent range, one decode per prefix

    def __init__(self, cfg: SAEConfig, *, compute_dtype: torch.dtype = torch.float32) -> None:
        super().__init__(cfg, compute_dtype=compute_dtype)
        self.widths = prefix_widths(cfg.matryoshka_prefixes, cfg.d_sae)
        weights = cfg.matryoshka_weights or [1.0] * len(self.widths)
        self.level_weights = [w / sum(weights) for w in weights]  # Python floats: no host-device copy
        # where levels 2..L start (not state: it follows from the config)
        self.level_starts: Tensor
        self.register_buffer("level_starts", torch.tensor(self.widths[:-1], dtype=torch.int64), persistent=False)

    @classmethod
    def check_config(cls, cfg: SAEConfig) -> None:
        super().check_config(cfg)
        prefixes, weights = cfg.matryoshka_prefixes, cfg.matryoshka_weights
        example = "e.g. sae.matryoshka_prefixes=[0.0625,0.25,1.0] (fractions of d_sae) or [288,1152,4608] (widths)"
        if (
            not isinstance(prefixes, Sequence)
            or not prefixes
            or not all(isinstance(p, (int, float)) and math.isfinite(p) and p > 0 for p in prefixes)
        ):
            raise config_error(cfg, "matryoshka_prefixes", "a non-empty list of numbers > 0", f"Set it, {example}.")
        if max(prefixes) > 1 and any(p != int(p) for p in prefixes):
            raise config_error(
                cfg,
                "matryoshka_prefixes",
                "all fractions of d_sae (<= 1) or all widths in latents (integers)",
                f"Do not mix the two, {example}.",
            )
        if (
            not isinstance(weights, Sequence)
            or not all(isinstance(w, (int, float)) and math.isfinite(w) and w >= 0 for w in weights)
            or (weights and (len(weights) != len(prefixes) or not sum(weights) > 0))
        ):
            raise config_error(
                cfg,
                "matryoshka_weights",
                f"[] (equal weights) or {len(prefixes)} numbers >= 0 (one per prefix), not all 0",
                "Give one weight per entry of sae.matryoshka_prefixes, or [] for equal weights.",
            )
        if not cfg.d_in and not cfg.d_sae:
            return  # widths are checked once d_sae is known (`resolved`)
        d_sae = cfg.d_sae or cfg.expansion_factor * cfg.d_in
        widths = prefix_widths(prefixes, d_sae)
        if widths[0] < 1 or any(a >= b for a, b in pairwise(widths)) or widths[-1] != d_sae:
            raise config_error(
                cfg,
                "matryoshka_prefixes",
                f"strictly increasing widths ending at d_sae = {d_sae} (they are {widths})",
                f"Make every prefix wider than the one before and the last 1.0 (or {d_sae}), {example}.",
            )

    # ------------------------------------------------------------------ forward

    def _levels(self) -> Levels:
        return Levels(self.level_starts, tuple(self.level_weights))

    def _fast_terms(self, mse: Tensor, levels: Levels | None) -> dict[str, Tensor]:
        assert levels is not None and levels.mses is not None  # filled in by the fused forward
        return self._level_terms(levels.mses, mse)

    def _level_terms(self, mses: Tensor, nested: Tensor) -> dict[str, Tensor]:
        """The loss terms from every prefix's MSE [L] and their weighted sum."""
        return {"mse": mses[-1], "nested_mse": nested, **{f"mse_{m}": mses[i] for i, m in enumerate(self.widths[:-1])}}

    def _reconstruction_loss(self, terms: dict[str, Tensor]) -> Tensor:
        return terms["nested_mse"]

    def _decode_train(
        self, target: Tensor, vals: Tensor, W_dec: Tensor, groups: sparse.ByLatent, rows: Tensor, offsets: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Every prefix's reconstruction from one sparse decode, and the nested loss terms.

        Bag (token b, level l) holds the run of b's entries with level_starts[l-1] <= id <
        level_starts[l] (ids ascend within a token); its bounds come from one searchsorted over
        the entries' (token, id) keys, so nothing waits on the host."""
        B, L, d_sae = offsets.numel() - 1, len(self.widths), self.cfg.d_sae
        ids = groups.ids
        key = rows * d_sae + ids  # ascending over the whole CSR
        starts = torch.cat([self.level_starts.new_zeros(1), self.level_starts])  # [L]
        queries = (torch.arange(B, device=ids.device)[:, None] * d_sae + starts).flatten()
        bag_offsets = torch.cat([torch.searchsorted(key, queries), offsets[-1:]])
        bag_rows = rows * L + torch.bucketize(ids, self.level_starts, right=True)
        parts = sparse.SparseDecode.apply(vals, W_dec, groups, bag_rows, bag_offsets)
        x_hats = parts.view(B, L, -1).cumsum(1) + self.b_dec  # [B, L, d_out]: every prefix's reconstruction
        mses = (x_hats - target[:, None]).pow(2).sum(-1).mean(0)  # [L]
        nested = sum((w * mse for w, mse in zip(self.level_weights, mses.unbind())), mses.new_zeros(()))
        return x_hats[:, -1], self._level_terms(mses, nested)
