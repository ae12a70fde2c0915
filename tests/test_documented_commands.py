"""Every command line README.md documents, run the way a user runs it: `sae-train ...` as a
subprocess, with relative `runs/...` paths, on a tiny model and local text files. The only
changes to a documented command are the sizes (tokens, widths) and the model and data, which
are tiny (`model.name=<tiny model directory> data=files data.path=<corpus>`).

Covered elsewhere, and not repeated here: `sae-train pipeline` with tiny overrides and its reuse
(`make demo` runs it on the embedded SmolLM2, minutes on CPU) and `wandb.enabled=true` in
tests/test_pipeline.py; `torchrun ... -m sae_train.cli train` in tests/test_train_ddp.py; the
slurm/README.md commands (`sbatch ... cache_array.sbatch`, `sbatch ... train_ddp.sbatch`,
`sae-train -m train hydra/launcher=slurm ...`) on a real Slurm cluster in tests/test_slurm.py;
the wheel install in tests/test_install.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tiny import write_corpus

SITE = "blocks.1.hook_resid_post"
TOKEN = "hf_dOcUmEnTeDcOmMaNdS0123456789"
# Tiny sizes for the documented train command (n_tokens, batch_size, widths).
TRAIN = ["n_tokens=2048", "batch_size=512", "sae.expansion_factor=2", "dtype=float32", "progress=false"]


def sae_train(cwd: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`sae-train <args>` in cwd; fails the test with its output unless it exits 0."""
    result = subprocess.run(
        [sys.executable, "-m", "sae_train.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env=os.environ | {"OMP_NUM_THREADS": "1"} | (env or {}),
    )
    assert result.returncode == 0, f"sae-train {' '.join(args)}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def tiny(tiny_model_dir, tmp_path_factory) -> list[str]:
    """The overrides that make the documented model and data tiny."""
    corpus = write_corpus(tmp_path_factory.mktemp("corpus"), n_files=40, n_words=200)
    return [
        f"model.name={tiny_model_dir('llama')}",
        "model.dtype=float32",
        "data=files",
        f"data.path={corpus}",
        "data.eval_fraction=0.25",
    ]


@pytest.fixture(scope="module")
def home(tmp_path_factory, tiny) -> Path:
    """A working directory after the README's first two commands: cache, then train on the store."""
    home = tmp_path_factory.mktemp("home")
    cached = sae_train(
        home,
        "cache",
        *tiny,
        f"sites=[{SITE}]",
        "n_tokens=4096",
        "text.context_size=32",
        "out_dir=runs/acts",
        "tokens_per_shard=1024",
        "progress=false",
    )
    assert "runs/acts" in cached.stdout
    trained = sae_train(home, "train", "store=runs/acts", "sae=topk", "sae.k=4", *TRAIN, "out_dir=runs/sae")
    assert SITE in trained.stdout and "fvu" in trained.stdout
    return home


@pytest.fixture(scope="module")
def evaluated(home) -> subprocess.CompletedProcess:
    """`sae-train eval` of the trained checkpoint into runs/eval (the export commands read it)."""
    return sae_train(home, "eval", f"checkpoint=runs/sae/{SITE}", "n_tokens=512", "out_dir=runs/eval", "progress=false")


def metric_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("stage", ["cache", "train", "eval", "export", "inspect", "pipeline"])
def test_cfg_job_prints_every_option(stage, tmp_path):
    shown = sae_train(tmp_path, stage, "--cfg", "job")
    assert "out_dir:" in shown.stdout


def test_cache_then_train_from_the_store(home):
    manifest = json.loads((home / "runs/acts/manifest.json").read_text())
    assert [site["name"] for site in manifest["sites"]] == [SITE] and manifest["shards"]
    assert (home / "runs/sae/run_state.json").exists()
    assert (home / f"runs/sae/{SITE}/sae.safetensors").exists() and (home / f"runs/sae/{SITE}/cfg.json").exists()


def test_eval_one_checkpoint_then_export_with_its_numbers(home, evaluated):
    assert "CE recovered" in evaluated.stdout
    for name in ("eval.json", "eval.md", "density.png", "frequency.safetensors"):
        assert (home / "runs/eval" / name).exists(), name
    sae_train(home, "export", "checkpoint=runs/sae", "out_dir=runs/export", "eval_dir=runs/eval")
    assert (home / f"runs/export/{SITE}/sae_weights.safetensors").exists()
    fvu = json.loads((home / "runs/eval/eval.json").read_text())["saes"][SITE]["metrics"]["fvu"]
    assert f"{fvu:.4f}"[:5] in (home / "runs/export/README.md").read_text()  # the model card shows the eval


def test_inspect_from_the_store_and_live(home):
    shown = sae_train(
        home, "inspect", "checkpoint=runs/sae", "store=runs/acts", "n_tokens=2000", "out_dir=runs/inspect"
    )
    assert "runs/inspect/index.html" in shown.stdout
    assert (home / f"runs/inspect/{SITE}/inspect.json").exists()
    sae_train(home, "inspect", "checkpoint=runs/sae", "n_tokens=256", "out_dir=runs/inspect-live", "progress=false")
    assert json.loads((home / f"runs/inspect-live/{SITE}/inspect.json").read_text())["source"]["live"]


def test_export_push_to_hub_reaches_the_hub_api_with_the_token(home, evaluated):
    """`export ... push_to_hub=true repo_id=...` with HF_TOKEN set, against a fake hub API on
    127.0.0.1 (HF_ENDPOINT): the real command and huggingface_hub's real HTTP requests."""
    from tests.fake_hub import FakeHub, serve

    repo = "my-org/saes-tiny"
    hub = FakeHub(repo)
    with serve(hub) as endpoint:
        pushed = sae_train(
            home,
            "export",
            "checkpoint=runs/sae",
            "eval_dir=runs/eval",
            "out_dir=runs/export-hub",
            "push_to_hub=true",
            f"repo_id={repo}",
            env={"HF_ENDPOINT": endpoint, "HF_HUB_OFFLINE": "0", "HF_TOKEN": TOKEN},
        )
    assert TOKEN not in pushed.stdout + pushed.stderr
    created = hub.json_of("/api/repos/create")
    assert (created["organization"], created["name"]) == tuple(repo.split("/"))
    commit = [r for r in hub.requests if r.url.path == f"/api/models/{repo}/commit/main"]
    assert len(commit) == 1 and commit[0].headers["authorization"] == f"Bearer {TOKEN}"
    files = hub.committed_files()
    assert set(files) == {
        "README.md",
        *(f"{SITE}/{name}" for name in ("cfg.json", "sae_weights.safetensors", "sparsity.safetensors")),
    }
    for path, content in files.items():
        assert content == (home / "runs/export-hub" / path).read_bytes(), path


def test_train_live_without_a_store(home, tiny):
    sae_train(
        home,
        "train",
        "source=live",
        *tiny,
        f"sites=[{SITE}]",
        "text.context_size=32",
        "live_buffer_tokens=1024",
        *TRAIN,
        "out_dir=runs/live",
    )
    assert (home / f"runs/live/{SITE}/sae.safetensors").exists()
    assert not list((home / "runs/live").rglob("shard-*"))  # no disk: nothing cached


def test_one_pass_sweep_trains_every_combination(home):
    sae_train(
        home, "train", "store=runs/acts", "+sweep.k=[2,4]", "+sweep.lr=[1e-3,3e-3]", *TRAIN, "out_dir=runs/one-pass"
    )
    runs = sorted(p.name for p in (home / "runs/one-pass" / SITE).iterdir() if (p / "sae.safetensors").exists())
    assert runs == ["k=2-lr=0.001", "k=2-lr=0.003", "k=4-lr=0.001", "k=4-lr=0.003"]
    assert json.loads((home / f"runs/one-pass/{SITE}/k=4-lr=0.003/cfg.json").read_text())["k"] == 4


def test_multirun_sweep_runs_one_job_per_value(home):
    sae_train(home, "-m", "train", "store=runs/acts", "sae.k=2,4", *TRAIN, "out_dir=runs/multirun")
    runs = sorted(p for p in (home / "runs/multirun").iterdir() if (p / "run_state.json").exists())
    assert [p.name.rsplit("sae.k=", 1)[1] for p in runs] == ["2", "4"], runs
    for run in runs:
        assert json.loads((run / SITE / "cfg.json").read_text())["k"] == int(run.name.rsplit("=", 1)[1])


def test_every_architecture_then_one_eval_of_all(home):
    """README, Results: `train store=... sae=<arch> out_dir=runs/calib/<arch>` per architecture, then
    `eval checkpoint=runs/calib` evaluates every checkpoint below it together."""
    for arch in ("batchtopk", "relu", "jumprelu"):
        sae_train(home, "train", "store=runs/acts", f"sae={arch}", *TRAIN, f"out_dir=runs/calib/{arch}")
    sae_train(home, "eval", "checkpoint=runs/calib", "n_tokens=512", "out_dir=runs/calib-eval", "progress=false")
    saes = json.loads((home / "runs/calib-eval/eval.json").read_text())["saes"]
    assert sorted(info["architecture"] for info in saes.values()) == ["batchtopk", "jumprelu", "relu"]


def test_eval_of_a_live_multirun_sweep(home, tiny):
    sae_train(
        home,
        "-m",
        "train",
        "source=live",
        *tiny,
        f"sites=[{SITE}]",
        "text.context_size=32",
        "live_buffer_tokens=1024",
        "sae.k=2,4",
        *TRAIN,
        "out_dir=runs/live-sweep",
    )
    sae_train(
        home, "eval", "checkpoint=runs/live-sweep", "n_tokens=512", "out_dir=runs/live-sweep-eval", "progress=false"
    )


def test_train_with_periodic_eval_logs_held_out_metrics(home):
    sae_train(
        home, "train", "store=runs/acts", "eval_every_tokens=1024", "eval_tokens=128", *TRAIN, "out_dir=runs/periodic"
    )
    evals = [row for row in metric_rows(home / "runs/periodic") if "eval/fvu" in row]
    assert [row["step"] for row in evals] == [2, 4]
    assert all({"eval/ce_recovered", "eval/kl", "eval/l0"} <= row.keys() for row in evals)


def test_steer_side_by_side_then_several_features_keyed_by_site(home):
    """README, steer: the documented command (a latent id the tiny SAE has), then the keyed form
    over the training out_dir with effect=true."""
    assert "prompt:" in sae_train(home, "steer", "--cfg", "job").stdout
    steered = sae_train(
        home,
        "steer",
        f"checkpoint=runs/sae/{SITE}",
        "prompt=def add(a, b):\n",
        "features={3: 14.7}",
        "mode=add",
        "positions=all",
        "max_new_tokens=8",
        "out_dir=runs/steer",
    )
    assert "default" in steered.stdout and "| steered" in steered.stdout
    payload = json.loads((home / "runs/steer/steer.json").read_text())
    assert payload["prompt"]["text"] == "def add(a, b):\n"
    assert [(i["latent"], i["value"]) for i in payload["interventions"]] == [(3, 14.7)]
    sae_train(
        home,
        "steer",
        "checkpoint=runs/sae",
        "prompt=x = 1",
        f"features={{{SITE}: [3, 5]}}",
        "mode=ablate",
        "effect=true",
        "max_new_tokens=4",
        "out_dir=runs/steer-keyed",
    )
    payload = json.loads((home / "runs/steer-keyed/steer.json").read_text())
    assert [e["latent"] for e in payload["effect"]] == [3, 5]


def test_transcoder_set_live_then_eval_and_circuit_tracer_export(home, tiny):
    """README, Transcoder sets and circuit-tracer: the three commands (train every layer live,
    eval with all transcoders spliced at once, export in circuit-tracer's layout)."""
    sae_train(
        home,
        "train",
        "source=live",
        *tiny,
        "sites=[blocks.*.mlp.hook_in]",
        "sae=batchtopk",
        'sae.target="blocks.{layer}.hook_mlp_out"',
        "sae.skip=true",
        "sae.k=4",
        "text.context_size=32",
        "live_buffer_tokens=1024",
        *TRAIN,
        "out_dir=runs/tcset",
    )
    evaluated = sae_train(
        home, "eval", "checkpoint=runs/tcset", "n_tokens=256", "out_dir=runs/tcset-eval", "progress=false"
    )
    assert "all 3 transcoders spliced at once" in evaluated.stdout
    sae_train(
        home,
        "export",
        "format=circuit_tracer",
        "checkpoint=runs/tcset",
        "eval_dir=runs/tcset-eval",
        "out_dir=runs/tcset-ct",
    )
    assert sorted(p.name for p in (home / "runs/tcset-ct").iterdir()) == [
        "README.md",
        "config.yaml",
        "layer_0.safetensors",
        "layer_1.safetensors",
        "layer_2.safetensors",
    ]


def test_cross_layer_transcoder_cache_train_eval_export(tmp_path, tiny):
    """README, Cross-layer transcoders: cache every layer's MLP input and output, train `sae=clt`
    over `blocks.*.mlp.hook_in` (from the store and live), eval, export for circuit-tracer."""
    layers = [f"blocks.{i}.{kind}" for i in range(3) for kind in ("mlp.hook_in", "hook_mlp_out")]
    sae_train(
        tmp_path,
        "cache",
        *tiny,
        f"sites=[{','.join(layers)}]",
        "n_tokens=4096",
        "text.context_size=32",
        "out_dir=runs/acts-mlp",
        "tokens_per_shard=1024",
        "progress=false",
    )
    clt = ["sae=clt", "sites=[blocks.*.mlp.hook_in]", "sae.k=4", "sae.d_sae=64", *TRAIN]
    sae_train(tmp_path, "train", "store=runs/acts-mlp", *clt, "out_dir=runs/clt")
    sae_train(tmp_path, "train", "source=live", *tiny, *clt, "out_dir=runs/clt-live")
    sae_train(tmp_path, "eval", "checkpoint=runs/clt", "n_tokens=512", "out_dir=runs/clt-eval", "progress=false")
    metrics = json.loads((tmp_path / "runs/clt-eval/eval.json").read_text())["saes"]["clt"]["metrics"]
    assert {"fvu_0", "fvu_2", "ce_recovered"} <= set(metrics)
    sae_train(
        tmp_path,
        "export",
        "format=circuit_tracer",
        "checkpoint=runs/clt",
        "eval_dir=runs/clt-eval",
        "out_dir=runs/clt-ct",
    )
    assert "model_kind: cross_layer_transcoder" in (tmp_path / "runs/clt-ct/config.yaml").read_text()
