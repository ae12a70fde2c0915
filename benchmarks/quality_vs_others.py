"""Quality of our defaults against SAELens's and sparsify's on the same activation rows.

    python benchmarks/quality_vs_others.py --store runs/demo/acts --tc-store runs/acts2 --out runs/quality
        [--tokens 1000000] [--eval-tokens 20000] [--pairs matryoshka batchtopk topk transcoder]

Quick check: `--tokens 50000 --eval-tokens 1024`. The transcoder pair needs a store holding both
of its sites: `sae-train cache sites=[blocks.8.mlp.hook_in,blocks.8.hook_mlp_out] n_tokens=1000000
out_dir=runs/acts2`.

Each pair trains dictionaries of the same width (d_sae) and sparsity (k) on the same rows -- the
same tokens in the same order, in batches of the same size -- each with its own library's defaults
for everything else, then evaluates all of them in one `sae-train eval` call (FVU, L0, dead
latents on held-out text, CE with the dictionary spliced in, CE recovered, KL):

  matryoshka  ours `sae=matryoshka` vs SAELens's Matryoshka BatchTopK (same prefix widths)
  batchtopk   ours `sae=batchtopk`  vs SAELens's BatchTopK
  topk        ours `sae=topk`       vs sparsify's SparseCoder (TopK)
  transcoder  ours `sae=batchtopk` / `sae=batchtopk sae.skip=true` / `sae=topk`, each with
              `sae.target=blocks.8.hook_mlp_out` at sites=[blocks.8.mlp.hook_in], vs sparsify's
              transcoder (SparseCoder transcode=True; no skip connection, its default)

Ours: `sae-train train store=... sae=<arch> n_tokens=N out_dir=...`, nothing else set, exactly
as a user runs it. Its d_sae, k and prefix widths are read from the checkpoint it writes and given
to the other library, so both are the same size.

The harness's part in the other libraries' training: the rows (our trainer's stream,
`sae_train.train.build_source` with the same store, sites, seed, shuffle window, batch size and
token count: the same batches in the same order; checked against the run's recorded config),
`torch.manual_seed(0)` before their SAE is built, and the conversion of the trained weights into
our checkpoint format (`from_saelens`, `from_sparsify`; tests/test_foreign_conversions.py pins
both to the libraries' own forwards), with our run's recorded metadata (site, model, data) so
eval runs them on the same text.

SAELens 6.54 (everything else SAELens's): its training SAE built from its own config class with
only d_in, d_sae, k (and matryoshka_widths) set, so apply_b_dec_to_input, decoder_init_norm 0.1,
rescale_acts_by_decoder_norm, aux_loss_coefficient 1, topk_threshold_lr 0.01 and
normalize_activations "none" are its defaults; its own `SAETrainer.fit` loop, configured by
`LanguageModelSAERunnerConfig(...).to_sae_trainer_config()` (Adam lr 3e-4, betas 0.9/0.999,
constant schedule, gradient clipping at 1, dead_feature_window 1000 steps for AuxK, fp32); the
harness only hands it the rows as its data provider. The inference SAE is what SAELens saves
(`save_inference_model`: a JumpReLU with its EMA threshold, decoder norms folded in), loaded
as our `jumprelu`.

sparsify 1.3.3 (its `Trainer` drives the model's forward hooks, so the harness reproduces its step
loop, `Trainer.fit` with loss_fn "fvu", on the rows): `SparseCoder` built from `SparseCoderConfig`
with only num_latents, k (and transcode) set; TrainConfig's defaults -- the signum optimizer
(`ScheduleFreeWrapper(SignSGD, momentum=0.95)`, lr 5e-3 / sqrt(d_sae / 2^14)), auxk_alpha 0 (no
AuxK), no k decay; on the first batch b_dec = the target's mean (and, for a transcoder, the
encoder bias centres the pre-activations); every step the decoder rows are set to unit norm and
the gradient parallel to them removed (autoencoders only), loss = FVU over the batch; the weights
saved are the schedule-free average (`optimizer.eval()`, as its checkpoint does). sparsify's own
batch size is 32 sequences of 2048 tokens; here it gets our 4096-token batches, like the others.

Prints one table per pair and writes OUT/summary.json. Run outputs live under OUT.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from sae_train.sae import SAE, SAEConfig, load_sae_cfg, save_sae
from sae_train.sae.saelens import from_saelens
from sae_train.sae.sparsify import from_sparsify
from sae_train.train import TrainConfig, build_source
from sae_train.train.dist import Dist

SITE = "blocks.8.hook_resid_post"
TC_SOURCE, TC_TARGET = "blocks.8.mlp.hook_in", "blocks.8.hook_mlp_out"


@dataclass(frozen=True)
class Pair:
    name: str
    ours: dict[str, list[str]]
    """label -> our `sae-train train` overrides (besides store, n_tokens, out_dir)."""
    other: str
    """"saelens-matryoshka", "saelens-batchtopk", "sparsify" or "sparsify-transcoder"."""
    transcoder: bool = False


PAIRS = {
    p.name: p
    for p in (
        Pair("matryoshka", {"ours": ["sae=matryoshka"]}, "saelens-matryoshka"),
        Pair("batchtopk", {"ours": ["sae=batchtopk"]}, "saelens-batchtopk"),
        Pair("topk", {"ours": ["sae=topk"]}, "sparsify"),
        Pair(
            "transcoder",
            {
                f"ours-{label}": [f"sites=[{TC_SOURCE}]", f"sae.target={TC_TARGET}", *extra]
                for label, extra in (
                    ("batchtopk", ["sae=batchtopk"]),
                    ("batchtopk-skip", ["sae=batchtopk", "sae.skip=true"]),
                    ("topk", ["sae=topk"]),
                )
            },
            "sparsify-transcoder",
            transcoder=True,
        ),
    )
}


def cli(*args: str, log: Path) -> float:
    """Run `sae-train <args>` (this interpreter, this checkout), output into `log`; its wall time."""
    started = time.perf_counter()
    print("$ sae-train " + " ".join(args), flush=True)
    with log.open("w") as out:
        subprocess.run([sys.executable, "-m", "sae_train.cli", *args], check=True, stdout=out, stderr=subprocess.STDOUT)
    return time.perf_counter() - started


def rows(recorded: dict) -> Iterator[dict]:
    """Our trainer's batches ({site: rows [batch_size, d]}, fp32) for the run whose config (its
    run_state.json) is `recorded`: the same rows in the same order as it trained on."""
    if recorded["source"] != "store":
        raise SystemExit(f"our run read source={recorded['source']}; the harness replays store runs")
    cfg = TrainConfig(
        store=recorded["store"],
        sites=recorded["sites"],
        sae=SAEConfig(target=recorded["sae"]["target"]),
        n_tokens=recorded["n_tokens"],
        batch_size=recorded["batch_size"],
        seed=recorded["seed"],
        shuffle_window=recorded["shuffle_window"],
    )
    batches = build_source(cfg, Dist()).batches(0)
    for _ in range(cfg.n_steps):
        yield next(batches)


# ------------------------------------------------------------------------------------ SAELens


def train_saelens(kind: str, ours: dict, batches: Iterator[dict], n_steps: int, batch_size: int, out: Path) -> SAE:
    """SAELens's (Matryoshka) BatchTopK trained by its own SAETrainer on `batches`; returns it as our SAE."""
    from sae_lens.config import LanguageModelSAERunnerConfig, LoggingConfig
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.saes.matryoshka_batchtopk_sae import (
        MatryoshkaBatchTopKTrainingSAE,
        MatryoshkaBatchTopKTrainingSAEConfig,
    )
    from sae_lens.training.sae_trainer import SAETrainer

    size = {"d_in": ours["d_in"], "d_sae": ours["d_sae"], "k": ours["k"]}
    torch.manual_seed(0)
    if kind == "saelens-matryoshka":
        widths = [round(p * ours["d_sae"]) if p <= 1 else int(p) for p in ours["matryoshka_prefixes"]]
        sae_cfg: Any = MatryoshkaBatchTopKTrainingSAEConfig(**size, matryoshka_widths=widths)
        sae: Any = MatryoshkaBatchTopKTrainingSAE(sae_cfg)
    else:
        sae_cfg = BatchTopKTrainingSAEConfig(**size)
        sae = BatchTopKTrainingSAE(sae_cfg)
    runner = LanguageModelSAERunnerConfig(
        sae=sae_cfg,
        training_tokens=n_steps * batch_size,
        train_batch_size_tokens=batch_size,
        checkpoint_path=None,
        output_path=None,
        logger=LoggingConfig(log_to_wandb=False),
    )
    site = ours["site"]
    SAETrainer(cfg=runner.to_sae_trainer_config(), sae=sae, data_provider=(b[site] for b in batches)).fit()
    folder = out / "saelens-inference"
    sae.save_inference_model(str(folder))
    cfg = json.loads((folder / "cfg.json").read_text())
    return from_saelens(cfg, load_file(folder / "sae_weights.safetensors"), source=str(folder))


