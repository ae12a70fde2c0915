"""Our inference SAE from an EleutherAI sparsify SparseCoder (dicts and tensors only).

sparsify (github.com/EleutherAI/sparsify, read at 1.3.3) saves a coder as `cfg.json` (its
SparseCoderConfig fields plus d_in) and `sae.safetensors` with `encoder.weight` [d_sae, d_in],
`encoder.bias`, `W_dec` [d_sae, d_in], `b_dec` [d_in] and, with a skip connection, `W_skip`
[d_in, d_in]. Its forward (sparse_coder.py, fused_encoder.py):

    autoencoder: f = top-k of relu((x - b_dec) @ encoder.weight.T + encoder.bias)
    transcoder:  f = top-k of relu(x @ encoder.weight.T + encoder.bias)
    out = f @ W_dec + b_dec [+ x @ W_skip.T]

which is our `topk` (relu of the top k equals the top k of relu: the same nonzero values), with
W_enc = encoder.weight.T and our W_skip = theirs transposed. A sparsify transcoder writes the
output of the module whose input it reads, so its output width is d_in and the site it writes is
not in its files: the caller names it (`target`). The weights are taken as they are (a coder
trained by sparsify leaves its last step's decoder rows a hair off unit norm), so the converted
SAE computes exactly what sparsify computes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from sae_train.errors import UserError
from sae_train.sae.base import SAE
from sae_train.sae.config import SAEConfig
from sae_train.sae.registry import load_folded


def from_sparsify(
    cfg: Mapping[str, Any], tensors: Mapping[str, Tensor], *, target: str = "", source: str = "sparsify SparseCoder"
) -> SAE:
    """Our folded `topk` SAE (or transcoder writing `target`) computing what the sparsify
    SparseCoder with config `cfg` (its cfg.json dict) and weights `tensors` computes.
    `source` names the input in error messages."""
    activation, transcode = cfg.get("activation", "topk"), bool(cfg.get("transcode", False))
    if activation != "topk":
        raise UserError(f"{source}: activation={activation!r}; sae_train runs sparsify's topk coders only.")
    if transcode != bool(target):
        raise UserError(
            f"{source}: transcode={transcode} but target={target!r}. A sparsify transcoder needs the site it "
            "writes (target=..., e.g. blocks.8.hook_mlp_out); an autoencoder takes none."
        )
    skip = bool(cfg.get("skip_connection", False))
    d_in, k = cfg.get("d_in"), cfg.get("k")
    if not isinstance(d_in, int) or not isinstance(k, int) or d_in <= 0 or k <= 0:
        raise UserError(f"{source}: d_in={d_in!r}, k={k!r}; expected positive integers.")
    names = ["encoder.weight", "encoder.bias", "W_dec", "b_dec", *(["W_skip"] if skip else [])]
    missing = [n for n in names if n not in tensors]
    if missing:
        raise UserError(f"{source}: no {missing} among its tensors {sorted(tensors)}; the file is incomplete.")
    weights = {n: tensors[n].detach().to("cpu", torch.float32) for n in names}
    ours = {
        "W_enc": weights["encoder.weight"].t().contiguous(),
        "b_enc": weights["encoder.bias"],
        "W_dec": weights["W_dec"],
        "b_dec": weights["b_dec"],
    }
    if skip:
        ours["W_skip"] = weights["W_skip"].t().contiguous()
    fields: dict[str, Any] = {"architecture": "topk", "d_sae": ours["W_enc"].shape[1], "k": k}
    if transcode:
        fields |= {"target": target, "skip": skip}
    return load_folded(SAEConfig(**fields).resolved(d_in, d_in), ours, source=source)
