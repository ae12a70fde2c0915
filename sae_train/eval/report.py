"""The eval's outputs: eval.json (every number + what produced it), eval.md (a table to paste
into a paper or model card, with the definitions), density.png, and the printed summary."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from sae_train.atomic import write_atomic, write_text_atomic
from sae_train.provenance import public_source

# (header, metric, format); downstream columns are left out when the eval ran without them.
_COLUMNS = [
    ("L0", "l0", "{:.1f}"),
    ("FVU", "fvu", "{:.4f}"),
    ("MSE", "mse", "{:.4g}"),
    ("dead", "dead_fraction", "{:.1%}"),
    ("dense", "dense_fraction", "{:.1%}"),
    ("CE clean", "ce_clean", "{:.4f}"),
    ("CE SAE", "ce_sae", "{:.4f}"),
    ("CE zero-abl.", "ce_zero", "{:.4f}"),
    ("CE mean-abl.", "ce_mean", "{:.4f}"),
    ("CE recovered", "ce_recovered", "{:.4f}"),
    ("KL", "kl", "{:.4f}"),
]

DEFINITIONS = """\
## Definitions

All numbers are computed on held-out text (the eval split of the data source, which shares no
document — no file, for file sources — with the training split), on raw activations (the
checkpoint has its normalisation folded in). A position is *counted* when training would have
used its activation: every position but the special tokens' (BOS, EOS, padding) when the
checkpoint's text settings excluded special tokens (the default), every position otherwise.

- **MSE**: mean over counted tokens of the squared error summed over dimensions,
  `mean_t Σ_d (x − x̂)²` (the unit of the training loss). `mse_per_element` in eval.json is the
  same divided by d_in (`F.mse_loss`).
- **FVU** (fraction of variance unexplained): `Σ_t ||x_t − x̂_t||² / Σ_t ||x_t − μ||²`, μ the
  per-dimension mean over all eval tokens; explained variance = 1 − FVU (in eval.json).
- **L0**: mean over counted tokens of the number of nonzero latents.
- **dead**: latents nonzero on no counted eval token; **dense**: latents nonzero on more than
  `dense_threshold` of them. density.png histograms log10 of each live latent's firing frequency.
- **CE**: mean next-token cross-entropy (nats) over every prediction whose *target* is counted
  (position t predicts token t+1), the same predictions for every condition. *clean*: the
  model as is; *SAE*: the site's value replaced by the SAE's reconstruction; *zero-abl.*: by 0;
  *mean-abl.*: by its mean over the batch's counted tokens (one batch holds thousands of
  tokens, so this is the eval-set mean to within noise, without a second pass). Every
  replacement is made at counted positions only, for the whole forward pass; the clean
  activation stays at the other positions, which the SAE never trained on.
- **CE recovered** = (CE_zero − CE_SAE) / (CE_zero − CE_clean). eval.json also has
  `ce_recovered_mean`, the same with mean ablation (more telling for residual-stream sites,
  where zero ablation is catastrophic).
- **KL**: mean over the same predictions of KL(p_clean ‖ p_SAE) = Σ_v p_clean (log p_clean −
  log p_SAE), in nats. eval.json also has `kl_zero`, `kl_mean` and `kl_score` =
  (KL_zero − KL_SAE) / KL_zero.

Correspondence with SAELens `sae_lens/evals.py` (github.com/jbloomAus/SAELens, read at
03a2eaf) and SAEBench `sae_bench/evals/core/main.py` (github.com/adamkarvonen/SAEBench, read
at 10e0728): CE recovered is their `ce_loss_score`, our KL their `kl_div_with_sae` (same
formula, same direction), `kl_score` their `kl_div_score`, L0 their `l0`, and the per-latent
firing frequency their `feature_density`. Like SAELens (and SAEBench with
`exclude_special_tokens_from_reconstruction`), the SAE replaces only non-ignored positions.
Differences: (1) SAEBench's `explained_variance` (SAELens's
`explained_variance_legacy`) averages a per-token ratio `1 − ||x_t − x̂_t||² / ||x_t − μ_batch||²`
over tokens, and SAELens's `explained_variance` pools batch sums with another variance
estimate; ours is one ratio of sums over all eval tokens (EleutherAI sparsify's `fvu`
formula, pooled over the eval set instead of per batch), which a few low-variance tokens
cannot dominate; (2) their `mse` divides the per-token squared error by the batch's token count
before averaging, ours is the plain mean; (3) they drop a prediction when its *input* token is
ignored, we when its *target* is (with special tokens excluded, predicting BOS/padding is not
scored; predicting from BOS is); (4) their zero ablation replaces every position, including BOS, ours only the
counted positions that the SAE replaces.
"""


FREQUENCY_FILE = "frequency.safetensors"


@dataclass
class EvalSummary:
    """Everything one eval call produced; `payload` is eval.json."""

    out_dir: str
    payload: dict[str, Any]
    frequencies: dict[str, torch.Tensor] = field(default_factory=dict)
    """Per SAE name: each latent's firing frequency over the counted eval tokens (float32 [d_sae]);
    written to frequency.safetensors, which export turns into SAELens's sparsity.safetensors."""

    @property
    def saes(self) -> dict[str, dict[str, Any]]:
        """Per SAE name: checkpoint, site, architecture, metrics, density histogram, cfg.json."""
        return self.payload["saes"]

    def table(self) -> str:
        lines = [metrics_table(self.saes), ""]
        for site, cost in self.payload["cost"].items():
            lines.append(
                f"cost per batch at {site}: {cost['conditions']} conditions, {cost['shared']} layer-forwards "
                f"with the shared prefix vs {cost['naive']} naive ({cost['shared'] / cost['naive']:.0%})"
            )
        if "replacement" in self.payload:
            lines.append(replacement_line(self.payload["replacement"]))
        tokens = self.payload["tokens"]
        lines.append(
            f"tokens       {tokens['run']:,} run, {tokens['counted']:,} counted ({tokens['windows']} windows "
            f"of {tokens['context_size']})"
        )
        lines.append(f"wrote        {Path(self.out_dir) / 'eval.json'}, eval.md, density.png")
        return "\n".join(lines)


