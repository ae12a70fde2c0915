"""BatchTopK SAE (Bussmann et al. 2024): during training the k*B largest ReLU'd
pre-activations of the whole batch are kept, so L0 averages k per token but adapts per token.

Inference cannot depend on the batch, so it uses f = z * [z > threshold] with one threshold,
estimated during training as an EMA (factor cfg.batchtopk_threshold_beta) of the smallest
activation kept per batch (dictionary_learning's estimator), updated in `after_step`. The
first update sets it (until then it is 0: inference would be a plain ReLU). AuxK and the
unit-norm decoder are as in TopK.

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
from sae_train.sae.topk import TopKSAE


class BatchTopKSAE(TopKSAE):
    architecture = "batchtopk"
    config_fields = TopKSAE.config_fields | {"batchtopk_threshold_beta"}
    inference_tensors = (*TopKSAE.inference_tensors, "threshold")
    latent_axes = {**TopKSAE.latent_axes, "threshold": 0}
    # at inference z * [z > threshold]: SAELens's JumpReLU (as SAELens exports its own BatchTopK)
    saelens_architecture, saelens_training_architecture = "jumprelu", "batchtopk"
    batch_selection = True
    threshold: Tensor
    threshold_updates: Tensor

    def __init__(self, cfg: SAEConfig, *, compute_dtype: torch.dtype = torch.float32) -> None:
        super().__init__(cfg, compute_dtype=compute_dtype)
        self.register_buffer("threshold", torch.zeros(cfg.d_sae))
        self.register_buffer("threshold_updates", torch.zeros((), dtype=torch.int64))

    def _select_torch(self, z: Tensor, world: int) -> sparse.BatchSelection:
        if self.shard is not None:  # the global batch's blocks: data ranks x latent shards
            comm = self.shard.comm
            return sparse.batch_topk(z, self.b_enc.detach(), self.cfg.k, comm.data_ranks, comm.batch_gather)
        return sparse.batch_topk(z, self.b_enc.detach(), self.cfg.k, world)

    def _activation(self, z: Tensor) -> Tensor:
        return z * (z > self.threshold).to(z.dtype)

    def _fold_extra(self, latent_scale: Tensor) -> None:
        self.threshold.mul_(latent_scale)

    @torch.no_grad()
    def after_step(self, out: SAEOutput) -> None:
        """Fold this batch's smallest kept activation into the inference threshold (EMA)."""
        m = out.stats["min_kept"].to(self.threshold)
        beta = self.cfg.batchtopk_threshold_beta
        ema = self.threshold * beta + (1 - beta) * m
        self.threshold.copy_(torch.where(self.threshold_updates == 0, m, ema))  # on the device: no sync
        self.threshold_updates += 1
