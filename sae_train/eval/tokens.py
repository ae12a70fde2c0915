"""Which eval text is used.

Which of its positions count is the training rule, `sae_train.data.packing.keep_mask`: a
position is *counted* when its activation would have been kept for training under the
checkpoint's text settings. Reconstruction metrics use the activations at counted positions;
the SAE and the ablations replace the site's value only there (elsewhere the clean value stays,
as the SAE never saw those tokens); CE and KL score the prediction made at position t when
position t+1 is counted.
"""

from __future__ import annotations

import math
from itertools import islice
from typing import Any

import torch

from sae_train.data import DataConfig, TextConfig, TokenSpec, iter_documents, iter_windows
from sae_train.errors import UserError


def held_out_windows(tokenizer: Any, data: DataConfig, text: TextConfig, n_tokens: int) -> torch.Tensor:
    """The first ceil(n_tokens / context_size) windows [n, context_size] of data's eval split.

    Fewer when the split is shorter; a split without one full window is an error.
    """
    if data.split != "eval":
        raise ValueError("eval windows must come from data.split='eval'")
    spec = TokenSpec.from_tokenizer(tokenizer, text)
    wanted = math.ceil(n_tokens / text.context_size)
    windows = list(islice(iter_windows(iter_documents(data), tokenizer, text, spec), wanted))
    if not windows:
        where = f"'{data.source}'" + (f" ({data.path})" if data.path else "")
        raise UserError(
            f"The eval split of data source {where} holds no text (or less than one window of "
            f"{text.context_size} tokens), so there is nothing held out to evaluate on. Raise "
            "data.eval_fraction, point data at a larger corpus, or lower context_size."
        )
    return torch.stack(windows)
