"""The stages that own more than one room: `pipeline` (cache -> train -> eval -> export ->
inspect) and
`train` with periodic evaluation.

train/ knows nothing of eval (DESIGN.md); evaluation during training is a trainer callback,
wired here. The pipeline loads the model once, hands it to every stage, and reuses what an
earlier run finished: cache and train resume from their own on-disk state (a finished store
or run costs nothing), and eval/export are skipped when their inputs and settings are
unchanged — a fingerprint of both is kept in `<out_dir>/pipeline_state.json`; so is inspect.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from sae_train import cache, export, train
from sae_train import eval as eval_stage
from sae_train import inspect as inspect_stage
from sae_train.atomic import write_json_atomic
from sae_train.data import DataConfig, TextConfig
from sae_train.errors import UserError
from sae_train.eval.stage import data_config, text_config
from sae_train.hub import resolve_token
from sae_train.lm import LanguageModel, ModelConfig
from sae_train.lm.model import model_config
from sae_train.sae.checkpoint import CFG_FILE, WEIGHTS_FILE, find_checkpoints, read_run_state
from sae_train.store import ActivationStore
from sae_train.train.logger import MetricsLogger

STATE_FILE = "pipeline_state.json"


# ---- train with periodic eval ---------------------------------------------------------------


def _recorded_model_and_text(cfg: train.TrainConfig) -> tuple[ModelConfig, DataConfig, TextConfig]:
    """The model, data and text settings behind the training activations."""
    if cfg.source == "live":
        return cfg.model, cfg.data, cfg.text
    spec = ActivationStore(cfg.store).manifest.spec
    if "model" not in spec or "data" not in spec:
        raise UserError(
            f"eval_every_tokens needs a store written by `sae-train cache`; {cfg.store} records no model/data."
        )
    # The recorded model (name, revision, dtype) on the device training runs on.
    model = model_config(spec["model"], ModelConfig(name="", device=cfg.device))
    return model, data_config(spec["data"]), text_config(spec.get("text"))


def periodic_eval(cfg: train.TrainConfig, lm: LanguageModel | None = None) -> train.Callback:
    """A trainer callback evaluating every SAE on the same held-out tokens every
    `eval_every_tokens` tokens and at the end (rank 0 only; it makes no collective calls)."""
    model, data, text = _recorded_model_and_text(cfg)
    lm = lm or LanguageModel.load(model)
    periodic = eval_stage.PeriodicEval.from_data(lm, data, text, n_tokens=cfg.eval_tokens)
    every = max(1, cfg.eval_every_tokens // cfg.batch_size)

    def callback(info: train.StepInfo) -> dict[str, dict[str, float]] | None:
        if not info.is_main or (info.step % every and info.step != info.n_steps):
            return None
        return periodic({run.tag: (run.layers or run.site, run.inference()) for run in info.runs})

    return callback


def log_eval_to_wandb(cfg: train.TrainConfig, evaluation: eval_stage.EvalSummary) -> None:
    """Add the eval table and density plot to the training run's W&B run (same run id)."""
    state = read_run_state(Path(cfg.out_dir))
    if not cfg.wandb.enabled or not state or not state.get("wandb_id"):
        return
    logger = MetricsLogger(Path(cfg.out_dir), True, cfg.wandb, state["config"], run_id=state["wandb_id"])
    try:
        rows = [
            {"sae": name, "site": info["site"], "architecture": info["architecture"], **info["metrics"]}
            for name, info in evaluation.saes.items()
        ]
        summary = {
            f"{row['sae']}/eval/{key}": value
            for row in rows
            for key, value in row.items()
            if isinstance(value, (int, float))
        }
        logger.log_results(summary, {"eval/table": rows}, {"eval/density": Path(evaluation.out_dir) / "density.png"})
    finally:
        logger.close()


def train_stage(cfg: train.TrainConfig, lm: LanguageModel | None = None) -> train.TrainSummary:
    """`sae-train train`: the trainer, plus periodic eval when eval_every_tokens > 0."""
    callbacks = [periodic_eval(cfg, lm)] if cfg.eval_every_tokens > 0 else []
    return train.run(cfg, callbacks, lm=lm if cfg.source == "live" else None)


# ---- the pipeline ------------------------------------------------------------------------------


@dataclass
class PipelineConfig:
    """`sae-train pipeline`: every stage on one model; each stage's settings are overridable
    (cache.n_tokens=..., train.sae.k=..., eval.n_tokens=..., export.push_to_hub=true ...)."""

    out_dir: str = "runs/demo"
    """Root of every artifact: acts/ (store), sae/ (checkpoints), eval/, export/."""
    site: str = "blocks.8.hook_resid_post"
    """The activation site cached and trained on (sae_train/conf/pipeline.yaml passes it to the stages)."""
    n_tokens: int = 1_000_000
    """Tokens cached and trained on (sae_train/conf/pipeline.yaml passes it to the stages)."""
    cache: cache.CacheConfig = field(default_factory=cache.CacheConfig)
    train: train.TrainConfig = field(default_factory=lambda: train.TrainConfig(store="runs/demo/acts"))
    eval: eval_stage.EvalConfig = field(default_factory=lambda: eval_stage.EvalConfig(checkpoint="runs/demo/sae"))
    export: export.ExportConfig = field(default_factory=lambda: export.ExportConfig(checkpoint="runs/demo/sae"))
    inspect: inspect_stage.InspectConfig = field(
        default_factory=lambda: inspect_stage.InspectConfig(checkpoint="runs/demo/sae", store="runs/demo/acts")
    )


