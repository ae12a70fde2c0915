"""Steering a model through its SAEs and transcoders: `sae-train steer` and a Python API.

    from sae_train.steer import load, steering
    sae = load("runs/demo/sae/blocks.8.hook_resid_post")
    with steering(model, sae, {123: 8.0}, mode="add", positions="all"):
        model.generate(...)

Imports sae, lm and data; nothing of train or eval.
"""

from sae_train.steer.checkpoints import act_max, load
from sae_train.steer.config import SteerConfig
from sae_train.steer.intervene import steering
from sae_train.steer.stage import SteerSummary, run

__all__ = ["SteerConfig", "SteerSummary", "act_max", "load", "run", "steering"]