# ------------------------------------------------------------------------------------ sparsify


def train_sparsify(ours: dict, batches: Iterator[dict], target: str) -> SAE:
    """sparsify's SparseCoder trained with its Trainer's step on `batches`; returns it as our SAE.
    `target` set: a transcoder reading our site and writing `target` (sparsify's transcode=True)."""
    from schedulefree import ScheduleFreeWrapper
    from sparsify import SparseCoder, SparseCoderConfig
    from sparsify import TrainConfig as SparsifyTrainConfig
    from sparsify.sign_sgd import SignSGD

    transcode = bool(target)
    train_cfg = SparsifyTrainConfig(SparseCoderConfig(num_latents=ours["d_sae"], k=ours["k"], transcode=transcode))
    if train_cfg.optimizer != "signum" or train_cfg.k_decay_steps or train_cfg.sae.multi_topk:
        raise SystemExit(f"sparsify's defaults changed ({train_cfg}); update the harness's step loop")
    torch.manual_seed(train_cfg.init_seeds[0])
    coder = SparseCoder(ours["d_in"], train_cfg.sae, "cpu", dtype=torch.float32)
    lr = train_cfg.lr or 5e-3 / (coder.num_latents / 2**14) ** 0.5
    optimizer = ScheduleFreeWrapper(SignSGD([{"params": coder.parameters(), "lr": lr}]), momentum=0.95)
    optimizer.train()
    since_fired = torch.zeros(coder.num_latents, dtype=torch.long)
    did_fire = torch.zeros(coder.num_latents, dtype=torch.bool)
    unit_decoder = train_cfg.sae.normalize_decoder and not transcode
    site = ours["site"]
    for step, batch in enumerate(batches):
        x = batch[site]
        y = batch[target] if transcode else x
        if step == 0:
            if transcode:
                coder.encoder.bias.data = -x.mean(0) @ coder.encoder.weight.data.T
            coder.b_dec.data = y.mean(0)
        if unit_decoder:
            coder.set_decoder_norm_to_unit_norm()
        dead = since_fired > train_cfg.dead_feature_threshold if train_cfg.auxk_alpha > 0 else None
        out = coder(x=x, y=y, dead_mask=dead, total_variance=(y - y.mean(0)).pow(2).sum())
        did_fire[out.latent_indices.flatten()] = True
        (out.fvu + train_cfg.auxk_alpha * out.auxk_loss + out.multi_topk_fvu / 8).backward()
        if unit_decoder:
            coder.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        optimizer.zero_grad()
        since_fired += x.shape[0]
        since_fired[did_fire] = 0
        did_fire.zero_()
    optimizer.eval()  # the schedule-free average: what sparsify's checkpoint saves
    cfg = {**coder.cfg.to_dict(), "d_in": coder.d_in}
    return from_sparsify(cfg, coder.state_dict(), target=target, source="sparsify SparseCoder")


