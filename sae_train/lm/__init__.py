"""The model side: loading, activation sites, capture and splicing."""

from sae_train.lm.hooks import SharedPrefix, capture, splice, splice_from
from sae_train.lm.model import LanguageModel, ModelConfig
from sae_train.lm.sites import Site, resolve_site

__all__ = ["LanguageModel", "ModelConfig", "SharedPrefix", "Site", "capture", "resolve_site", "splice", "splice_from"]
