"""The eval stage: reconstruction, sparsity and downstream-loss metrics of SAE checkpoints.

    summary = run(EvalConfig(checkpoint="runs/sae", n_tokens=20_000, out_dir="runs/eval"))
    print(summary.table())            # also in out_dir: eval.json, eval.md, density.png

`PeriodicEval` is the cheap variant a training run calls every so often (see periodic.py).
"""

from sae_train.eval.config import EvalConfig
from sae_train.eval.downstream import SiteEvaluator, layer_forwards
from sae_train.eval.periodic import PeriodicEval
from sae_train.eval.report import EvalSummary
from sae_train.eval.stage import run

__all__ = ["EvalConfig", "EvalSummary", "PeriodicEval", "SiteEvaluator", "layer_forwards", "run"]