def replacement_line(r: dict[str, Any]) -> str:
    """The replacement model (every transcoder of a set spliced in at once) in one line."""
    return (
        f"all {len(r['saes'])} transcoders spliced at once: CE {_fmt('{:.4f}', r['ce_clean'])} clean -> "
        f"{_fmt('{:.4f}', r['ce_replaced'])} replaced, KL {_fmt('{:.4f}', r['kl'])}"
    )


def _fmt(fmt: str, value: Any) -> str:
    return "–" if value is None or (isinstance(value, float) and not math.isfinite(value)) else fmt.format(value)


def metrics_table(saes: dict[str, dict[str, Any]]) -> str:
    """A Markdown table, one row per SAE."""
    present = [c for c in _COLUMNS if any(c[1] in info["metrics"] for info in saes.values())]
    header = ["SAE", "site", "arch", "d_sae", *(c[0] for c in present)]
    rows = [
        [
            name,
            info["site"],
            info["architecture"],
            str(info["d_sae"]),
            *(_fmt(fmt, info["metrics"].get(key)) for _, key, fmt in present),
        ]
        for name, info in saes.items()
    ]
    return "\n".join("| " + " | ".join(row) + " |" for row in [header, ["---"] * len(header), *rows])


def _finite(obj: Any) -> Any:
    """NaN/inf -> null: JSON has no such numbers and strict parsers reject Python's NaN."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def markdown(summary: EvalSummary) -> str:
    p = summary.payload
    public = public_source({"model": p["model"], "data": p["data"]})  # eval.md goes into published model cards
    model, data, tokens = public["model"], public["data"], p["tokens"]
    source = data["source"] + (f" {data['path']}" if data.get("path") else "")
    return "\n".join(
        [
            "# SAE evaluation",
            "",
            f"Model `{model.get('hub_id') or model.get('name')}` (revision {model.get('revision')}, {model.get('dtype')}); "
            f"data: {source}, eval split; {tokens['run']:,} tokens in {tokens['windows']} windows of "
            f"{tokens['context_size']}, {tokens['counted']:,} counted, {tokens['predictions']:,} scored predictions.",
            "",
            metrics_table(summary.saes),
            "",
            *(
                [replacement_line(p["replacement"]) + " (the replacement model of circuit tracing).", ""]
                if "replacement" in p
                else []
            ),
            DEFINITIONS,
        ]
    )


def plot_density(path: Path, saes: dict[str, dict[str, Any]]) -> None:
    """One panel per SAE: histogram of log10 firing frequency over its live latents."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # explicit Agg: no display, no global backend switch
    from matplotlib.figure import Figure

    cols = min(len(saes), 3)
    rows = math.ceil(len(saes) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.0 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True)
    for ax, (name, info) in zip(axes.flat, saes.items()):
        hist = info["density"]
        ax.stairs(hist["counts"], hist["log10_edges"], fill=True)
        ax.set_title(f"{name}\n{hist['n_dead']} dead of {info['d_sae']}", fontsize=8)
        ax.set_xlabel("log10 firing frequency")
        ax.tick_params(labelbottom=True)  # sharex hides them above an empty panel
        ax.set_ylabel("latents")
    for ax in axes.flat[len(saes) :]:
        ax.set_visible(False)
    fig.savefig(path, dpi=110, format="png")


def write_report(summary: EvalSummary) -> None:
    out = Path(summary.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_finite(summary.payload), indent=2) + "\n"
    write_text_atomic(out / "eval.json", text)
    write_text_atomic(out / "eval.md", markdown(summary))
    write_atomic(out / "density.png", lambda tmp: plot_density(tmp, summary.saes))
    if summary.frequencies:
        tensors = {name: f.float().contiguous().cpu() for name, f in summary.frequencies.items()}
        write_atomic(out / FREQUENCY_FILE, lambda tmp: save_file(tensors, str(tmp)))
