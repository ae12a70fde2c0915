"""TopK SAE (Gao et al. 2024): exactly k latents per token — the k largest pre-activations,
then ReLU — plus the AuxK loss that revives dead latents.

Decoder rows stay unit-norm during training. That is what makes `fold` exact: folding the
decoder norms n_i into the encoder multiplies pre-activation i by n_i, and only a uniform
factor (all n_i = 1, then the normalisation scale) leaves the per-token ranking unchanged.

A transcoder's rows start at zero instead and share one norm, which training sets (each step
rescales every row to their mean norm: still a uniform factor, so `fold` stays exact). The
encoder's gradient is the decoder times the residual, so the first steps fit the decoder to what
the centred latents fire on while the encoder stays where init put it; unit-norm rows, random
or aligned with the data, push the encoder from step 1 and a third of the latents die within
~30 steps (SmolLM2 layer-8 MLP, 1M tokens: 4.7% dead on 20k held-out tokens against 34.7%,
FVU 0.219 against 0.232). BatchTopK's rows are free (sae/batchtopk.py).

A TopK transcoder's training k anneals too: 2k at the first step, falling linearly to k over
the first fifth of the run (`annealed_k`; `SAEConfig.k_anneal`, whose transcoder default is
`transcoder_k_anneal`), so twice the latents take part while the random encoder's selections
are still arbitrary. SmolLM2 layer-8 MLP, 1M tokens, on 100k held-out tokens: without it 8% of
the latents were dead by step 30 and 1.6% stayed dead, with it 0.5% (FVU 0.225 -> 0.227;
20k tokens: CE +0.009 -> +0.010). Matryoshka's tail latents die the same way: 2.6% -> 0.3%
(FVU 0.2439 -> 0.2444, CE +0.010 -> +0.011). BatchTopK's free rows keep its latents alive
(0.2% dead; annealed 0.0%, but FVU 0.222 -> 0.225) and a CLT's CE suffered (8 layers, 400k
tokens, seeds 0/1: 2.6202/2.6081 -> 2.6266/2.6438), so theirs default to 0. An SAE's encoder
starts as its decoder's transpose and annealing costs it (FVU 0.095 -> 0.097).

AuxK (OpenAI; as in sparsify): when the trainer marks dead latents, the top
min(aux_k, n_dead) pre-activations among them (ReLU'd) reconstruct the detached residual
e = x - x_hat, auxk = ||e_hat - e||^2 / ||e - mean(e)||^2 over the batch (0 when no latent is
dead). The PyTorch path selects aux_k entries per token among the dead columns of the same
pre-activations (masked, so the number of dead latents never reaches the host; picks beyond
n_dead get value 0) and decodes them sparsely like the main entries.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from sae_train.sae import kernels, sparse
from sae_train.sae.base import SAE, SAEOutput, SparseLatents
from sae_train.sae.config import SAEConfig, config_error
from sae_train.sae.ops import Levels, SparseSAEFunction, SparseSpec, auxk_ratio


def annealed_k(cfg: SAEConfig, progress: float) -> int:
    """The k a training step selects at `progress` (the fraction of the run done): 2k at the
    start, falling linearly to cfg.k over the first cfg.k_anneal_fraction of the run (k after
    it, and at inference), at most d_sae (a latent shard's)."""
    anneal = cfg.k_anneal_fraction
    extra = max(0.0, 1.0 - progress / anneal) if anneal > 0 else 0.0
    return min(round(cfg.k * (1.0 + extra)), cfg.d_sae)


class TopKSAE(SAE):
    architecture = "topk"
    config_fields = frozenset({"k", "aux_k", "aux_coefficient", "k_anneal"})
    transcoder_k_anneal = 0.2  # measured in the module docstring
    revival = "auxk"
    step_gemms = ("encoder",)  # decode and backward are sparse
    saelens_architecture = saelens_training_architecture = "topk"
    fused_transcoders = True
    batch_selection: ClassVar[bool] = False  # k*B over the batch (BatchTopK) instead of k per token

    @classmethod
    def check_config(cls, cfg: SAEConfig) -> None:
        if not isinstance(cfg.k, int) or cfg.k <= 0:
            raise config_error(
                cfg, "k", "a positive integer", "Set sae.k to the number of active latents per token, e.g. 32."
            )
        d_sae = cfg.d_sae or cfg.expansion_factor * cfg.d_in
        if cfg.d_in and cfg.k > d_sae:
            raise config_error(
                cfg, "k", f"at most d_sae = {d_sae}", "Lower sae.k or raise sae.d_sae / sae.expansion_factor."
            )

    @property
    def unit_norm_decoder(self) -> bool:
        return not self.cfg.is_transcoder

    def _decoder_init_norm(self) -> float:
        return 0.0 if self.cfg.is_transcoder else 1.0

    @torch.no_grad()
    def constrain_extra_(self) -> None:
        """A transcoder's rows to their mean norm (rows still at zero stay there), over every
        latent shard; no host sync."""
        if not self.cfg.is_transcoder:
            return
        norms = self.W_dec.norm(dim=1)
        total = torch.stack([norms.sum(), (norms > 0).sum().to(norms.dtype)])
        if self.shard is not None:
            total = self.shard.sum(total)[0]
        common = total[0] / total[1].clamp_min(1)
        self.W_dec.mul_(torch.where(norms > 0, common / norms.clamp_min(1e-30), torch.ones_like(norms))[:, None])

    # ------------------------------------------------------------------ selection (torch path)

    def _select_torch(self, z: Tensor, world: int) -> sparse.BatchSelection:
        """Training selection on pre-activations z (GEMM dtype, without b_enc); `keep` and
        `min_kept` are BatchTopK's (None here). world: ranks a BatchTopK selection spans
        (`sparse.selection_world`)."""
        B, k = z.shape[0], annealed_k(self.cfg, self.progress)
        ids, vals = sparse.topk_rows(z, self.b_enc.detach(), k)
        offsets = torch.arange(0, B * k + 1, k, device=z.device)
        rows = torch.arange(B * k, device=z.device) // k
        keep = None if self.shard is None else self.shard.keep_top(vals, k)  # a latent shard: the token's k over all
        return sparse.BatchSelection(offsets, ids.view(-1), rows, vals.view(-1), keep, None)

    def _activation(self, z: Tensor) -> Tensor:
        k = self.cfg.k
        bias = torch.zeros(z.shape[1], dtype=z.dtype, device=z.device)
        if kernels.supports(z) and not (torch.is_grad_enabled() and z.requires_grad) and kernels.available():
            idx, val = kernels.topk_rows(z.contiguous(), bias, k)
        else:
            idx, val = sparse.topk_rows(z, bias, k)
        return torch.zeros_like(z).scatter(1, idx, val.relu())

    def _select_aux(self, z: Tensor, dead_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """AuxK's entries, aux_k' = min(aux_k, columns searched) per token: (latent ids [B*aux_k'],
        their pre-activations (-inf where not dead), bool [B*aux_k'] whether the pick is a dead
        latent -- picks beyond n_dead are not)."""
        d_sae, bias = self.cfg.d_sae, self.b_enc.detach()
        if self.shard is not None:  # the aux_k best dead latents over every shard (sae/shard.py)
            aux_ids, vals = sparse.topk_rows(z, bias, min(self.cfg.aux_k, d_sae), dead_mask)
            keep = self.shard.keep_top(vals, min(self.cfg.aux_k, self.shard.d_sae))
            aux_ids = aux_ids.view(-1)
            return aux_ids, vals.view(-1), dead_mask[aux_ids] & keep
        if self.max_dead is None or self.max_dead >= d_sae:
            aux_ids, vals = sparse.topk_rows(z, bias, min(self.cfg.aux_k, d_sae), dead_mask)
            aux_ids = aux_ids.view(-1)
            return aux_ids, vals.view(-1), dead_mask[aux_ids]
        n_cols = max(1, self.max_dead)
        cols = torch.nonzero_static(dead_mask, size=n_cols, fill_value=d_sae).squeeze(1)  # ascending, padded
        valid = cols < d_sae
        cols = cols.clamp(max=d_sae - 1)
        local, vals = sparse.topk_rows(z.index_select(1, cols), bias[cols], min(self.cfg.aux_k, n_cols), valid)
        return cols[local].view(-1), vals.view(-1), valid[local].view(-1)

    # ------------------------------------------------------------------ forward

    def _output(
        self, x: Tensor, x_hat: Tensor, terms: dict[str, Tensor], auxk: Tensor, latents: SparseLatents
    ) -> SAEOutput:
        """terms: the reconstruction's loss terms (`_decode_train`), "mse" first."""
        loss = self._reconstruction_loss(terms) + self.cfg.aux_coefficient * auxk
        active = (latents.values != 0).float()
        counts = torch.zeros(self.cfg.d_sae, device=x.device).index_add_(0, latents.indices, active)
        l0 = active.sum() / x.shape[0]
        return SAEOutput(x_hat, {"loss": loss, **terms, "auxk": auxk}, l0, counts > 0, latents)

    def _reconstruction_loss(self, terms: dict[str, Tensor]) -> Tensor:
        """The reconstruction part of the loss from `_decode_train`'s terms: the MSE."""
        return terms["mse"]

    def _decode_train(
        self, target: Tensor, vals: Tensor, W_dec: Tensor, groups: sparse.ByLatent, rows: Tensor, offsets: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The training decode of the selected entries (CSR `offsets`, token of each entry `rows`)
        and its loss terms: (x_hat [B, d_out], {"mse": ...})."""
        x_hat, _ = self._decoded(sparse.SparseDecode.apply(vals, W_dec, groups, rows, offsets))
        return x_hat, {"mse": self._mse(x_hat, target)}

    def _levels(self) -> Levels | None:
        """Nested prefixes the fused step reconstructs from (Matryoshka); None: one reconstruction."""
        return None

    def _fast_terms(self, mse: Tensor, levels: Levels | None) -> dict[str, Tensor]:
        """The fused step's loss terms from its loss output (and `_levels`, filled in)."""
        return {"mse": mse}

    def _forward_torch(self, x: Tensor, target: Tensor, dead_mask: Tensor | None, sparsity_scale: float) -> SAEOutput:
        """The sparse step in plain PyTorch (sae/sparse.py): encoder GEMM, selection, embedding-bag
        decode; every gradient from the selected entries only. `target`: x for an SAE."""
        B, world = x.shape[0], sparse.selection_world()
        with torch.no_grad():
            xc = self._encoder_input(x)
            z = xc.to(self._gemm_dtype) @ self.gemm_weight("W_enc")
            sel = self._select_torch(z, world)
            offsets, ids, rows, pre, keep = sel.offsets, sel.ids, sel.rows, sel.values, sel.keep
            n_main = ids.numel()
            if dead_mask is not None:
                aux_ids, aux_pre, aux_valid = self._select_aux(z, dead_mask)
                aux_k = aux_ids.numel() // B
                ids, pre = torch.cat([ids, aux_ids]), torch.cat([pre, aux_pre])
                rows = torch.cat([rows, torch.arange(B * aux_k, device=x.device) // aux_k])
        d_sae = self.cfg.d_sae
        main = sparse.ByLatent(ids[:n_main], d_sae)  # its sort serves both backward passes when no AuxK
        every = main if dead_mask is None else sparse.ByLatent(ids, d_sae)
        pre = sparse.SparsePreact.apply(pre, xc, rows, every, self._encoder_centre(), self.W_enc, self.b_enc)
        del z
        vals = torch.relu(pre[:n_main])
        if keep is not None:
            vals = torch.where(keep, vals, torch.zeros_like(vals))
        W_dec = self.W_dec
        if self._gemm_dtype != W_dec.dtype:  # decode with the weights the GEMM path uses
            W_dec = sparse.RoundThrough.apply(W_dec, self.gemm_weight("W_dec"))
        x_hat, terms = self._decode_train(target, vals, W_dec, main, rows[:n_main], offsets)
        auxk = x_hat.new_zeros(())
        if dead_mask is not None:
            aux_ids = ids[n_main:]
            a_vals = torch.where(aux_valid, torch.relu(pre[n_main:]), torch.zeros_like(pre[n_main:]))
            a_offsets = torch.arange(0, B * aux_k + 1, aux_k, device=x.device)
            e_hat = sparse.SparseDecode.apply(a_vals, W_dec, sparse.ByLatent(aux_ids, d_sae), rows[n_main:], a_offsets)
            n_dead = dead_mask.sum()
            if self.shard is not None:  # every shard's dead latents reconstruct the residual together
                e_hat, n_dead = self.shard.sum(e_hat, n_dead.to(e_hat.dtype))
            auxk = torch.where(n_dead > 0, auxk_ratio(e_hat, (target - x_hat).detach()), auxk)
        out = self._output(x, x_hat, terms, auxk, SparseLatents(vals.detach(), ids[:n_main], offsets, self.cfg.d_sae))
        if sel.min_kept is not None:
            out.stats["min_kept"] = sel.min_kept
        return out

    def _forward_fast(self, x: Tensor, target: Tensor, dead_mask: Tensor | None, sparsity_scale: float) -> SAEOutput:
        """The fused CPU step (sae/ops.py), for an SAE (target = x) and a transcoder alike."""
        dead = None if dead_mask is None else dead_mask.nonzero().squeeze(1)  # CPU only: no sync to avoid
        dead = dead if dead is not None and dead.numel() else None
        aux_k = 0 if dead is None else min(self.cfg.aux_k, dead.numel())
        k = annealed_k(self.cfg, self.progress)
        spec = SparseSpec(self.batch_selection, k, self.gemm_weights(), dead, aux_k, sparse.selection_world())
        spec.levels = self._levels()
        x_hat, mse, auxk, vals = SparseSAEFunction.apply(
            x, target, self._encoder_centre(), self.W_enc, self.b_enc, self.W_dec, self.b_dec, spec
        )
        assert spec.idx is not None and spec.offsets is not None  # set by the forward
        terms = self._fast_terms(mse, spec.levels)
        out = self._output(x, x_hat, terms, auxk, SparseLatents(vals, spec.idx, spec.offsets, self.cfg.d_sae))
        if spec.min_kept is not None:
            out.stats["min_kept"] = spec.min_kept
        return out
