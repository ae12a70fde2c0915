"""A folded cross-layer transcoder in circuit-tracer's CLT layout (circuit-tracer 0.5.0,
`transcoder/cross_layer_transcoder.py`: `to_safetensors` / `_load_state_dict`, and
`utils/caching.py` `load_transcoders_from_cache` for a local absolute directory):

    config.yaml            model_kind: cross_layer_transcoder, feature_input_hook, feature_output_hook
                           (TransformerLens hook names without the `blocks.L.` prefix), model_name
    W_enc_{l}.safetensors  W_enc_{l} [d_sae, d_in], b_enc_{l} [d_sae], b_dec_{l} [d_out], threshold_{l} [d_sae]
    W_dec_{l}.safetensors  W_dec_{l} [d_sae, L - l, d_out]

circuit-tracer encodes layer l as x_l @ W_enc_{l}^T + b_enc_{l} (no centring, no scaling: the
fold put everything into the weights), keeps z * (z > threshold_{l}) (JumpReLU: the file has
thresholds) and adds W_dec_{s}[:, j - s] of every active latent of layers s <= j, plus b_dec_{j},
to layer j's output -- our inference math exactly. Its loader reads no skip connection for this
layout, so a CLT trained with sae.skip=true is refused here rather than exported without it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import Tensor

from sae_train.errors import UserError
from sae_train.sae.clt import CrossLayerTranscoder

MODEL_KIND = "cross_layer_transcoder"
CONFIG_FILE = "config.yaml"


def is_export_file(name: str) -> bool:
    """Whether a file name is one this layout writes (an export may replace it)."""
    return name == CONFIG_FILE or re.fullmatch(r"W_(enc|dec)_\d+\.safetensors", name) is not None


def hook_name(site: str) -> str:
    """circuit-tracer's per-layer hook name of one of our sites: blocks.3.mlp.hook_in -> mlp.hook_in."""
    match = re.match(r"^blocks\.\d+\.(.+)$", site)
    if match is None:
        raise UserError(
            f"Site {site} is not a layer site (blocks.L.…); circuit-tracer's CLTs read and write per-layer hooks "
            "(mlp.hook_in -> hook_mlp_out). Train the CLT on sites=[blocks.*.mlp.hook_in]."
        )
    return match.group(1)


def circuit_tracer_files(sae: CrossLayerTranscoder) -> dict[str, dict[str, Tensor]]:
    """file name -> its tensors (fp32, contiguous) for a folded CLT."""
    if not sae.folded:
        raise ValueError("export the folded CLT (acting on raw activations), not the training model")
    if sae.cfg.skip:
        raise UserError(
            "This cross-layer transcoder has a skip connection (sae.skip=true), which circuit-tracer 0.5.0's CLT "
            "loader never reads (it loads W_enc_*/W_dec_* files only), so its graphs would miss the skip term. "
            "Train the CLT with sae.skip=false to export it for circuit-tracer."
        )

    def t(x: Tensor) -> Tensor:
        return x.detach().to("cpu", torch.float32).contiguous()

    files = {}
    for i in range(sae.n_layers):
        files[f"W_enc_{i}.safetensors"] = {
            f"W_enc_{i}": t(sae.W_enc[i].T),
            f"b_enc_{i}": t(sae.b_enc[i]),
            f"b_dec_{i}": t(sae.b_dec[i]),
            f"threshold_{i}": t(sae.threshold[i]),
        }
        files[f"W_dec_{i}.safetensors"] = {f"W_dec_{i}": t(sae.decoder(i))}
    return files


def write_circuit_tracer(
    sae: CrossLayerTranscoder, out_dir: str | os.PathLike, *, sites: list[str], targets: list[str], model_name: str
) -> list[str]:
    """Write `sae` (folded) into out_dir in circuit-tracer's CLT layout; returns the file names.
    `sites`/`targets`: its source and target site per layer (for the hook names). Files are
    written in place: stage out_dir and swap it in, as `sae-train export` does."""
    inputs, outputs = {hook_name(s) for s in sites}, {hook_name(s) for s in targets}
    if len(inputs) != 1 or len(outputs) != 1 or len(sites) != sae.n_layers:
        raise UserError(
            f"A circuit-tracer CLT reads one hook kind and writes one on every layer; this CLT reads {sorted(inputs)} "
            f"and writes {sorted(outputs)} over {len(sites)} sites for {sae.n_layers} layers."
        )
    layers = [int(s.split(".")[1]) for s in sites]
    if layers != list(range(sae.n_layers)):
        raise UserError(
            f"circuit-tracer numbers a CLT's layers 0..L-1 as the model's; this CLT reads layers {layers}. Train it "
            "on every layer from 0 (sites=[blocks.*.mlp.hook_in])."
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = circuit_tracer_files(sae)
    for name, tensors in files.items():
        save_file(tensors, str(out / name))
    config = {
        "model_kind": MODEL_KIND,
        "model_name": model_name,
        "feature_input_hook": inputs.pop(),
        "feature_output_hook": outputs.pop(),
    }
    (out / CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False))
    return sorted([*files, CONFIG_FILE])


@torch.no_grad()
def circuit_tracer_reconstruct(directory: str | os.PathLike, x: Tensor) -> tuple[Tensor, Tensor]:
    """What circuit-tracer computes from the files in `directory` on raw inputs x [B, L, d_in],
    written plainly from its code: (latents [B, L, d_sae], outputs [B, L, d_out])."""
    folder = Path(directory)
    L = len(list(folder.glob("W_enc_*.safetensors")))
    enc = [load_file(folder / f"W_enc_{i}.safetensors") for i in range(L)]
    dec = [load_file(folder / f"W_dec_{i}.safetensors")[f"W_dec_{i}"] for i in range(L)]
    latents = []
    for i in range(L):
        z = torch.nn.functional.linear(x[:, i].float(), enc[i][f"W_enc_{i}"], enc[i][f"b_enc_{i}"])
        latents.append(z * (z > enc[i][f"threshold_{i}"]))
    out = torch.stack([enc[j][f"b_dec_{j}"].expand(x.shape[0], -1) for j in range(L)], dim=1).clone()
    for s in range(L):
        for j in range(s, L):
            out[:, j] += latents[s] @ dec[s][:, j - s]
    return torch.stack(latents, dim=1), out


def verify(sae: CrossLayerTranscoder, directory: str | os.PathLike, *, n: int = 128) -> None:
    """Check that circuit-tracer's math on the written files reproduces `sae` on a probe batch
    at the data's scale (a mismatch is an export bug, never bad input)."""
    gen = torch.Generator().manual_seed(0)
    scale = torch.tensor(sae.normalization_scale, dtype=torch.float32).expand(sae.n_layers)
    x = torch.randn(n, sae.n_layers, sae.cfg.d_in, generator=gen) / (sae.cfg.d_in**0.5 * scale[None, :, None])
    f, y = sae.reconstruct(x)
    f_ref, y_ref = circuit_tracer_reconstruct(directory, x)
    tol = 1e-5 * float(y_ref.abs().max().clamp_min(1e-12))
    if not (torch.allclose(f, f_ref, rtol=1e-5, atol=tol) and torch.allclose(y, y_ref, rtol=1e-5, atol=tol)):
        raise RuntimeError(
            f"circuit-tracer CLT export check failed: max latent difference {(f - f_ref).abs().max():.3g}, "
            f"max reconstruction difference {(y - y_ref).abs().max():.3g}"
        )
