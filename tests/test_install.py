"""The package as a user installs it: a wheel, installed non-editable into a fresh virtual
environment, run from a directory outside the repository (no source tree to fall back on)."""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SITE = "blocks.1.hook_resid_post"


def run(*args: str | Path, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, f"{args}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


def build_wheel(tmp_path: Path) -> Path:
    """The wheel of a copy of the source (the build leaves build/ and *.egg-info behind it)."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "sae_train", source / "sae_train", ignore=shutil.ignore_patterns("__pycache__"))
    run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "--no-index",
        "-w",
        tmp_path / "dist",
        source,
        cwd=tmp_path,
    )
    (wheel,) = (tmp_path / "dist").glob("sae_train-*.whl")
    return wheel


def fresh_venv(root: Path) -> Path:
    """A virtual environment without sae_train that sees this interpreter's installed packages
    (torch, transformers, ...) through a .pth file. Only the paths are added: the .pth files in
    them, such as an editable install's finder, are not run."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=120)
    python = root / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    user = [site.getusersitepackages()] if site.ENABLE_USER_SITE else []
    ours = dict.fromkeys([*site.getsitepackages(), sysconfig.get_paths()["purelib"], *user])
    Path(purelib, "_dependencies.pth").write_text("\n".join(ours) + "\n")
    return root


def test_wheel_installs_and_runs_outside_the_repository(tiny_model_dir, tmp_path):
    wheel = build_wheel(tmp_path)
    venv = fresh_venv(tmp_path / "venv")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1"}
    # --ignore-installed: the sae_train this interpreter has (editable, seen through the .pth
    # file) is neither reused nor uninstalled.
    run(
        sys.executable,
        "-m",
        "pip",
        "--python",
        venv / "bin" / "python",
        "install",
        "--no-deps",
        "--no-index",
        "--ignore-installed",
        wheel,
        cwd=tmp_path,
        env=env,
    )
    work = tmp_path / "work"
    work.mkdir()

    imported = run(venv / "bin" / "python", "-c", "import sae_train; print(sae_train.__file__)", cwd=work, env=env)
    assert Path(imported.stdout.strip()).is_relative_to(venv), imported.stdout  # the wheel, not the source tree

    sae_train = venv / "bin" / "sae-train"
    run(
        sae_train,
        "cache",
        f"model.name={tiny_model_dir('llama')}",
        "model.dtype=float32",
        f"sites=[{SITE}]",
        "n_tokens=2048",
        "text.context_size=32",
        "tokens_per_shard=1024",
        "out_dir=acts",
        "progress=false",
        cwd=work,
        env=env,
    )
    assert (work / "acts" / "manifest.json").exists()
    trained = run(
        sae_train,
        "train",
        "store=acts",
        "n_tokens=2048",
        "batch_size=512",
        "sae.k=4",
        "sae.expansion_factor=2",
        "out_dir=sae",
        "progress=false",
        cwd=work,
        env=env,
    )
    assert "fvu" in trained.stdout
    assert (work / "sae" / SITE / "sae.safetensors").exists() and (work / "sae" / SITE / "cfg.json").exists()
    # The browser page and the record schema are package data.
    run(
        sae_train,
        "inspect",
        "checkpoint=sae",
        "store=acts",
        "n_tokens=1000",
        "out_dir=inspect",
        "progress=false",
        cwd=work,
        env=env,
    )
    assert (work / "inspect" / "index.html").read_text().startswith("<!doctype html>")
    code = "from sae_train.inspect.records import schema; print(schema()['title'])"
    assert run(venv / "bin" / "python", "-c", code, cwd=work, env=env).stdout.startswith("sae-train inspect")