# ------------------------------------------------------------------------------------ the pairs


def train_other(pair: Pair, ours_dir: Path, out: Path) -> tuple[SAE, dict, float]:
    """The other library's dictionary for `pair`, trained on the rows our run at `ours_dir` saw:
    (our SAE of it, a record of how it trained, wall seconds)."""
    meta = load_sae_cfg(ours_dir)
    recorded = json.loads((ours_dir.parent / "run_state.json").read_text())["config"]
    batch_size = recorded["batch_size"]
    n_steps = recorded["n_tokens"] // batch_size
    target = meta["target"]
    batches = rows(recorded)
    started = time.perf_counter()
    if pair.other.startswith("saelens"):
        sae = train_saelens(pair.other, meta, batches, n_steps, batch_size, out)
        library = f"sae-lens {version('sae-lens')}"
    else:
        sae = train_sparsify(meta, batches, target)
        library = f"eai-sparsify {version('eai-sparsify')}"
    seconds = time.perf_counter() - started
    return sae, {"library": library, "kind": pair.other, "steps": n_steps, "batch_size": batch_size}, seconds


def run_pair(pair: Pair, store: str, n_tokens: int, eval_tokens: int, out: Path) -> dict[str, Any]:
    ckpts = out / pair.name / "ckpts"
    logs = out / pair.name / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    ours_dirs: dict[str, Path] = {}
    for label, overrides in pair.ours.items():
        run = ckpts / label
        seconds[label] = cli(
            "train", f"store={store}", *overrides, f"n_tokens={n_tokens}", f"out_dir={run}", "progress=false",
            log=logs / f"{label}.log",
        )  # fmt: skip
        ours_dirs[label] = next(p.parent for p in sorted(run.glob("*/sae.safetensors")))
    first = next(iter(ours_dirs.values()))
    sae, record, seconds[pair.other] = train_other(pair, first, out / pair.name)
    meta = load_sae_cfg(first)
    keep = {k: v for k, v in meta.items() if k in ("site", "source", "provenance")}
    save_sae(sae, ckpts / pair.other, {**keep, "tag": pair.other, "train": record})
    print(f"{pair.other}: trained in {seconds[pair.other]:.0f} s -> {ckpts / pair.other}", flush=True)
    evals = out / pair.name / "eval"
    seconds["eval"] = cli(
        "eval", f"checkpoint={ckpts}", f"n_tokens={eval_tokens}", f"out_dir={evals}", "progress=false",
        log=logs / "eval.log",
    )  # fmt: skip
    report = json.loads((evals / "eval.json").read_text())
    results = {}
    for name, entry in report["saes"].items():
        label = name.split("/")[0]
        m = entry["metrics"]
        results[label] = {
            "architecture": entry["architecture"],
            "d_sae": entry["d_sae"],
            **{key: m.get(key) for key in ("l0", "fvu", "ce_clean", "ce_sae", "ce_recovered", "kl", "dead_fraction")},
        }
    return {"results": results, "seconds": seconds, "eval_tokens": report["tokens"]["counted"]}


