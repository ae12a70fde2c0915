"""`sae-train <stage> key=value ...`: Hydra entry points, and nothing else.

Each stage is a typed dataclass config (registered below as a Hydra structured config, so a
wrong key or type fails before any work) and a plain `run(cfg)` function elsewhere in the
package. This module only maps one onto the other and turns `UserError` into a readable
message and a non-zero exit.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sae_train.errors import UserError

CONF_DIR = Path(__file__).resolve().parent / "conf"  # shipped inside the package (package data)
USAGE = """usage: sae-train [-m] <stage> [key=value ...]

stages:
  cache     run a model over text and store site activations
  train     train SAEs on a store (store=...) or live from the model (source=live)
  eval      reconstruction, sparsity and downstream-loss metrics of checkpoints
  inspect   feature records (top/quantile examples, logit lens) and a static browser
  export    write checkpoints in the SAELens layout (and push them to the hub)
  pipeline  all of the above on the embedded default model
  steer     generate with SAE/transcoder latents added, clamped or ablated

-m runs a Hydra multirun sweep (e.g. sae-train -m train sae.k=16,32,64). Options of a stage:
sae-train <stage> --cfg job"""


VERBATIM = {"steer": ("prompt",)}
"""Free-text settings of a stage, handed to Hydra as quoted strings: `prompt=def f(x):` is the
text itself, not Hydra override syntax (whose parentheses, colons and quotes would need quoting)."""


def _verbatim(stage: str, args: list[str]) -> list[str]:
    """args with each `key=text` of VERBATIM[stage] quoted for Hydra's override parser (a quote,
    and backslashes before a quote or at the end, escaped)."""

    def quote(text: str) -> str:
        return "'" + re.sub(r"(\\*)('|$)", lambda m: m.group(1) * 2 + ("\\'" if m.group(2) else ""), text) + "'"

    keys = VERBATIM.get(stage, ())
    out = []
    for arg in args:
        key, eq, text = arg.partition("=")
        out.append(f"{key}={quote(text)}" if eq and key in keys else arg)
    return out


def _stages() -> dict[str, tuple[type, Callable[[Any], Any]]]:
    """stage name -> (config dataclass, run function); imported lazily to keep --help fast."""
    from sae_train import cache, export, pipeline, steer, train
    from sae_train import eval as eval_stage  # not the builtin
    from sae_train import inspect as inspect_stage  # not the standard library's

    return {
        "cache": (cache.CacheConfig, _report(cache.run)),
        "train": (train.TrainConfig, _report(pipeline.train_stage)),
        "eval": (eval_stage.EvalConfig, _report(eval_stage.run)),
        "inspect": (inspect_stage.InspectConfig, _report(inspect_stage.run)),
        "export": (export.ExportConfig, _report(export.run)),
        "pipeline": (pipeline.PipelineConfig, _report(pipeline.run)),
        "steer": (steer.SteerConfig, _report(steer.run)),
    }


def _report(run: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def run_and_print(cfg: Any) -> Any:
        summary = run(cfg)
        from sae_train.distenv import is_main_process

        if is_main_process():  # one summary per job, not one per DDP rank
            print(summary.table())
        return summary

    return run_and_print


def _register(stages: dict[str, tuple[type, Callable[[Any], Any]]]) -> None:
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for name, (schema, _) in stages.items():
        store.store(name=f"{name}_schema", node=schema)


def _split_stage(argv: list[str], stages: dict) -> tuple[str | None, list[str]]:
    for i, arg in enumerate(argv):
        if arg in stages:
            return arg, argv[:i] + argv[i + 1 :]
    return None, argv


def main() -> None:
    stages = _stages()
    stage, rest = _split_stage(sys.argv[1:], stages)
    if stage is None:
        print(USAGE, file=sys.stderr)
        sys.exit(0 if any(a in ("-h", "--help") for a in rest) else 2)
    _register(stages)
    _, run = stages[stage]

    import hydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import DictConfig, OmegaConf

    from sae_train.train import Preempted

    def task(cfg: DictConfig) -> None:
        logging.getLogger("sae_train").setLevel(logging.INFO)
        if HydraConfig.get().mode == RunMode.MULTIRUN and "out_dir" in cfg:
            # Each job of a sweep writes to its own directory: <out_dir>/<its overrides>.
            cfg.out_dir = HydraConfig.get().runtime.output_dir
        multirun = HydraConfig.get().mode == RunMode.MULTIRUN
        try:
            run(OmegaConf.to_object(cfg))
        except (UserError, Preempted) as err:
            message = f"sae-train {stage}: {'error: ' if isinstance(err, UserError) else ''}{err}"
            if multirun:
                # An exception lets Hydra/submitit record this job's failure and run the others.
                raise RuntimeError(message) from None
            print(f"\n{message}", file=sys.stderr)
            sys.exit(err.exit_code if isinstance(err, Preempted) else 1)

    sys.argv = [f"sae-train {stage}", *_verbatim(stage, rest)]
    hydra.main(config_path=str(CONF_DIR), config_name=stage, version_base="1.3")(task)()


if __name__ == "__main__":
    main()
