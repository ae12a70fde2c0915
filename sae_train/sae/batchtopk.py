"""BatchTopK SAE (Bussmann et al. 2024): during training the k*B largest ReLU'd
pre-activations of the whole batch are kept, so L0 averages k per token but adapts per token.

Inference cannot depend on the batch, so it uses f = z * [z > threshold] with one threshold:
a running average of the smallest activation kept per batch (dictionary_learning's statistic),
updated in `after_step` by `track_threshold`. AuxK and the unit-norm decoder are as in TopK.

A transcoder's decoder rows start at zero as in TopK, and are free (as sparsify's
transcoders): `fold` stays exact, each latent's threshold scaling with its decoder norm
(SmolLM2 layer-8 MLP, 1M tokens: dead at the end of training 33% -> 0.3%, training FVU 0.197 ->
0.182 against unit-norm rows aligned with the data).

Under torch.distributed a training forward (autograd on) selects globally: the k*B_global
largest entries over every rank's rows (one all_gather of each rank's best candidates,
`sparse.global_cut`), so N ranks train what one process would on the concatenated batch.
Forwards without autograd (init on rank 0, evaluation) select within their own batch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sae_train.sae import sparse
from sae_train.sae.base import SAEOutput
from sae_train.sae.config import SAEConfig
from sae_train.sae.topk import TopKSAE, annealed_k

RECENT = 9
"""The threshold's average weighs step s of t about as s**(RECENT - 1): its mean age is t / (RECENT + 1)."""


@torch.no_grad()
def track_threshold(threshold: Tensor, updates: Tensor, min_kept: Tensor, beta: float) -> None:
    """Fold one step's smallest kept activation into the inference threshold, in place, on the device.

    A plain EMA at beta 0.999 still holds 78% of the first step's value after 244 steps, while the
    kept minimum moves a lot as the dictionary forms (up 30% over a 1M-token Matryoshka run), so
    the inference L0 missed k. The factor t / (t + RECENT) (0 at the first update, which sets the
    threshold) averages the recent tenth of the run (polynomial-decay averaging, Shamir & Zhang
    2013); capped at beta it becomes the plain EMA once it passes beta (~9,000 steps at 0.999)."""
    t = updates.to(threshold.dtype)
    factor = (t / (t + RECENT)).clamp(max=beta)
    threshold.mul_(factor).add_((1 - factor) * min_kept)
    updates += 1


class BatchTopKSAE(TopKSAE):
    architecture = "batchtopk"
    config_fields = TopKSAE.config_fields | {"batchtopk_threshold_beta"}
    inference_tensors = (*TopKSAE.inference_tensors, "threshold")
    latent_axes = {**TopKSAE.latent_axes, "threshold": 0}
    # at inference z * [z > threshold]: SAELens's JumpReLU (as SAELens exports its own BatchTopK)
    saelens_architecture, saelens_training_architecture = "jumprelu", "batchtopk"
    batch_selection = True
    transcoder_k_anneal = 0.0  # its free rows keep the latents alive (sae/topk.py)
    threshold: Tensor
    threshold_updates: Tensor

    def __init__(self, cfg: SAEConfig, *, compute_dtype: torch.dtype = torch.float32) -> None:
        super().__init__(cfg, compute_dtype=compute_dtype)
        self.register_buffer("threshold", torch.zeros(cfg.d_sae))
        self.register_buffer("threshold_updates", torch.zeros((), dtype=torch.int64))

    def _select_torch(self, z: Tensor, world: int) -> sparse.BatchSelection:
        k = annealed_k(self.cfg, self.progress)
        if self.shard is not None:  # the global batch's blocks: data ranks x latent shards
            comm = self.shard.comm
            return sparse.batch_topk(z, self.b_enc.detach(), k, comm.data_ranks, comm.batch_gather)
        return sparse.batch_topk(z, self.b_enc.detach(), k, world)

    def _activation(self, z: Tensor) -> Tensor:
        return z * (z > self.threshold).to(z.dtype)

    def _fold_extra(self, latent_scale: Tensor) -> None:
        self.threshold.mul_(latent_scale)

    @torch.no_grad()
    def constrain_extra_(self) -> None:
        """None: a transcoder's rows stay free (each latent's threshold folds with its norm)."""

    def after_step(self, out: SAEOutput) -> None:
        """Fold this batch's smallest kept activation into the inference threshold."""
        m = out.stats["min_kept"].to(self.threshold)
        track_threshold(self.threshold, self.threshold_updates, m, self.cfg.batchtopk_threshold_beta)
