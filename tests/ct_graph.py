"""Run circuit-tracer on an exported transcoder set or CLT, as a user would; executed by the interop venv's
python (`make interop`), never imported by the suite (sae_train is not installed there).

    python tests/ct_graph.py MODEL_DIR SET_DIR INPUTS OUT_DIR [PROMPT]

MODEL_DIR and SET_DIR are absolute local paths (offline: HF_HUB_OFFLINE=1). INPUTS is a
safetensors file with `input_ids` [1, T] and, per layer l, `x_{l}` [n, d_model]. Writes to OUT_DIR
`outputs.safetensors` (`acts` [L, T, d_t]: circuit-tracer's transcoder activations on input_ids,
position 0 zeroed as it does; `out_{l}`: its transcoder l applied to x_{l}, for a set) and `graph.json` (the
attribution graph for PROMPT: active features per layer, node counts, seconds).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def main() -> None:
    from circuit_tracer import ReplacementModel, attribute

    model_dir, set_dir, inputs_file, out_dir = sys.argv[1:5]
    prompt = sys.argv[5] if len(sys.argv) > 5 else "def alpha(beta): return gamma"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    model = ReplacementModel.from_pretrained(
        model_dir, set_dir, backend="nnsight", dtype=torch.float32, device=torch.device("cpu")
    )
    loaded = time.perf_counter()
    inputs = load_file(inputs_file)
    transcoders = model.transcoders._module  # the TranscoderSet or CrossLayerTranscoder behind nnsight's envoy
    n_layers = transcoders.n_layers
    _, acts = model.get_activations(inputs["input_ids"])
    outputs = {"acts": acts.float().contiguous()}
    with torch.no_grad():
        for layer in range(n_layers):
            if f"x_{layer}" in inputs:
                outputs[f"out_{layer}"] = transcoders[layer](inputs[f"x_{layer}"]).float().contiguous()
    save_file(outputs, str(out / "outputs.safetensors"))
    # Its dense edge matrix is [max_feature_nodes, all nodes]: bounded as in circuit-tracer's demos.
    graph = attribute(prompt, model, max_n_logits=5, batch_size=256, max_feature_nodes=4096)
    done = time.perf_counter()
    layers = graph.active_features[:, 0].tolist()
    report = {
        "n_layers": n_layers,
        "d_transcoder": transcoders.d_transcoder,
        "active_features": len(layers),
        "active_per_layer": [layers.count(i) for i in range(n_layers)],
        "positions": sorted(set(graph.active_features[:, 1].tolist())),
        "nodes": int(graph.adjacency_matrix.shape[0]),
        "logit_targets": len(graph.logit_targets),
        "load_seconds": loaded - started,
        "graph_seconds": done - loaded,
    }
    (out / "graph.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
