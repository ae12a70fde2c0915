"""Kill torture for N seeds: SIGKILL a cache run and a checkpointing training run at 20 random
instants per seed, rerunning the same command after each kill, and check the final store is
byte-identical and the final weights bitwise equal to an uninterrupted run's.

    python benchmarks/kill_torture.py --seeds 200 [--first-seed 0] [--kills 20] [--scenarios cache train]
                                      [--minutes 60]

Prints one line per seed and scenario (where its kills landed: mid-shard, mid-manifest,
shard-unlisted, between-writes for the cache; mid-checkpoint, between-checkpoints for
training), then the totals; exits non-zero if any result differed. tests/test_faults.py runs
one seed of each in CI; the scenarios and the mechanics are in tests/torture.py.
"""

from __future__ import annotations

import os

# Before torch is imported here or in the forkserver (which inherits the environment): one
# thread per process and no hub access, as in the test suite.
os.environ.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")

import argparse  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the tests package (tiny models, torture)

from tests import tiny, torture  # noqa: E402
from tests.synthetic import true_directions, write_store  # noqa: E402


def scenario(name: str, work: Path) -> torture.Scenario:
    """The scenario `name` with its inputs (a tiny model and text, or a synthetic store) in `work`."""
    if name == "cache":
        model = tiny.save_tiny_model(work / "model", "llama", tiny.tiny_tokenizer())
        return torture.cache_scenario(model, torture.write_corpus(work / "corpus"))
    store = write_store(work / "store", true_directions(64, 32), 32_768, tokens_per_shard=4096)
    return torture.train_scenario(store)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=10, help="how many seeds per scenario")
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--kills", type=int, default=20, help="kills per seed and scenario")
    p.add_argument("--scenarios", nargs="+", choices=["cache", "train"], default=["cache", "train"])
    p.add_argument("--minutes", type=float, default=0, help="start no seed after this many minutes (0: no limit)")
    p.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temporary one)")
    a = p.parse_args()

    with tempfile.TemporaryDirectory(dir=a.work) as tmp:
        work = Path(tmp)
        launcher = torture.Launcher(work / "runs.log")
        totals: dict[str, Counter] = {name: Counter() for name in a.scenarios}
        different, started = 0, time.perf_counter()
        chosen = {name: scenario(name, work) for name in a.scenarios}
        refs = {name: torture.reference(s, launcher, work / name / "ref") for name, s in chosen.items()}
        for name, ref in refs.items():
            print(f"{name}: uninterrupted run {ref.duration:.2f} s, start-up {ref.startup:.2f} s", flush=True)
        seeds = 0
        for seed in range(a.first_seed, a.first_seed + a.seeds):
            if a.minutes and time.perf_counter() - started > 60 * a.minutes:
                break
            seeds += 1
            for name, chosen_scenario in chosen.items():
                report = torture.torture(chosen_scenario, launcher, refs[name], work / name / "out", seed, a.kills)
                print(report.line(), flush=True)
                totals[name].update(report.landed)
                totals[name]["kills"] += report.kills
                totals[name]["early completions"] += report.completions
                different += not report.identical
        print(f"\n{seeds} seeds x {a.kills} kills per scenario, {time.perf_counter() - started:,.0f} s")
        for name, counts in totals.items():
            print(f"{name:6s} " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
        print("all results identical to the uninterrupted runs" if not different else f"{different} results DIFFERED")
    sys.exit(1 if different else 0)


if __name__ == "__main__":
    main()