def table(name: str, summary: dict[str, Any]) -> str:
    lines = [
        f"{name} (eval on {summary['eval_tokens']:,} held-out tokens)",
        "| dictionary | arch (as evaluated) | L0 | FVU | CE loss (clean) | CE recovered | KL | dead on eval tokens |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for label, r in summary["results"].items():
        ce = f"{r['ce_sae']:.4f} (+{r['ce_sae'] - r['ce_clean']:.3f}; {r['ce_clean']:.4f})"
        lines.append(
            f"| {label} | {r['architecture']} | {r['l0']:.1f} | {r['fvu']:.3f} | {ce} | {r['ce_recovered']:.3f} | "
            f"{r['kl']:.3f} | {100 * r['dead_fraction']:.1f}% |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", default="runs/demo/acts", help=f"activation store with {SITE}")
    parser.add_argument("--tc-store", default="runs/acts2", help=f"store with {TC_SOURCE} and {TC_TARGET}")
    parser.add_argument("--out", type=Path, default=Path("runs/quality_vs_others"))
    parser.add_argument("--tokens", type=int, default=1_000_000, help="training tokens")
    parser.add_argument("--eval-tokens", type=int, default=20_000, help="held-out tokens for sae-train eval")
    parser.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    args = parser.parse_args()
    out = args.out.resolve()
    summary_file = out / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    print(f"torch threads: {torch.get_num_threads()} (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')})")
    for name in args.pairs:
        pair = PAIRS[name]
        store = os.path.abspath(args.tc_store if pair.transcoder else args.store)
        result = run_pair(pair, store, args.tokens, args.eval_tokens, out)
        summary[name] = {"store": store, "tokens": args.tokens, **result}
        summary_file.parent.mkdir(parents=True, exist_ok=True)
        summary_file.write_text(json.dumps(summary, indent=2) + "\n")
        print(table(name, summary[name]), flush=True)
    print(f"summary: {summary_file}")


if __name__ == "__main__":
    main()
