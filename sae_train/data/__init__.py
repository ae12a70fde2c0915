"""Text sources and packing into model-ready token windows."""

from sae_train.data.packing import TextConfig, TokenSpec, iter_windows
from sae_train.data.sources import DataConfig, iter_documents

__all__ = ["DataConfig", "TextConfig", "TokenSpec", "iter_documents", "iter_windows"]
