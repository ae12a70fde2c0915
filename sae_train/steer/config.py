"""`sae-train steer` configuration, and the `features` notation it reads."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

from sae_train.errors import UserError
from sae_train.lm import ModelConfig
from sae_train.steer.intervene import MODES, POSITIONS

FeatureSpec = dict[str, dict[int, float] | list[int]]
"""Dictionary key ("" = the only checkpoint) -> {latent: value} or [latent, ...]."""

_FEATURES_HELP = (
    "Write features={123: 8.0, 456: -4.0} (latent: value, one checkpoint), features=[123, 456] (latents "
    "alone, for mode=ablate or effect=true), or, with several checkpoints, keyed by checkpoint name or site: "
    "features='{blocks.8.hook_resid_post: {123: 8.0}, blocks.4.hook_resid_post: [7]}'."
)


def _latents(value: Any, where: str) -> dict[int, float] | list[int]:
    if not isinstance(value, dict | list):
        raise UserError(f"features{where}: expected {{latent: value}} or [latents], got {value!r}. {_FEATURES_HELP}")
    for latent in value:
        if isinstance(latent, bool) or not isinstance(latent, int):
            raise UserError(f"features{where}: latent {latent!r} is not an integer id. {_FEATURES_HELP}")
    if isinstance(value, list):
        return list(dict.fromkeys(value))
    for latent, number in value.items():
        if isinstance(number, bool) or not isinstance(number, int | float):
            raise UserError(
                f"features{where}: the value of latent {latent} is {number!r}, not a number. {_FEATURES_HELP}"
            )
    return {latent: float(number) for latent, number in value.items()}


def parse_features(raw: Any) -> FeatureSpec:
    """The `features` setting (a string in YAML flow notation, or what Hydra parsed) as
    {checkpoint key: latents}; a UserError naming the problem when malformed."""
    if isinstance(raw, str):
        try:
            raw = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise UserError(f"features={raw!r} is not readable ({err}). {_FEATURES_HELP}") from None
    if isinstance(raw, int) and not isinstance(raw, bool):
        raw = [raw]
    if not raw or not isinstance(raw, dict | list):
        raise UserError(f"features={raw!r}: name the latents to steer. {_FEATURES_HELP}")
    if isinstance(raw, dict) and all(isinstance(v, dict | list) for v in raw.values()):
        return {str(key): _latents(value, f"[{key}]") for key, value in raw.items()}
    return {"": _latents(raw, "")}


@dataclass
class SteerConfig:
    """Generate from a prompt with and without latents of SAEs/transcoders steered."""

    checkpoint: Any = ""
    """A checkpoint directory, a directory holding several (a training out_dir), or a list of
    them: every dictionary found can be steered."""
    prompt: str = ""
    """The text to continue (the model's BOS is prepended where the checkpoints' text settings
    did so in training)."""
    features: Any = None
    """Latents to steer: {latent: value}, [latents] (ablate), or per checkpoint
    {name or site: {latent: value}}. A string is read as YAML, so quoting is always safe."""
    mode: str = "add"
    """add: value x the latent's decoder direction; clamp: set the latent to value through the
    SAE, keeping its reconstruction error; ablate: clamp to 0."""
    positions: str = "all"
    """prompt | generated | all: the token positions steered."""
    inspect_dir: str = ""
    """An `sae-train inspect` out_dir: add/clamp values are then multiples of each latent's
    act_max there (its typical maximum activation). Empty: raw activation units."""
    model: ModelConfig = field(default_factory=lambda: ModelConfig(name=""))
    """The language model; name "" = the one the checkpoints recorded."""
    max_new_tokens: int = 40
    temperature: float = 0.0
    """0 = greedy; above 0 samples at this temperature, reproducibly for a given seed."""
    seed: int = 0
    effect: bool = False
    """Also list, for each feature, the next-token logits that ablating it (at every prompt
    position) moves most."""
    effect_top: int = 10
    """Tokens listed per direction (raised, lowered) by effect=true."""
    out_dir: str = "runs/steer"
    """Where steer.json goes."""

    def __post_init__(self) -> None:
        if isinstance(self.checkpoint, str):
            self.checkpoint = [self.checkpoint] if self.checkpoint else []
        self.checkpoint = [str(c) for c in self.checkpoint]
        if not self.checkpoint:
            raise UserError(
                "checkpoint is empty; pass checkpoint=<a checkpoint directory, a training out_dir or a list>."
            )
        if not self.prompt:
            raise UserError('prompt is empty; pass prompt="<text to continue>".')
        self.features = parse_features(self.features)
        if self.mode not in MODES:
            raise UserError(f"mode={self.mode!r}; use one of {', '.join(MODES)}.")
        if self.positions not in POSITIONS:
            raise UserError(f"positions={self.positions!r}; use one of {', '.join(POSITIONS)}.")
        if self.max_new_tokens < 1 or self.effect_top < 1:
            raise UserError(
                f"max_new_tokens={self.max_new_tokens} and effect_top={self.effect_top} must be at least 1."
            )
        if self.temperature < 0:
            raise UserError(f"temperature={self.temperature} must be 0 (greedy) or positive.")
