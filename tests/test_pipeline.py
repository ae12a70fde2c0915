"""The pipeline and the command line, end to end on a tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SITE = "blocks.1.hook_resid_post"


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sae_train.cli", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=os.environ | {"OMP_NUM_THREADS": "1"} | (env or {}),
    )


def pipeline_args(model: Path, out: Path) -> list[str]:
    return [
        "pipeline",
        f"out_dir={out}",
        f"site={SITE}",
        "n_tokens=8192",
        f"cache.model.name={model}",
        "cache.model.dtype=float32",
        "cache.text.context_size=32",
        "cache.tokens_per_shard=2048",
        "cache.progress=false",
        "train.batch_size=512",
        "train.progress=false",
        "train.sae.k=4",
        "train.sae.expansion_factor=2",
        "eval.n_tokens=1024",
        "eval.progress=false",
        "inspect.progress=false",
    ]


def test_pipeline_runs_every_stage_then_reuses_them(tiny_model_dir, tmp_path):
    out = tmp_path / "demo"
    first = cli(*pipeline_args(tiny_model_dir("llama"), out))
    assert first.returncode == 0, first.stderr[-3000:]
    for section in ("== cache ==", "== train ==", "== eval ==", "== export ==", "== inspect ==", "== artifacts =="):
        assert section in first.stdout
    assert "CE recovered" in first.stdout
    for artifact in (
        "acts/manifest.json",
        f"sae/{SITE}/sae.safetensors",
        "eval/eval.md",
        "eval/density.png",
        f"export/{SITE}/sae_weights.safetensors",
        "export/README.md",
        "inspect/index.html",
        f"inspect/{SITE}/inspect.json",
    ):
        assert (out / artifact).exists(), artifact
    eval_json = (out / "eval" / "eval.json").read_bytes()

    again = cli(*pipeline_args(tiny_model_dir("llama"), out))
    assert again.returncode == 0, again.stderr[-3000:]
    for stage in ("cache", "train", "eval", "export", "inspect"):
        assert f"== {stage} (reused) ==" in again.stdout
    assert f"feature browser    {out / 'inspect' / 'index.html'}" in again.stdout
    # The store holds fewer rows than inspect's default budget: inspect reads all of them.
    assert json.loads((out / "inspect" / SITE / "inspect.json").read_text())["n_tokens"] < 100_000
    assert (out / "eval" / "eval.json").read_bytes() == eval_json

    # Changing the eval budget redoes eval (and export, which shows its numbers), nothing else.
    third = cli(*pipeline_args(tiny_model_dir("llama"), out), "eval.n_tokens=2048")
    assert "== eval ==" in third.stdout and "== export ==" in third.stdout and "== train (reused) ==" in third.stdout
    assert json.loads((out / "eval" / "eval.json").read_text())["config"]["n_tokens"] == 2048


def test_bad_configuration_fails_before_any_work(tiny_model_dir, tmp_path):
    out = tmp_path / "demo"
    wrong_key = cli(*pipeline_args(tiny_model_dir("llama"), out), "train.sae.kk=3")
    assert wrong_key.returncode == 1 and "kk" in wrong_key.stderr
    wrong_type = cli(*pipeline_args(tiny_model_dir("llama"), out), "train.batch_size=big")
    assert wrong_type.returncode == 1 and "batch_size" in wrong_type.stderr
    no_repo = cli(*pipeline_args(tiny_model_dir("llama"), out), "export.push_to_hub=true")
    assert no_repo.returncode == 1 and "repo_id" in no_repo.stderr
    no_token = cli(
        *pipeline_args(tiny_model_dir("llama"), out),
        "export.push_to_hub=true",
        "export.repo_id=me/saes",
        env={"HF_TOKEN": "", "HF_HOME": str(tmp_path / "hf-home")},
    )
    assert no_token.returncode == 1 and "HF_TOKEN" in no_token.stderr and "Traceback" not in no_token.stderr
    assert not out.exists()


def test_usage_and_unknown_stage():
    assert cli("--help").returncode == 0
    result = cli("fly")
    assert result.returncode == 2 and "stages:" in result.stderr


def test_wandb_gets_training_metrics_and_the_eval_in_one_run(tiny_model_dir, tmp_path):
    from tests.wandb_records import records, run_ids

    out = tmp_path / "demo"
    result = cli(*pipeline_args(tiny_model_dir("llama"), out), "train.wandb.enabled=true", "train.wandb.mode=offline")
    assert result.returncode == 0, result.stderr[-3000:]
    runs = out / "sae" / "wandb"
    assert len(run_ids(runs)) == 1  # the eval went into the training's run
    kinds: dict[str, set[str]] = {}
    for path in runs.glob("offline-run-*/run-*.wandb"):
        for record in records(path):
            kind = record.WhichOneof("record_type")
            if kind in ("history", "summary"):
                items = record.history.item if kind == "history" else record.summary.update
                kinds.setdefault(kind, set()).update(i.key or "/".join(i.nested_key) for i in items)

    def logged(kind: str, key: str) -> bool:  # media (tables, images) are logged as nested keys below their name
        return any(k == key or k.startswith(key + "/") for k in kinds[kind])

    assert logged("history", f"{SITE}/fvu") and logged("history", "eval/table") and logged("history", "eval/density")
    assert logged("summary", f"{SITE}/eval/ce_recovered")
    assert list(runs.glob("offline-run-*/files/media/images/eval/density*.png"))


def eval_rows(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if "eval/fvu" in row]


def test_periodic_eval_from_a_store_and_live(tiny_model_dir, tmp_path):
    """`train eval_every_tokens=N` evaluates every N tokens and at the end, reading the model, data
    and text settings from the store's manifest (source=store) or from its own config (live)."""
    from sae_train import cache, pipeline
    from sae_train.cache import CacheConfig
    from sae_train.data import TextConfig
    from sae_train.lm import ModelConfig
    from sae_train.sae import SAEConfig
    from sae_train.train import TrainConfig

    model = ModelConfig(name=str(tiny_model_dir("llama")), dtype="float32", device="cpu")
    cache.run(
        CacheConfig(
            model=model,
            sites=[SITE],
            n_tokens=4096,
            text=TextConfig(context_size=32),
            tokens_per_shard=2048,
            out_dir=str(tmp_path / "acts"),
            progress=False,
        )
    )
    common = dict(
        n_tokens=3072,
        batch_size=512,
        eval_every_tokens=1024,
        eval_tokens=128,
        dtype="float32",
        device="cpu",
        progress=False,
        sae=SAEConfig(k=4, expansion_factor=2),
    )
    runs = {
        "store": TrainConfig(store=str(tmp_path / "acts"), out_dir=str(tmp_path / "from-store"), **common),
        "live": TrainConfig(
            source="live",
            model=model,
            sites=[SITE],
            text=TextConfig(context_size=32),
            live_buffer_tokens=1024,
            out_dir=str(tmp_path / "live"),
            **common,
        ),
    }
    for name, cfg in runs.items():
        pipeline.train_stage(cfg)
        rows = eval_rows(Path(cfg.out_dir))
        assert [row["step"] for row in rows] == [2, 4, 6], name
        assert all(0 < row["eval/fvu"] < 10 and row["eval/l0"] > 0 for row in rows), rows
