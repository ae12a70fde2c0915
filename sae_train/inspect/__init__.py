"""The inspect stage: feature records (top and quantile examples with their contexts, histogram,
frequency, logit lens) and a static feature browser for SAE and transcoder checkpoints.

    summary = run(InspectConfig(checkpoint="runs/sae", store="runs/acts", n_tokens=200_000,
                                out_dir="runs/inspect"))
    print(summary.table())            # open runs/inspect/index.html from disk
"""

from sae_train.inspect.config import InspectConfig
from sae_train.inspect.stage import InspectSummary, run

__all__ = ["InspectConfig", "InspectSummary", "run"]
