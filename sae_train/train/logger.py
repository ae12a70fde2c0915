"""Training metrics: a JSONL file always, Weights & Biases when enabled (rank 0 only).

W&B runs offline when no API key is configured, so `wandb.enabled=true` works on an air-gapped
machine (sync later with `wandb sync`). The run id is kept in the checkpoint so a resumed
training continues the same W&B run.
"""

from __future__ import annotations

import json
import logging
import math
import netrc
import os
from pathlib import Path
from typing import Any

from sae_train.errors import UserError
from sae_train.train.config import WandbConfig

log = logging.getLogger(__name__)


def wandb_mode(cfg: WandbConfig) -> Any:
    if cfg.mode != "auto":
        return cfg.mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        has_login = netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        has_login = False
    return "online" if has_login else "offline"


class MetricsLogger:
    """Writes one JSON line per (step, SAE) and mirrors it to W&B."""

    def __init__(self, out_dir: Path, enabled: bool, wandb_cfg: WandbConfig, config: dict, run_id: str = ""):
        self.enabled = enabled
        self.path = out_dir / "metrics.jsonl"
        self.run_id = run_id
        self._wandb: Any = None
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        if wandb_cfg.enabled:
            try:
                import wandb
            except ImportError as err:
                raise UserError(
                    "wandb.enabled=true but the wandb package is not installed: pip install wandb."
                ) from err
            self._wandb = wandb.init(
                project=wandb_cfg.project,
                entity=wandb_cfg.entity or None,
                name=wandb_cfg.name or out_dir.name,
                dir=str(out_dir),
                config=config,
                id=run_id or None,
                resume="allow",
                mode=wandb_mode(wandb_cfg),
            )
            self.run_id = self._wandb.id
            log.info("W&B run %s (%s) in %s", self.run_id, wandb_mode(wandb_cfg), self._wandb.dir)

    def rewind(self, step: int) -> None:
        """Drop the rows after `step` (and a line torn by a kill): a run that stopped after its
        last checkpoint logged them, and the resumed run logs those steps again."""
        if not self.enabled or not self.path.exists():
            return
        data = self.path.read_bytes()
        keep = 0
        for line in data.splitlines(keepends=True):  # steps only grow down the file: keep a prefix
            if _step(line) > step:
                break
            keep += len(line)
        if keep < len(data):
            os.truncate(self.path, keep)  # in place: a kill leaves the old file or the shorter one

    def log(self, step: int, tokens: int, tag: str, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": step, "tokens": tokens, "sae": tag, **{k: _plain(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._wandb is not None:
            self._wandb.log({f"{tag}/{k}": v for k, v in metrics.items()} | {"tokens": tokens}, step=step)

    def log_results(
        self, summary: dict[str, Any], tables: dict[str, list[dict[str, Any]]], images: dict[str, Path]
    ) -> None:
        """Results computed after training (an eval): numbers into the W&B run summary, rows as
        W&B tables, PNGs as images. No-op without W&B."""
        if self._wandb is None:
            return
        import wandb

        self._wandb.summary.update(summary)
        logged: dict[str, Any] = {name: wandb.Image(str(path)) for name, path in images.items()}
        for name, rows in tables.items():
            columns = list(rows[0]) if rows else []
            logged[name] = wandb.Table(
                columns=list[str | int](columns), data=[[row.get(c) for c in columns] for row in rows]
            )
        self._wandb.log(logged)

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _step(line: bytes) -> float:
    """The step of a metrics line; infinite for a line a kill cut short."""
    try:
        return json.loads(line)["step"] if line.endswith(b"\n") else math.inf
    except (ValueError, KeyError, TypeError):
        return math.inf


def _plain(value: float) -> float | None:
    """JSON has no NaN/inf: write them as null so the file stays standard JSON."""
    return None if isinstance(value, float) and not math.isfinite(value) else value
