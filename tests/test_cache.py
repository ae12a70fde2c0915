"""The cache stage: stored values, resume, crash safety, ranks and bad input."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from itertools import islice
from pathlib import Path

import pytest
import torch

from sae_train import cache
from sae_train.cache import CacheConfig
from sae_train.data import DataConfig, TextConfig, TokenSpec, iter_documents, iter_windows
from sae_train.errors import UserError
from sae_train.lm import LanguageModel, ModelConfig
from sae_train.store import ActivationStore
from tests.tiny import FAMILIES

CTX = 32


def config(model_dir: Path, out: Path, **kw) -> CacheConfig:
    base = dict(
        model=ModelConfig(name=str(model_dir), dtype="float32", device="cpu"),
        text=TextConfig(context_size=CTX),
        n_tokens=2048,
        tokens_per_shard=512,
        batch_size=4 * CTX,
        store_dtype="float32",
        out_dir=str(out),
        progress=False,
    )
    return CacheConfig(**(base | kw))


def stored_rows(store: ActivationStore, name: str) -> torch.Tensor:
    return torch.cat([store.shard(i)[name] for i in range(store.n_shards)])


def reference(lm: LanguageModel, cfg: CacheConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The windows the store should hold and the mask of kept (non-special) tokens."""
    spec = TokenSpec.from_tokenizer(lm.tokenizer, cfg.text)
    windows = torch.stack(
        list(islice(iter_windows(iter_documents(cfg.data), lm.tokenizer, cfg.text, spec), cfg.n_tokens // CTX))
    )
    return windows, ~torch.isin(windows, torch.tensor(spec.special))


@pytest.mark.parametrize("family", FAMILIES)
def test_store_holds_the_models_hidden_states(tiny_model_dir, tmp_path, family):
    """Resid sites equal output_hidden_states exactly; mlp/attn sites equal a plain forward hook.
    One store stops the forward at layer 0 (early stop), the other needs the last layer."""
    model_dir = tiny_model_dir(family)
    lm = LanguageModel.load(ModelConfig(name=str(model_dir), dtype="float32", device="cpu"))
    early = config(model_dir, tmp_path / "early", sites=["blocks.0.hook_resid_post", "blocks.0.hook_attn_out"])
    full = config(model_dir, tmp_path / "full", sites=["blocks.2.hook_resid_pre", "blocks.2.hook_mlp_out"])
    cache.run(early, lm)
    cache.run(full, lm)
    windows, keep = reference(lm, early)
    hooked: dict[str, list[torch.Tensor]] = {"attn": [], "mlp": []}
    attn = lm.model.get_submodule(lm.site("blocks.0.hook_attn_out").module)
    mlp = lm.model.get_submodule(lm.site("blocks.2.hook_mlp_out").module)
    handles = [
        attn.register_forward_hook(lambda m, a, o: hooked["attn"].append(o[0] if isinstance(o, tuple) else o)),
        mlp.register_forward_hook(lambda m, a, o: hooked["mlp"].append(o[0] if isinstance(o, tuple) else o)),
    ]
    try:
        with torch.no_grad():
            # The cache runs windows in batches of 4; the same batches give bit-identical values.
            hidden = [
                lm.model(windows[i : i + 4], output_hidden_states=True).hidden_states for i in range(0, len(windows), 4)
            ]
    finally:
        for h in handles:
            h.remove()
    expect = {
        "blocks.0.hook_resid_post": torch.cat([h[1] for h in hidden]),
        "blocks.2.hook_resid_pre": torch.cat([h[2] for h in hidden]),
        "blocks.0.hook_attn_out": torch.cat(hooked["attn"]),
        "blocks.2.hook_mlp_out": torch.cat(hooked["mlp"]),
    }
    for store_cfg in (early, full):
        store = ActivationStore(store_cfg.out_dir)
        for name in store_cfg.sites:
            assert torch.equal(stored_rows(store, name), expect[name][keep]), name
        token_ids = torch.cat([store.shard(i)["token_ids"] for i in range(store.n_shards)])
        assert torch.equal(token_ids, windows[keep].to(torch.int32))


def test_rerun_resumes_and_extends(tiny_model_dir, tmp_path):
    cfg = config(tiny_model_dir("gpt2"), tmp_path / "acts", sites=["blocks.1.hook_resid_post"])
    first = cache.run(cfg)
    assert first.written_tokens > 0 and first.n_shards == 4
    again = cache.run(cfg)
    assert again.written_tokens == 0 and again.n_tokens == first.n_tokens
    longer = cache.run(
        config(tiny_model_dir("gpt2"), tmp_path / "acts", sites=["blocks.1.hook_resid_post"], n_tokens=3072)
    )
    assert longer.n_shards == 6 and 0 < longer.written_tokens < first.n_tokens


def test_ranks_write_the_same_shards_as_one_process(tiny_model_dir, tmp_path):
    model = tiny_model_dir("llama")
    one = config(model, tmp_path / "one", sites=["blocks.1.hook_resid_post"])
    cache.run(one)
    for rank in range(3):
        cache.run(config(model, tmp_path / "three", sites=["blocks.1.hook_resid_post"], rank=rank, world_size=3))
    a, b = ActivationStore(tmp_path / "one"), ActivationStore(tmp_path / "three")
    assert [s.index for s in b.manifest.shards] == [s.index for s in a.manifest.shards]
    assert {s.rank for s in b.manifest.shards} == {0, 1, 2}
    assert [s.sha256 for s in b.manifest.shards] == [s.sha256 for s in a.manifest.shards]


def _cli(model_dir: Path, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "sae_train.cli",
        "cache",
        f"model.name={model_dir}",
        "model.dtype=float32",
        "model.device=cpu",
        "sites=[blocks.2.hook_resid_post,blocks.1.hook_mlp_out]",
        "n_tokens=12288",
        f"text.context_size={CTX}",
        "tokens_per_shard=1024",
        f"batch_size={2 * CTX}",
        f"out_dir={out}",
        "progress=false",
    ]


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.endswith(".lock")
    }


def test_sigkill_mid_shard_then_rerun_is_byte_identical(tiny_model_dir, tmp_path):
    model = tiny_model_dir("llama")
    env = os.environ | {"TOKENIZERS_PARALLELISM": "false"}
    subprocess.run(_cli(model, tmp_path / "clean"), check=True, env=env, capture_output=True)
    crashed = tmp_path / "crashed"
    kills = 0
    for delay in (0.0, 0.15, 0.4):
        proc = subprocess.Popen(_cli(model, crashed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        manifest = crashed / "manifest.json"
        start = len(json.loads(manifest.read_text())["shards"]) if manifest.exists() else 0
        # Wait until this run has published a shard, then kill it while it computes the next.
        while time.time() < deadline and proc.poll() is None:
            if manifest.exists() and len(json.loads(manifest.read_text())["shards"]) > start:
                break
            time.sleep(0.01)
        time.sleep(delay)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        ActivationStore(crashed).verify(checksums=True)  # valid after every kill
    assert kills >= 2
    subprocess.run(_cli(model, crashed), check=True, env=env, capture_output=True)
    assert _tree(crashed) == _tree(tmp_path / "clean")


def test_bad_input_is_refused_before_anything_is_written(tiny_model_dir, tmp_path):
    model = tiny_model_dir("gpt2")
    with pytest.raises(UserError, match="Unknown activation site 'blocks.1.resid'.*blocks"):
        cache.run(config(model, tmp_path / "a", sites=["blocks.1.resid"]))
    assert not (tmp_path / "a").exists()
    with pytest.raises(UserError, match="neither a model directory nor a .gguf"):
        cache.run(config(tmp_path / "no-model", tmp_path / "b", sites=["blocks.1.hook_resid_post"]))
    with pytest.raises(UserError, match="Could not load model"):
        cache.run(config(Path("no-such-org/no-such-model"), tmp_path / "b", sites=["blocks.1.hook_resid_post"]))
    empty = tmp_path / "empty"
    empty.mkdir()
    for i in range(3):
        (empty / f"{i}.txt").write_text("")
    with pytest.raises(UserError, match="holds no text"):
        cache.run(
            config(
                model,
                tmp_path / "c",
                sites=["blocks.1.hook_resid_post"],
                data=DataConfig(source="files", path=str(empty), split_by="document"),
            )
        )
    assert not (tmp_path / "c").exists()
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(UserError, match="file"):
        cache.run(config(model, tmp_path / "file", sites=["blocks.1.hook_resid_post"]))
    assert (tmp_path / "file").read_text() == "not a directory"


def test_changed_config_on_resume_is_refused_and_store_untouched(tiny_model_dir, tmp_path):
    model = tiny_model_dir("gpt2")
    cache.run(config(model, tmp_path / "acts", sites=["blocks.1.hook_resid_post"]))
    before = _tree(tmp_path / "acts")
    with pytest.raises(UserError, match="context_size"):
        cache.run(
            config(model, tmp_path / "acts", sites=["blocks.1.hook_resid_post"], text=TextConfig(context_size=16))
        )
    with pytest.raises(UserError, match="store_dtype"):
        cache.run(config(model, tmp_path / "acts", sites=["blocks.1.hook_resid_post"], store_dtype="bfloat16"))
    assert _tree(tmp_path / "acts") == before


def test_disk_full_keeps_finished_shards_and_resumes(tiny_model_dir, tmp_path, monkeypatch):
    model = tiny_model_dir("gpt2")
    cfg = config(model, tmp_path / "acts", sites=["blocks.1.hook_resid_post"])
    real_write = os.write
    calls = {"n": 0}

    def failing_write(fd, data):
        calls["n"] += 1
        if calls["n"] > 6:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", failing_write)
    with pytest.raises(UserError, match="space|disk"):
        cache.run(cfg)
    monkeypatch.setattr(os, "write", real_write)
    partial = ActivationStore(tmp_path / "acts")
    partial.verify(checksums=True)
    assert partial.n_shards < 4
    assert not [p for p in (tmp_path / "acts").iterdir() if ".tmp" in p.name]
    assert cache.run(cfg).n_shards == 4


def test_a_cache_the_disk_cannot_hold_is_refused_before_any_forward(tiny_model_dir, tmp_path, monkeypatch):
    """The bytes left to write (every token stored: float32 activations, int32 id and position)
    against the disk's free space: over it, the run stops before any forward pass and says how
    many tokens fit; shards already stored do not count against a rerun that extends them."""
    model = tiny_model_dir("gpt2")
    cfg = config(model, tmp_path / "acts", sites=["blocks.1.hook_resid_post"])  # 2048 tokens, 4 shards
    lm = LanguageModel.load(cfg.model)
    width = lm.site_width(lm.site("blocks.1.hook_resid_post"))
    per_token = 4 * width + 8
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(cache.shutil, "disk_usage", lambda path: usage._replace(free=1024 * per_token + 100))
    real_rows = cache._shard_rows

    def no_forward(*args, **kwargs):
        raise AssertionError("a forward pass ran before the space check")

    monkeypatch.setattr(cache, "_shard_rows", no_forward)
    gib = 2048 * per_token / 2**30
    with pytest.raises(
        UserError, match=rf"2,048 tokens left .*{per_token:,} bytes a token.*{gib:,.1f} GiB.*about 1,024 fit"
    ):
        cache.run(cfg)
    assert not list((tmp_path / "acts").glob("*.safetensors"))
    monkeypatch.setattr(cache, "_shard_rows", real_rows)
    assert cache.run(replace(cfg, n_tokens=1024)).n_shards == 2
    assert cache.run(cfg).n_shards == 4  # 1,024 tokens left: they fit
