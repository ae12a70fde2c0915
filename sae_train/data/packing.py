"""Tokenize documents and pack them into fixed-length context windows.

Documents are tokenized without special tokens and concatenated with a separator (EOS, or
BOS where there is no EOS) between them; the stream is cut into windows of `context_size`
tokens, each starting with BOS when `prepend_bos` is set (the SAELens convention). Windows
are a pure function of the documents and these settings, so any rank can recompute the
window index of any token.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Any

import torch

from sae_train.errors import UserError


@dataclass
class TextConfig:
    """How text becomes the token stream the activations come from: the `text` field of the
    cache and live-training configs, recorded in stores and checkpoints, and read back by eval."""

    context_size: int = 256
    """Tokens per window (the model's sequence length)."""
    prepend_bos: bool = True
    """Start every window with the BOS token, as most models were trained."""
    exclude_special_tokens: bool = True
    """Leave activations at special tokens (BOS, EOS, padding) out of the data: their huge norms
    (attention sinks) would dominate an SAE's loss. The model still sees them."""

    def __post_init__(self) -> None:
        if self.context_size < 2:
            raise UserError(f"context_size={self.context_size} is too small; use at least 2 (typically 128-1024).")


@dataclass(frozen=True)
class TokenSpec:
    """The token ids packing uses, and those whose activations are left out, resolved from a tokenizer."""

    bos: int | None
    separator: int
    special: tuple[int, ...]
    excluded: tuple[int, ...]
    """Token ids whose activations no stage uses: `special` when the text settings exclude
    special tokens, else none."""

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, text: TextConfig) -> TokenSpec:
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        separator = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else bos
        if separator is None or (text.prepend_bos and bos is None):
            raise UserError(
                "The tokenizer has neither a BOS nor an EOS token, so documents cannot be separated. "
                "Set prepend_bos=false and use a tokenizer with an EOS token."
            )
        special = tuple(sorted(set(tokenizer.all_special_ids) | {separator} | ({bos} if bos is not None else set())))
        return cls(
            bos=bos if text.prepend_bos else None,
            separator=separator,
            special=special,
            excluded=special if text.exclude_special_tokens else (),
        )


def keep_mask(token_ids: torch.Tensor, tokens: TokenSpec) -> torch.Tensor:
    """Which tokens' activations count: the one rule for the store, live training and eval.

    Every token, or every token but the special ones (BOS, EOS, padding...) when the text
    settings exclude them; a bool tensor shaped like `token_ids`, on its device.
    """
    if not tokens.excluded:
        return torch.ones_like(token_ids, dtype=torch.bool)
    return ~torch.isin(token_ids, torch.tensor(tokens.excluded, device=token_ids.device))


def _token_stream(documents: Iterable[str], tokenizer: Any, separator: int, batch_docs: int) -> Iterator[list[int]]:
    docs = iter(documents)
    while batch := list(islice(docs, batch_docs)):
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            if ids:
                yield ids + [separator]


def iter_windows(
    documents: Iterable[str], tokenizer: Any, text: TextConfig, tokens: TokenSpec, batch_docs: int = 32
) -> Iterator[torch.Tensor]:
    """Successive int64 windows [context_size]; a final partial window is dropped."""
    body = text.context_size - (1 if tokens.bos is not None else 0)
    buffer: list[int] = []
    for ids in _token_stream(documents, tokenizer, tokens.separator, batch_docs):
        buffer.extend(ids)
        start = 0
        while len(buffer) - start >= body:
            chunk = buffer[start : start + body]
            start += body
            yield torch.tensor(([tokens.bos] if tokens.bos is not None else []) + chunk, dtype=torch.int64)
        del buffer[:start]
