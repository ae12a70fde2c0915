"""Eval metrics against hand computations on fixed tensors (no model)."""

from __future__ import annotations

import math

import pytest
import torch

from sae_train.data import TextConfig, TokenSpec
from sae_train.data.packing import keep_mask
from sae_train.eval.downstream import layer_forwards, next_token_log_probs
from sae_train.eval.metrics import (
    LossStats,
    ReconstructionStats,
    ce_recovered,
    density_histogram,
    token_ce,
    token_kl,
)

X = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 0.0]])
X_HAT = torch.tensor([[1.0, 1.0], [3.0, 3.0], [4.0, 0.0]])
LATENTS = torch.tensor([[1.0, 0.0, 0.0, 2.0], [0.0, 0.0, 0.0, 3.0], [0.0, 0.0, 0.0, 1.0]])


def test_reconstruction_metrics_by_hand():
    stats = ReconstructionStats(d_in=2, d_sae=4)
    stats.update(X[:2], X_HAT[:2], LATENTS[:2])  # two batches: the result may not depend on batching
    stats.update(X[2:], X_HAT[2:], LATENTS[2:])
    m = stats.metrics(dense_threshold=0.5)
    # errors per token: [0,1], [0,1], [1,0] -> squared error 1 per token, 3 in all
    assert m["mse"] == pytest.approx(1.0)
    assert m["mse_per_element"] == pytest.approx(0.5)
    # mean x = [3, 2]; centred rows [-2,0], [0,2], [2,-2] -> total sum of squares 16
    assert m["fvu"] == pytest.approx(3 / 16)
    assert m["explained_variance"] == pytest.approx(13 / 16)
    assert m["l0"] == pytest.approx(4 / 3)  # 2, 1, 1 nonzero latents
    # firing counts [1, 0, 0, 3] of 3 tokens: latents 1 and 2 dead; only latent 3 fires on > 50%
    assert (m["dead_fraction"], m["n_dead"]) == (0.5, 2)
    assert (m["dense_fraction"], m["n_dense"]) == (0.25, 1)
    assert m["n_tokens"] == 3


def test_streaming_fvu_is_exact_under_a_large_mean():
    """Residual streams have dims whose mean dwarfs their spread; batching must not lose precision."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 8, generator=gen) + 1000.0
    x_hat = x + 0.1 * torch.randn(300, 8, generator=gen)
    stats = ReconstructionStats(d_in=8, d_sae=3)
    for chunk in range(0, 300, 64):
        stats.update(x[chunk : chunk + 64], x_hat[chunk : chunk + 64], torch.ones(len(x[chunk : chunk + 64]), 3))
    x64, x_hat64 = x.double(), x_hat.double()
    expect = (x64 - x_hat64).pow(2).sum() / (x64 - x64.mean(0)).pow(2).sum()
    assert stats.metrics(0.1)["fvu"] == pytest.approx(expect.item(), rel=1e-9)


def test_density_histogram_counts():
    freq = torch.tensor([0.0, 0.002, 0.02, 0.5, 1.0])
    hist = density_histogram(freq, n_tokens=1000)
    edges, counts = hist["log10_edges"], hist["counts"]
    assert len(edges) == 31 and edges[0] == -3.0 and edges[-1] == 0.0  # 10 bins per decade from 1/1000 to 1
    # log10: -2.70 -> bin 3, -1.70 -> bin 13, -0.30 -> bin 26, 0 -> the last bin (right edge included)
    assert counts == [1 if i in (3, 13, 26, 29) else 0 for i in range(30)]
    assert hist["n_dead"] == 1


def test_ce_and_kl_by_hand():
    clean = torch.tensor([[0.5, 0.25, 0.25], [0.5, 0.25, 0.25]]).log()
    spliced = torch.tensor([[0.25, 0.5, 0.25], [0.5, 0.25, 0.25]]).log()
    targets = torch.tensor([0, 1])
    assert torch.allclose(token_ce(spliced, targets), torch.tensor([math.log(4), math.log(4)]))
    # KL(clean || spliced) = 0.5 ln 2 + 0.25 ln 0.5 + 0 for the first prediction, 0 for the second
    assert torch.allclose(token_kl(clean, spliced), torch.tensor([0.25 * math.log(2), 0.0]), atol=1e-7)
    stats = LossStats()
    stats.update(spliced[:1], clean[:1], targets[:1])
    stats.update(spliced[1:], clean[1:], targets[1:])
    assert stats.n == 2
    assert stats.mean_ce == pytest.approx(math.log(4))
    assert stats.mean_kl == pytest.approx(0.125 * math.log(2))
    assert math.isnan(LossStats().mean_ce)


def test_ce_recovered():
    assert ce_recovered(ce_clean=2.0, ce_sae=2.5, ce_ablated=6.0) == pytest.approx(0.875)
    assert ce_recovered(2.0, 2.0, 6.0) == 1.0 and ce_recovered(2.0, 6.0, 6.0) == 0.0
    assert math.isnan(ce_recovered(2.0, 2.5, 2.0))


def test_scored_predictions_are_those_whose_target_counts():
    logits = torch.randn(1, 4, 5)
    scored = torch.tensor([[True, False, True]])  # targets at positions 1, 2, 3
    log_probs = next_token_log_probs(logits, scored)
    assert torch.allclose(log_probs, torch.log_softmax(logits[0, [0, 2]], -1))


def test_kept_positions(tiny_tokenizer):
    bos, eos, pad = tiny_tokenizer.bos_token_id, tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id
    ids = torch.tensor([[bos, 7, eos, 9, pad]])
    strict = TokenSpec.from_tokenizer(tiny_tokenizer, TextConfig(exclude_special_tokens=True))
    assert keep_mask(ids, strict).tolist() == [[False, True, False, True, False]]
    # Special tokens kept: every position counts, BOS included (training used its activation).
    loose = TokenSpec.from_tokenizer(tiny_tokenizer, TextConfig(exclude_special_tokens=False))
    assert keep_mask(ids, loose).tolist() == [[True] * 5]


def test_layer_forward_cost():
    # 12 layers, site rerun from layer 7, clean + 3 conditions: 12 + 3 * 5 shared vs 4 * 12 naive
    assert layer_forwards(12, 7, 4) == {"shared": 27, "naive": 48}
    assert layer_forwards(3, 0, 3) == {"shared": 9, "naive": 9}  # a site before every layer saves nothing
