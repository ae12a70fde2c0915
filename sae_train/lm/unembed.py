"""The logit lens of a direction at an activation site: what it writes through the unembedding.

A residual-stream site (resid_pre/post, attn_out, mlp_out) adds its value to the stream, which
reaches the logits through the final norm and the unembedding W_U. For a direction d that is
W_U (s * d), with s the final norm's scale (its weight; Gemma's RMSNorm scales by 1 + weight;
a LayerNorm also centres d; the bias and the division by the stream's norm are left out: they do
not depend on d, so the token ranking is the norm's own up to that positive factor). The MLP's
hidden activation (mlp.hook_post) reaches the stream through the MLP's output projection
(without its bias) first. Other sites (the MLP input, raw module paths) have no linear path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from sae_train.lm.model import LanguageModel
from sae_train.lm.sites import _SITE_RE, family_of

RESIDUAL_KINDS = ("hook_resid_pre", "hook_resid_post", "hook_attn_out", "hook_mlp_out")


@dataclass
class LogitLens:
    """Maps directions [n, d_site] at one site to logits [n, vocab] (fp32)."""

    into_stream: Callable[[Tensor], Tensor]
    scale: Callable[[Tensor], Tensor]
    unembedding: Tensor
    """W_U [vocab, d_model] (rows beyond the tokenizer's vocabulary dropped)."""
    method: str
    """How directions reach the logits, in words (recorded in the output)."""

    @torch.no_grad()
    def __call__(self, directions: Tensor) -> Tensor:
        stream = self.scale(self.into_stream(directions.to(self.unembedding.device, torch.float32)))
        return (stream.to(self.unembedding.dtype) @ self.unembedding.T).float()


def _weight(module: nn.Module) -> Tensor:
    weight = module.weight
    assert isinstance(weight, Tensor), f"{type(module).__name__} has no weight tensor"
    return weight.detach()


def _norm_scale(norm: nn.Module) -> tuple[Callable[[Tensor], Tensor], str]:
    weight = _weight(norm).float()
    name = type(norm).__name__
    if isinstance(norm, nn.LayerNorm):
        return lambda d: (d - d.mean(-1, keepdim=True)) * weight, f"{name} weight (direction centred; bias left out)"
    if name.startswith("Gemma"):
        return lambda d: d * (1 + weight), f"{name} scale (1 + weight)"
    return lambda d: d * weight, f"{name} weight"


def logit_lens(lm: LanguageModel, site_name: str) -> LogitLens | None:
    """The logit lens of directions at `site_name`, or None when the site has no linear path to
    the stream (see the module docstring)."""
    match = _SITE_RE.match(site_name)
    if match is None:
        return None
    kind, site = match.group(2), lm.site(site_name)
    model: Any = lm.model  # a transformers PreTrainedModel
    if kind in RESIDUAL_KINDS:
        into_stream: Callable[[Tensor], Tensor] = lambda d: d  # noqa: E731
        path = f"residual stream ({kind})"
    elif kind == "mlp.hook_post":
        down = model.get_submodule(site.module)
        dtype = next(down.parameters()).dtype

        def into_stream(d: Tensor) -> Tensor:
            d = d.to(dtype)
            return (down(d) - down(torch.zeros_like(d[:1]))).float()

        path = f"the MLP's output projection {site.module} (bias left out)"
    else:
        return None
    norm = model.get_submodule(family_of(model).final_norm)
    scale, scale_text = _norm_scale(norm)
    vocab = len(lm.tokenizer)
    unembedding = _weight(model.get_output_embeddings())[:vocab]
    method = f"W_U · ({scale_text} ⊙ d), d through {path}"
    return LogitLens(into_stream, scale, unembedding, method)
