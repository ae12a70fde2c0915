"""sae_train: train, evaluate and publish sparse autoencoders on language-model activations."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("sae-train")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
