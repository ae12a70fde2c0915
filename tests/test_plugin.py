"""Adding an architecture is one module plus one registry call: a toy architecture defined
here goes through cache -> train (store source) -> eval -> export -> SAELens and our loader,
through the public functions only, with nothing else taught about it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor

from sae_train import cache, export, train
from sae_train import eval as eval_stage
from sae_train.cache import CacheConfig
from sae_train.data import TextConfig
from sae_train.eval import EvalConfig
from sae_train.export import ExportConfig
from sae_train.hub import load_exported
from sae_train.lm import ModelConfig
from sae_train.sae import ARCHITECTURES, SAE, SAEConfig, SAEOutput, load_sae, register
from sae_train.train import TrainConfig

SITE = "blocks.1.hook_resid_post"


class ThresholdReLUSAE(SAE):
    """Toy: f = z * [z > t] with a fixed threshold t = l1_coefficient / 2, trained with L1."""

    architecture = "threshold_relu"
    config_fields = frozenset({"l1_coefficient"})
    inference_tensors = (*SAE.inference_tensors, "threshold")
    saelens_architecture, saelens_training_architecture = "jumprelu", "threshold_relu"

    def __init__(self, cfg: SAEConfig, *, compute_dtype: torch.dtype = torch.float32) -> None:
        super().__init__(cfg, compute_dtype=compute_dtype)
        self.register_buffer("threshold", torch.full((cfg.d_sae,), cfg.l1_coefficient / 2))

    def _activation(self, z: Tensor) -> Tensor:
        return z * (z > self.threshold).to(z.dtype)

    def _fold_extra(self, latent_scale: Tensor) -> None:
        self.threshold.mul_(latent_scale)

    def _forward_torch(self, x: Tensor, target: Tensor, dead_mask: Tensor | None, sparsity_scale: float) -> SAEOutput:
        f = self._activation(self._preact(x))
        x_hat = self._matmul(f, self.W_dec) + self.b_dec
        mse, l1 = self._mse(x_hat, target), f.sum(-1).mean()
        active = f != 0
        loss = mse + self.cfg.l1_coefficient * sparsity_scale * l1
        return SAEOutput(
            x_hat, {"loss": loss, "mse": mse, "l1": l1}, active.sum(-1).float().mean(), active.any(0), f.detach()
        )


@pytest.fixture
def toy():
    register(ThresholdReLUSAE)
    try:
        yield ThresholdReLUSAE
    finally:
        del ARCHITECTURES[ThresholdReLUSAE.architecture]


def test_a_registered_toy_architecture_trains_evaluates_and_exports(toy, tiny_model_dir, tmp_path: Path):
    model = ModelConfig(name=str(tiny_model_dir("llama")), dtype="float32", device="cpu")
    cache.run(
        CacheConfig(
            model=model,
            sites=[SITE],
            text=TextConfig(context_size=32),
            n_tokens=4096,
            tokens_per_shard=1024,
            batch_size=128,
            store_dtype="float32",
            out_dir=str(tmp_path / "acts"),
            progress=False,
        )
    )
    summary = train.run(
        TrainConfig(
            store=str(tmp_path / "acts"),
            out_dir=str(tmp_path / "sae"),
            n_tokens=4096,
            batch_size=256,
            dtype="float32",
            progress=False,
            sae=SAEConfig(architecture="threshold_relu", l1_coefficient=0.01, expansion_factor=2),
        )
    )
    metrics = summary.saes[SITE]["metrics"]
    assert metrics["fvu"] < 0.5 and metrics["l0"] > 0

    checkpoint = Path(summary.saes[SITE]["checkpoint"])
    ours = load_sae(checkpoint)
    assert type(ours) is toy and ours.folded
    # folding scaled the threshold with the latents: the raw-scale SAE fires where training did
    assert not torch.allclose(ours.threshold, torch.full_like(ours.threshold, 0.005))

    evaluation = eval_stage.run(
        EvalConfig(
            checkpoint=str(tmp_path / "sae"),
            out_dir=str(tmp_path / "eval"),
            model=ModelConfig(name="", device="cpu"),
            n_tokens=512,
            batch_size=4,
            progress=False,
        )
    )
    (entry,) = evaluation.saes.values()
    assert entry["architecture"] == "threshold_relu" and 0 < entry["metrics"]["fvu"] < 1
    assert "ce_recovered" in entry["metrics"]

    exported = export.run(
        ExportConfig(
            checkpoint=str(tmp_path / "sae"), out_dir=str(tmp_path / "export"), eval_dir=str(tmp_path / "eval")
        )
    )
    (info,) = exported.saes
    assert (info.architecture, info.saelens_architecture, info.k) == ("threshold_relu", "jumprelu", None)
    back = load_exported(tmp_path / "export", folder=SITE)
    assert type(back) is toy
    x = ours.b_dec + torch.randn(64, ours.cfg.d_in) / ours.normalization_scale
    torch.testing.assert_close(back.decode(back.encode(x)), ours.decode(ours.encode(x)), rtol=0, atol=0)

    sae_lens = pytest.importorskip("sae_lens")
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "export" / SITE))
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(x), ours.encode(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(theirs.decode(theirs.encode(x)), ours.decode(ours.encode(x)), rtol=1e-5, atol=1e-5)


def test_registering_a_taken_name_is_refused(toy):
    class Impostor(ThresholdReLUSAE):
        pass

    with pytest.raises(ValueError, match="already registered"):
        register(Impostor)
