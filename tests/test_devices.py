"""Device placement: each local rank on its own GPU, batches onto the device, checkpoints that
cross CUDA <-> CPU, the cache stage on CUDA against the CPU. The `cuda` tests skip without a GPU."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sae_train import cache
from sae_train.cache import CacheConfig
from sae_train.data import TextConfig
from sae_train.lm import LanguageModel, ModelConfig
from sae_train.lm.model import resolve_device
from sae_train.sae import SAEConfig
from sae_train.sae.checkpoint import TRAINING_WEIGHTS_FILE as WEIGHTS
from sae_train.store import ActivationStore, ShuffledBatches
from sae_train.train import Preempted, StepInfo, TrainConfig, Trainer, run
from sae_train.train.dist import Dist
from sae_train.train.feed import device_batches
from sae_train.train.sources import StoreSource
from tests.synthetic import true_directions, write_store

without_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize(
    ("env", "gpus", "expect"),
    [
        ({"LOCAL_RANK": "3"}, 4, "cuda:3"),
        ({"SLURM_LOCALID": "1"}, 4, "cuda:1"),
        ({"LOCAL_RANK": "2", "SLURM_LOCALID": "0"}, 4, "cuda:2"),  # torchrun inside srun: torchrun's rank
        ({"LOCAL_RANK": "1"}, 1, "cuda:0"),  # a rank that sees only its own GPU (CUDA_VISIBLE_DEVICES per task)
        ({}, 4, "cuda"),
    ],
)
def test_cuda_means_the_local_ranks_gpu(monkeypatch, env, gpus, expect):
    for name in ("LOCAL_RANK", "SLURM_LOCALID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("cuda") == resolve_device("auto") == torch.device(expect)
    assert resolve_device("cuda:0") == torch.device("cuda:0")  # an explicit index is kept
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.fixture(scope="module")
def store(synthetic_store):
    return synthetic_store(8192, n_features=32, d_in=16)


def _config(store: Path, out: Path, device: str) -> TrainConfig:
    return TrainConfig(
        store=str(store),
        out_dir=str(out),
        n_tokens=8192,
        batch_size=256,
        dtype="float32",
        device=device,
        progress=False,
        log_every=8,
        sae=SAEConfig(architecture="relu", l1_coefficient=0.05, expansion_factor=4),
    )


def _sigterm_at_step_16(info: StepInfo) -> None:
    if info.step == 16:
        signal.raise_signal(signal.SIGTERM)


@pytest.mark.cuda
@without_cuda
@pytest.mark.parametrize(("first", "then"), [("cuda", "cpu"), ("cpu", "cuda")])
def test_checkpoints_cross_cuda_and_cpu(store, tmp_path, first, then):
    """Half a run on one device, resumed on the other, lands where a whole run on the second does."""
    with pytest.raises(Preempted):
        run(_config(store, tmp_path / "run", first), callbacks=[_sigterm_at_step_16])
    run(_config(store, tmp_path / "run", then))
    run(_config(store, tmp_path / "whole", then))
    a, b = (
        load_file(str(tmp_path / "run" / "synthetic" / WEIGHTS)),
        load_file(str(tmp_path / "whole" / "synthetic" / WEIGHTS)),
    )
    for key in a:  # TF32 on the GPU: close, not equal
        torch.testing.assert_close(a[key].float(), b[key].float(), rtol=2e-2, atol=2e-3, msg=key)


@pytest.mark.cuda
@without_cuda
def test_cache_on_cuda_equals_the_cpu(tiny_model_dir, tmp_path):
    model_dir = tiny_model_dir("llama")
    stores = {}
    for device in ("cpu", "cuda"):
        cfg = CacheConfig(
            model=ModelConfig(name=str(model_dir), dtype="bfloat16", device=device),
            text=TextConfig(context_size=32),
            n_tokens=2048,
            tokens_per_shard=512,
            batch_size=128,
            store_dtype="bfloat16",
            sites=["blocks.1.hook_resid_post"],
            out_dir=str(tmp_path / device),
            progress=False,
        )
        cache.run(cfg)
        stores[device] = ActivationStore(cfg.out_dir)
    cpu, gpu = stores["cpu"], stores["cuda"]
    assert cpu.n_shards == gpu.n_shards and cpu.n_tokens == gpu.n_tokens
    for i in range(cpu.n_shards):
        a, b = cpu.shard(i), gpu.shard(i)
        assert torch.equal(a["token_ids"], b["token_ids"]) and torch.equal(a["position"], b["position"])
        torch.testing.assert_close(
            b["blocks.1.hook_resid_post"].float(), a["blocks.1.hook_resid_post"].float(), rtol=5e-2, atol=5e-2
        )


@pytest.mark.cuda
@without_cuda
def test_model_lands_on_the_local_ranks_gpu(tiny_model_dir, monkeypatch):
    last = torch.cuda.device_count() - 1
    monkeypatch.setenv("LOCAL_RANK", str(last))
    lm = LanguageModel.load(ModelConfig(name=str(tiny_model_dir("gpt2")), dtype="float32", device="auto"))
    assert lm.device == torch.device("cuda", last)


def test_device_batches_carry_the_position_after_each_batch(store):
    """On the CPU the source's batches pass through, each with the position to checkpoint."""
    source = StoreSource(str(store), [], 256, Dist(), seed=0, window_shards=2)
    fed = device_batches(source, 512, torch.device("cpu"))
    direct = iter(
        ShuffledBatches(
            ActivationStore(store), ["synthetic"], 256, window_shards=2, position=512, dtype=torch.float32, prefetch=0
        )
    )
    try:
        for step in range(3):
            batch, position = next(fed)
            assert position == 512 + 256 * (step + 1)
            assert torch.equal(batch["synthetic"], next(direct)["synthetic"])
    finally:
        fed.close()  # stops the prefetch thread even when an assertion keeps this frame