@dataclass
class PipelineSummary:
    out_dir: str
    seconds: float
    cache: cache.CacheSummary
    train: train.TrainSummary
    eval: eval_stage.EvalSummary
    export: export.ExportSummary | ReusedExport
    inspect: inspect_stage.InspectSummary | ReusedExport
    reused: list[str]

    def table(self) -> str:
        sections = [
            ("cache", self.cache.table()),
            ("train", self.train.table()),
            ("eval", self.eval.table()),
            ("export", self.export.table()),
            ("inspect", self.inspect.table()),
        ]
        lines = []
        for name, text in sections:
            lines += [f"== {name}{' (reused)' if name in self.reused else ''} ==", text, ""]
        lines += [
            "== artifacts ==",
            f"activation store   {self.cache.out_dir}",
            *(f"checkpoint         {info['checkpoint']}" for info in self.train.saes.values()),
            f"metrics            {Path(self.train.out_dir) / 'metrics.jsonl'}",
            f"eval report        {Path(self.eval.out_dir) / 'eval.md'} (eval.json, density.png)",
            f"SAELens export     {self.export.out_dir} (README.md model card)",
            f"feature browser    {Path(self.inspect.out_dir) / 'index.html'} (open it from disk)",
            f"pipeline finished in {self.seconds / 60:.1f} min",
        ]
        return "\n".join(lines)


def _checkpoint_digest(root: str) -> str:
    """Hash of the files eval and export read: every checkpoint's weights and cfg below `root`."""
    base, directories = find_checkpoints(root)
    digest = hashlib.sha256()
    for directory in directories:
        for name in (CFG_FILE, WEIGHTS_FILE):
            digest.update(str((directory / name).relative_to(base)).encode())
            digest.update(hashlib.sha256((directory / name).read_bytes()).digest())
    return digest.hexdigest()


def _fingerprint(settings: dict, checkpoints: str) -> str:
    """Hash of a stage's settings and of the checkpoints it reads (a `_checkpoint_digest`)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode() + checkpoints.encode()).hexdigest()


def _reusable(state: dict, stage: str, fingerprint: str, output: Path) -> bool:
    return state.get(stage, {}).get("fingerprint") == fingerprint and output.exists()


@dataclass
class ReusedExport:
    """An export (or inspect output) a previous run wrote from the same inputs."""

    out_dir: str
    text: str

    def table(self) -> str:
        return self.text


def run(cfg: PipelineConfig) -> PipelineSummary:
    started = time.perf_counter()
    out = Path(cfg.out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"out_dir={out} is a file; choose a directory.")
    if cfg.export.push_to_hub:
        resolve_token()  # a missing hub token fails now, not after caching and training
    state_path = out / STATE_FILE
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    reused: list[str] = []

    lm = LanguageModel.load(cfg.cache.model)
    cache_summary = cache.run(cfg.cache, lm)
    if cache_summary.written_tokens == 0:
        reused.append("cache")
    train_summary = train_stage(cfg.train, lm)
    if train_summary.new_steps == 0:
        reused.append("train")

    # eval and export read the same checkpoints unless configured otherwise: hash each tree once
    digests = {root: _checkpoint_digest(root) for root in {cfg.eval.checkpoint, cfg.export.checkpoint}}
    eval_key = _fingerprint(asdict(cfg.eval), digests[cfg.eval.checkpoint])
    eval_json = Path(cfg.eval.out_dir) / "eval.json"
    if _reusable(state, "eval", eval_key, eval_json):
        eval_summary = eval_stage.EvalSummary(out_dir=cfg.eval.out_dir, payload=json.loads(eval_json.read_text()))
        reused.append("eval")
    else:
        eval_summary = eval_stage.run(cfg.eval, lm)
        log_eval_to_wandb(cfg.train, eval_summary)
        state["eval"] = {"fingerprint": eval_key}
        write_json_atomic(state_path, state)

    export_key = _fingerprint(asdict(cfg.export) | {"eval": eval_key}, digests[cfg.export.checkpoint])
    export_summary: export.ExportSummary | ReusedExport
    if _reusable(state, "export", export_key, Path(cfg.export.out_dir) / "README.md") and not cfg.export.push_to_hub:
        export_summary = ReusedExport(cfg.export.out_dir, state["export"]["table"])
        reused.append("export")
    else:
        export_summary = export.run(cfg.export)
        state["export"] = {"fingerprint": export_key, "table": export_summary.table()}
        write_json_atomic(state_path, state)

    # The demo's browser over (at most) the store it cached.
    inspect_cfg = replace(cfg.inspect, n_tokens=min(cfg.inspect.n_tokens, cache_summary.n_tokens))
    digest = digests.get(inspect_cfg.checkpoint) or _checkpoint_digest(inspect_cfg.checkpoint)
    inspect_key = _fingerprint(asdict(inspect_cfg), digest)
    inspect_summary: inspect_stage.InspectSummary | ReusedExport
    if _reusable(state, "inspect", inspect_key, Path(inspect_cfg.out_dir) / "index.html"):
        inspect_summary = ReusedExport(inspect_cfg.out_dir, state["inspect"]["table"])
        reused.append("inspect")
    else:
        inspect_summary = inspect_stage.run(inspect_cfg, lm)
        state["inspect"] = {"fingerprint": inspect_key, "table": inspect_summary.table()}
        write_json_atomic(state_path, state)

    return PipelineSummary(
        out_dir=str(out),
        seconds=time.perf_counter() - started,
        cache=cache_summary,
        train=train_summary,
        eval=eval_summary,
        export=export_summary,
        inspect=inspect_summary,
        reused=reused,
    )
