"""One SAE's latents split over ranks (`parallel.latent_shards`): the per-shard math.

Shard s of N holds latents [s * d_sae / N, (s + 1) * d_sae / N) of a d_sae-wide SAE -- the
columns of W_enc, the rows of W_dec, b_enc and the thresholds in that range (the tensors of
`SAE.latent_axes`) -- and a copy of everything else (b_dec). It is an ordinary SAE of width
d_sae / N with a `LatentShard` attached (`SAE.shard`), so the optimizer step, the decoder
renormalisation, dead-latent tracking, the BatchTopK threshold and folding work on it as on any
SAE. Its training forward always takes the PyTorch path and, where the latents meet:

- TopK: each shard picks its k best latents per token; one all_gather of their values gives
  every shard the N*k candidates of each token, among which the global top k lies, and each
  shard keeps its own winners (`LatentShard.keep_top`; ties to the lower global latent id, as in
  one process). AuxK's selection among the dead latents works the same way, over every shard.
- BatchTopK: the k*B_global largest entries over every rank's block of the global batch (data x
  latent), through `sparse.global_cut` on a gather over all of them.
- ReLU/JumpReLU: no selection.
- The partial reconstructions (and the per-token sparsity term) are summed over the shards in
  one all-reduce (`LatentShard.sum`), whose backward is the identity: every shard computes the
  same loss, and each latent's gradient comes out on its own shard. b_dec is added by shard 0
  alone, so its decoder gradient lives there; summed over the shards, b_dec's gradient is one
  process's (the trainer sums it over the shards, train/latent_shards.py).

sae/ imports no other room: the collectives come in through `LatentComm`.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from sae_train.sae import sparse


class LatentComm(Protocol):
    """The collectives of a latent-sharded SAE (implemented on torch.distributed by
    train/latent_shards.py; tests use an in-process one)."""

    rank: int
    """This shard's index among the shards of one SAE."""
    size: int
    """Shards (N)."""
    data_ranks: int
    """Data-parallel ranks: the global batch is data_ranks local batches."""

    def all_reduce_sum_(self, tensor: Tensor) -> Tensor:
        """Sum over the shards (the ranks that share this rank's batch), in place."""
        ...

    def all_gather(self, tensor: Tensor) -> Tensor:
        """[size, *tensor.shape]: every shard's tensor, by shard index."""
        ...

    def batch_gather(self, tensor: Tensor) -> tuple[Tensor, int]:
        """Over every rank holding a block of the global batch (data x latent): ([ranks,
        *tensor.shape], this rank's index)."""
        ...


def shard_range(d_sae: int, shards: int, index: int) -> tuple[int, int]:
    """Latents [start, stop) of shard `index` (contiguous, equal widths: d_sae % shards == 0)."""
    width = d_sae // shards
    return index * width, (index + 1) * width


def shard_of(tensor: Tensor, axis: int, shards: int, index: int) -> Tensor:
    """Shard `index`'s slice of a whole SAE's tensor along its latent `axis` (a view)."""
    start, stop = shard_range(tensor.shape[axis], shards, index)
    return tensor.narrow(axis, start, stop - start)


class _Sum(torch.autograd.Function):
    """Sum over the shards; the gradient passes through unchanged (every shard computes the
    same loss from the sum, so dL/d(its part) = dL/d(sum))."""

    @staticmethod
    def forward(ctx, tensor: Tensor, comm: LatentComm) -> Tensor:  # type: ignore[override]
        return comm.all_reduce_sum_(tensor.clone())

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        return g, None


@dataclass(eq=False)
class LatentShard:
    """What a shard SAE knows of the others: the collectives and the whole SAE's width."""

    comm: LatentComm
    d_sae: int
    """The whole SAE's number of latents."""

    def __deepcopy__(self, memo: dict) -> LatentShard:
        return self  # copies of a shard SAE (fold) talk to the same shards

    @property
    def start(self) -> int:
        return shard_range(self.d_sae, self.comm.size, self.comm.rank)[0]

    def sum(self, *parts: Tensor) -> list[Tensor]:
        """Each of `parts` summed over the shards, in ONE all-reduce; differentiable (backward:
        the identity)."""
        flat = _Sum.apply(torch.cat([p.reshape(-1) for p in parts]), self.comm)
        return [chunk.view_as(p) for chunk, p in zip(flat.split([p.numel() for p in parts]), parts)]

    def norm_sq(self, parts: dict[str, Tensor], latent: Collection[str]) -> Tensor:
        """The whole SAE's squared gradient norm (fp64, 0-d) from this shard's squared norm of
        each tensor (`parts`, by name): the shards' own tensors (names in `latent`) add up, a
        replicated one (equal on every shard) counts once."""
        mine = [v.double().view(1) for name, v in parts.items() if name in latent or self.comm.rank == 0]
        total = torch.cat(mine).sum().view(1) if mine else torch.zeros(1, dtype=torch.float64)
        return self.comm.all_reduce_sum_(total)[0]

    def keep_top(self, vals: Tensor, k: int) -> Tensor:
        """Which of this shard's candidates vals [B, c] (its c best latents per token, in
        ascending latent id) are among the k best of the token over every shard: bool [B*c]."""
        every = self.comm.all_gather(vals.contiguous())  # [N, B, c]
        return sparse.cut_mask(every.transpose(0, 1), k)[:, self.comm.rank].reshape(-1)