@pytest.mark.cuda
@without_cuda
def test_pinned_bf16_batches_on_the_gpu_equal_the_cpu_batches(tmp_path):
    """bf16 rows gathered into pinned memory, copied on a side stream, converted on the GPU."""
    bf16 = write_store(tmp_path / "bf16", true_directions(32, 16), 8192, dtype=torch.bfloat16)
    fed = {
        name: device_batches(
            StoreSource(str(bf16), [], 256, Dist(device=torch.device(name)), seed=0, window_shards=2),
            256,
            torch.device(name),
        )
        for name in ("cpu", "cuda")
    }
    for _ in range(5):
        (cpu, at_cpu), (gpu, at_gpu) = next(fed["cpu"]), next(fed["cuda"])
        assert at_cpu == at_gpu and gpu["synthetic"].is_cuda and gpu["synthetic"].dtype == torch.bfloat16
        assert torch.equal(gpu["synthetic"].float().cpu(), cpu["synthetic"])


@pytest.mark.cuda
@without_cuda
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gpu_precision_policy(store, tmp_path, dtype):
    """fp32 master weights and state on the GPU; float32 GEMMs in TF32; bf16 GEMMs read one bf16
    copy of W_enc/W_dec made by the optimizer step; JumpReLU's threshold stays fp32."""
    cfg = TrainConfig(
        store=str(store),
        out_dir=str(tmp_path),
        n_tokens=2048,
        batch_size=256,
        dtype=dtype,
        device="cuda",
        progress=False,
        sae=SAEConfig(architecture="jumprelu", l0_coefficient=0.01, expansion_factor=4),
    )
    dist = Dist(device=torch.device("cuda"))
    trainer = Trainer(cfg, StoreSource(cfg.store, [], cfg.batch_size, dist, seed=0, window_shards=2), dist)
    batch, _ = next(device_batches(trainer.source, 0, dist.device))
    trainer.train_step(batch, 0)
    sae = trainer.runs[0].sae
    assert all(p.dtype == torch.float32 and p.is_cuda for p in sae.parameters())
    assert sae.threshold.dtype == torch.float32
    assert all(
        v.dtype == torch.float32 for s in trainer.runs[0].optimizer.state.values() for k, v in s.items() if k != "step"
    )
    if dtype == "float32":
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    else:
        copy = sae.gemm_weight("W_enc")
        assert copy.dtype == torch.bfloat16 and sae.gemm_weight("W_enc") is copy
        assert torch.equal(copy, sae.W_enc.detach().to(torch.bfloat16))
