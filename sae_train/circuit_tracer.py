"""Export to circuit-tracer (PyPI `circuit-tracer` 0.5.0), the attribution-graph library.

    sae-train export format=circuit_tracer checkpoint=runs/tcset out_dir=/abs/path/tcset-ct

circuit-tracer loads a local directory given by its ABSOLUTE path (a relative one is taken for
a hub repo). What 0.5.0 reads, checked by running it (`utils/caching.py`,
`transcoder/single_layer_transcoder.py`):

- `config.yaml`: `model_kind` (transcoder_set | cross_layer_transcoder), `feature_input_hook`,
  `feature_output_hook` (TransformerLens hook names, for the nnsight backend too); `model_name`
  informs its CLI. `activation` and `k` are never read. A `transcoders:` list is ignored for a
  local directory and, on the hub, replaces the default download of `layer_*.safetensors`, so
  none is written: the same directory works locally and pushed.
- `layer_{i}.safetensors` (transcoder_set): `W_enc [d_t, d_model]` (SAELens's transposed),
  `W_dec [d_t, d_model]`, `b_enc [d_t]`, `b_dec [d_model]`, optional `W_skip [d_model, d_model]`
  applied as `x @ W_skip.T`, and `activation_function.threshold [d_t]`: JumpReLU `z * [z > θ]`
  when present, else ReLU. Its load is strict: no other tensor (a TopK `k` fails it).
- The encoder is `F.linear(x, W_enc, b_enc)`: no centring, no scaling. Our folded transcoders
  compute exactly that (normalisations folded, b_dec an output bias), so the tensors are ours,
  transposed where the layout says.
- A transcoder for every layer 0..L-1 of the model, all of one width: a set covering fewer layers
  loads and attributes silently wrong, so the export refuses it.

TopK cannot be loaded from a local directory (it would come up as ReLU), so the TopK family goes
out as JumpReLU: BatchTopK and Matryoshka with their inference threshold (exactly what they
compute at inference, where the number of active latents varies per token around k); a plain
`topk` transcoder has no threshold and is refused. circuit-tracer zeroes position 0 in
attribution: train without BOS activations (the default, `text.exclude_special_tokens`).

A cross-layer transcoder (sae=clt; 0.5.0's `transcoder/cross_layer_transcoder.py`
`_load_state_dict`) is one directory of `config.yaml` (model_kind: cross_layer_transcoder) and,
per layer l, `W_enc_{l}.safetensors` with `W_enc_{l} [d_t, d_model]`, `b_enc_{l}`, `b_dec_{l}`
and `threshold_{l}` (always JumpReLU: its inference threshold), and `W_dec_{l}.safetensors` with
`W_dec_{l} [d_t, L - l, d_model]`. Layer j's output is b_dec_j plus W_dec_{s}[:, j - s] of every
active latent of layers s <= j: our folded inference exactly. Its loader reads no skip
connection, so a CLT trained with sae.skip=true is refused rather than exported without it.

Layout: helpers shared by every model_kind (the model's layer count and hook names, the
nonlinearity's tensor, config.yaml, writing the directory whole, the checked conversion) and one
writer per kind, `transcoder_set_files` and `cross_layer_files`, both going through
`write_directory`.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

import torch
import yaml
from safetensors.torch import save_file
from torch import Tensor

from sae_train.atomic import drop_previous, staging_dir, swap_dir
from sae_train.errors import UserError
from sae_train.export import (
    EvalResults,
    ExportConfig,
    check_conversion,
    find_checkpoints_to_export,
    probe_batch,
    read_eval,
)
from sae_train.lm import LanguageModel, ModelConfig
from sae_train.lm.model import read_model_config
from sae_train.lm.sites import family_of_type, layer_of
from sae_train.provenance import public_model_name
from sae_train.sae import SAE, load_sae
from sae_train.sae.clt import CrossLayerTranscoder

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
README = "README.md"
INPUT_HOOK = "mlp.hook_in"
SOURCE_KIND, TARGET_KIND = "mlp.hook_in", "hook_mlp_out"
"""The sites a circuit-tracer transcoder reads and writes, in our names (blocks.L.<kind>)."""
THRESHOLD = "activation_function.threshold"
CROSS_LAYER_KIND = "cross_layer_transcoder"
_LAYER_FILE = re.compile(r"(layer|W_enc|W_dec)_\d+\.safetensors")
"""The per-layer files of either kind: an export may replace them."""


# ---------------------------------------------------------------------------------- shared helpers


@dataclass(frozen=True)
class ModelLayout:
    """What circuit-tracer needs to know of the model the dictionaries were trained on."""

    name: str
    """config.yaml's model_name: the hub id, else the recorded name without local paths."""
    n_layers: int
    output_hook: str
    """Its name for our blocks.L.hook_mlp_out: `mlp.hook_out` where that is the MLP module's output
    (Llama, Qwen, GPT-2, Pythia), `hook_mlp_out` where a norm follows the MLP (Gemma 2/3)."""


def model_layout(meta: dict[str, Any]) -> ModelLayout:
    """The layout of the model a checkpoint (its cfg.json `meta`) recorded, from the model's config."""
    model = (meta.get("source") or {}).get("model") or {}
    if not model.get("name"):
        raise UserError("The checkpoints record no model; circuit-tracer needs the model they were trained on.")
    revision = model.get("revision") or "main"
    config = read_model_config(
        ModelConfig(name=model["name"], revision="main" if revision.startswith("sha256:") else revision)
    )
    family = family_of_type(getattr(config, "model_type", ""))
    return ModelLayout(
        name=str(public_model_name(model)),
        n_layers=int(config.num_hidden_layers),
        output_hook="mlp.hook_out" if family.mlp_out == family.mlp else "hook_mlp_out",
    )


def threshold_of(sae: SAE) -> Tensor | None:
    """The JumpReLU threshold circuit-tracer applies for `sae`'s inference nonlinearity (None: ReLU)."""
    if sae.saelens_architecture == "standard":
        return None
    if sae.saelens_architecture == "jumprelu":
        return cast(Tensor, sae.threshold)
    raise UserError(
        f"circuit-tracer cannot run a {sae.cfg.architecture} dictionary: from a local directory it loads "
        "JumpReLU (a threshold per latent) or ReLU only, and a TopK one would come up as ReLU. Train "
        "sae.architecture=batchtopk (k per token on average; exported as JumpReLU with its inference "
        "threshold), matryoshka, jumprelu or relu."
    )


def _plain(tensor: Tensor) -> Tensor:
    return tensor.detach().to("cpu", torch.float32).contiguous().clone()


def write_config(model_kind: str, layout: ModelLayout) -> str:
    """config.yaml's text for a directory of `model_kind`."""
    return yaml.safe_dump(
        {
            "model_kind": model_kind,
            "model_name": layout.name,
            "feature_input_hook": INPUT_HOOK,
            "feature_output_hook": layout.output_hook,
        },
        sort_keys=False,
    )


def write_directory(out: Path, files: dict[str, dict[str, Tensor]], config: str, readme: str) -> list[str]:
    """Write `out` whole (safetensors files, config.yaml, README.md) under a temporary name and
    swap it in: an interrupted export leaves the old directory, and no stale layer file of an
    earlier export survives (circuit-tracer globs them). Returns the file names."""
    staging = staging_dir(out)
    try:
        for name, tensors in files.items():
            save_file(tensors, str(staging / name), metadata={"format": "pt"})
        (staging / CONFIG_FILE).write_text(config)
        (staging / README).write_text(readme)
        swap_dir(out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    drop_previous(out)
    return sorted([*files, CONFIG_FILE, README])


def _check_out_dir(out: Path, ours: set[str]) -> None:
    """out_dir is replaced whole: refuse one holding anything an export of this kind did not write."""
    if not out.is_dir():
        return
    foreign = sorted(p.name for p in out.iterdir() if p.name not in ours and not _LAYER_FILE.fullmatch(p.name))
    if foreign:
        raise UserError(
            f"out_dir={out} holds {', '.join(foreign[:5])}, which a circuit-tracer export did not write; the "
            "export replaces the whole directory, so it is refused. Choose an empty or new out_dir."
        )


# ---------------------------------------------------------------------------------- transcoder sets


def transcoder_tensors(sae: SAE) -> dict[str, Tensor]:
    """layer_{i}.safetensors of a folded transcoder: circuit-tracer's names and orientations."""
    if not sae.folded:
        raise ValueError("transcoder_tensors converts inference transcoders (acting on raw activations)")
    tensors = {
        "W_enc": _plain(sae.W_enc.t()),
        "W_dec": _plain(sae.W_dec),
        "b_enc": _plain(sae.b_enc),
        "b_dec": _plain(sae.b_dec),
    }
    threshold = threshold_of(sae)
    if threshold is not None:
        tensors[THRESHOLD] = _plain(threshold)
    if sae.cfg.skip:
        tensors["W_skip"] = _plain(sae.W_skip.t())  # circuit-tracer: x @ W_skip.T, W_skip [d_out, d_in]
    return tensors


def transcoder_reference(tensors: dict[str, Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
    """(latents, output) that circuit-tracer's SingleLayerTranscoder computes for x [n, d_model]
    from layer_{i}.safetensors tensors: its encode/decode written out in plain torch."""
    z = torch.nn.functional.linear(x.float(), tensors["W_enc"], tensors["b_enc"])
    f = z * (z > tensors[THRESHOLD]) if THRESHOLD in tensors else torch.relu(z)
    out = f @ tensors["W_dec"] + tensors["b_dec"]
    if "W_skip" in tensors:
        out = out + x.float() @ tensors["W_skip"].T
    return f, out


def _site_error(directory: Path, meta: dict[str, Any], layout: ModelLayout) -> UserError:
    return UserError(
        f"Checkpoint {directory} reads {meta.get('site')} and writes {meta.get('target') or meta.get('site')}; "
        f"circuit-tracer's transcoder sets read each layer's MLP input ({INPUT_HOOK}) and write its output "
        f"({layout.output_hook}). Train the set with sites=[blocks.*.{SOURCE_KIND}] "
        f"sae.target=blocks.{{layer}}.{TARGET_KIND}, or export this run with format=saelens."
    )


def transcoder_set_layers(
    entries: list[tuple[Path, dict[str, Any], SAE]], layout: ModelLayout
) -> dict[int, tuple[Path, dict[str, Any], SAE]]:
    """layer -> its (directory, cfg.json, folded transcoder), checked to be what circuit-tracer
    loads: MLP input -> MLP output of one layer, one per layer 0..L-1, equal widths."""
    layers: dict[int, tuple[Path, dict[str, Any], SAE]] = {}
    for directory, meta, sae in entries:
        site, target = str(meta.get("site")), str(meta.get("target") or "")
        layer = layer_of(site)
        if (
            layer is None
            or site != f"blocks.{layer}.{SOURCE_KIND}"
            or target != f"blocks.{layer}.{TARGET_KIND}"
            or not sae.cfg.is_transcoder
        ):
            raise _site_error(directory, meta, layout)
        if layer in layers:
            raise UserError(
                f"Checkpoints {layers[layer][0]} and {directory} both transcode layer {layer} (a sweep); a "
                "circuit-tracer set has one transcoder per layer. Export a run without sweep, or pass "
                "checkpoint= a directory holding one transcoder per layer."
            )
        layers[layer] = (directory, meta, sae)
    missing = [i for i in range(layout.n_layers) if i not in layers]
    extra = [i for i in layers if i >= layout.n_layers]
    if missing or extra:
        raise UserError(
            f"The transcoder set at these checkpoints covers layers {sorted(layers)}, but model {layout.name} has "
            f"{layout.n_layers} layers (0..{layout.n_layers - 1}); circuit-tracer needs exactly one transcoder per "
            f"layer (missing: {missing or 'none'}). Train every layer in one run: sites=[blocks.*.{SOURCE_KIND}] "
            f"sae.target=blocks.{{layer}}.{TARGET_KIND}."
        )
    widths = {i: (e[2].cfg.d_sae, e[2].cfg.skip) for i, e in layers.items()}
    if len(set(widths.values())) > 1:
        listing = ", ".join(f"layer {i}: d_sae {d}{' + skip' if s else ''}" for i, (d, s) in sorted(widths.items()))
        raise UserError(
            f"The transcoders of this set differ in width or skip connection ({listing}); circuit-tracer needs "
            "one d_sae (and skip or not) for every layer. Retrain the set in one run (one sae config)."
        )
    return dict(sorted(layers.items()))


def transcoder_set_files(layers: dict[int, tuple[Path, dict[str, Any], SAE]]) -> dict[str, dict[str, Tensor]]:
    """layer_{i}.safetensors for every layer, each checked against circuit-tracer's math."""
    files = {}
    for layer, (_, _, sae) in layers.items():
        tensors = transcoder_tensors(sae)
        x = probe_batch(sae)
        check_conversion(sae, transcoder_reference(tensors, x), x, "circuit-tracer")
        files[f"layer_{layer}.safetensors"] = tensors
    return files


# ---------------------------------------------------------------------------------- cross-layer transcoders


def check_cross_layer(directory: Path, meta: dict[str, Any], sae: CrossLayerTranscoder, layout: ModelLayout) -> None:
    """A CLT circuit-tracer loads: MLP input -> MLP output at every layer 0..L-1 of the model, no skip."""
    sources, targets = list(meta.get("sites") or []), list(meta.get("targets") or [])
    if sources != [f"blocks.{i}.{SOURCE_KIND}" for i in range(layout.n_layers)] or targets != [
        f"blocks.{i}.{TARGET_KIND}" for i in range(layout.n_layers)
    ]:
        raise UserError(
            f"Cross-layer transcoder {directory} reads {sources} and writes {targets}; circuit-tracer needs every "
            f"layer 0..{layout.n_layers - 1} of model {layout.name}, each MLP's input ({INPUT_HOOK}) to its output. "
            f"Train it with sae=clt sites=[blocks.*.{SOURCE_KIND}] over the whole model."
        )
    if sae.cfg.skip:
        raise UserError(
            f"Cross-layer transcoder {directory} has a skip connection (sae.skip=true), which circuit-tracer 0.5.0's "
            "CLT loader never reads (it loads W_enc_*/W_dec_* files only), so its graphs would miss the skip term. "
            "Train the CLT with sae.skip=false to export it for circuit-tracer."
        )


def cross_layer_files(sae: CrossLayerTranscoder) -> dict[str, dict[str, Tensor]]:
    """W_enc_{l} and W_dec_{l}.safetensors of a folded CLT, checked against circuit-tracer's math."""
    if not sae.folded:
        raise ValueError("cross_layer_files converts the folded CLT (acting on raw activations)")
    files = {}
    for i in range(sae.n_layers):
        files[f"W_enc_{i}.safetensors"] = {
            f"W_enc_{i}": _plain(sae.W_enc[i].T),
            f"b_enc_{i}": _plain(sae.b_enc[i]),
            f"b_dec_{i}": _plain(sae.b_dec[i]),
            f"threshold_{i}": _plain(sae.threshold[i]),
        }
        files[f"W_dec_{i}.safetensors"] = {f"W_dec_{i}": _plain(sae.decoder(i))}
    gen = torch.Generator().manual_seed(0)
    scale = torch.tensor(sae.normalization_scale, dtype=torch.float32).expand(sae.n_layers)
    x = torch.randn(128, sae.n_layers, sae.cfg.d_in, generator=gen) / (sae.cfg.d_in**0.5 * scale[None, :, None])
    check_conversion(sae, cross_layer_reference(files, x), x, "circuit-tracer")
    return files


def cross_layer_reference(files: dict[str, dict[str, Tensor]], x: Tensor) -> tuple[Tensor, Tensor]:
    """(latents [B, L, d_t], outputs [B, L, d_model]) that circuit-tracer's CrossLayerTranscoder
    computes for raw inputs x [B, L, d_model] from a CLT's files: its math written out plainly."""
    L = x.shape[1]
    enc = [files[f"W_enc_{i}.safetensors"] for i in range(L)]
    dec = [files[f"W_dec_{i}.safetensors"][f"W_dec_{i}"] for i in range(L)]
    latents = []
    for i in range(L):
        z = torch.nn.functional.linear(x[:, i].float(), enc[i][f"W_enc_{i}"], enc[i][f"b_enc_{i}"])
        latents.append(z * (z > enc[i][f"threshold_{i}"]))
    out = torch.stack([enc[j][f"b_dec_{j}"].expand(x.shape[0], -1) for j in range(L)], dim=1).clone()
    for s in range(L):
        for j in range(s, L):
            out[:, j] += latents[s] @ dec[s][:, j - s]
    return torch.stack(latents, dim=1), out


# ---------------------------------------------------------------------------------- the model


def save_model(model: ModelConfig, out: Path) -> Path:
    """Write `model` (anything `model.name` loads, a GGUF file included) as a Hugging Face
    directory that circuit-tracer's environment (transformers <= 4.57) loads: float32 weights and
    the tokenizer under a class transformers 4 knows. Pass its absolute path to circuit-tracer."""
    lm = LanguageModel.load(replace(model, dtype="float32", device="cpu"))
    out.mkdir(parents=True, exist_ok=True)
    hf_model: Any = lm.model
    # A GGUF file loads dequantized into plain float weights, but transformers still marks the
    # model as quantized and refuses to save it; what is saved is the plain model.
    hf_model.hf_quantizer = None
    if hasattr(hf_model.config, "quantization_config"):
        del hf_model.config.quantization_config
    hf_model.save_pretrained(out)
    lm.tokenizer.save_pretrained(out)
    config_file = out / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    if config.get("tokenizer_class") == "TokenizersBackend":  # transformers 5's name for a plain fast tokenizer
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        config_file.write_text(json.dumps(config, indent=2) + "\n")
    return out


# ---------------------------------------------------------------------------------- stage


@dataclass
class CircuitTracerSummary:
    out_dir: str
    model_kind: str
    model_name: str
    layers: list[dict[str, Any]]
    """Per layer: checkpoint, architecture, d_sae, skip and (when evaluated) metrics."""
    files: list[str]
    repo_id: str = ""
    commit_url: str = ""

    def table(self) -> str:
        first = self.layers[0]
        lines = [
            f"export       {self.out_dir}: circuit-tracer {self.model_kind}, {len(self.layers)} layers of "
            f"{first['architecture']} d_sae {first['d_sae']}{' + skip' if first['skip'] else ''} for {self.model_name}",
            f"load         ReplacementModel.from_pretrained(<model>, '{Path(self.out_dir).resolve()}', backend='nnsight')",
        ]
        if self.commit_url:
            lines.append(f"pushed       {self.repo_id}: {self.commit_url}")
        return "\n".join(lines)


def _readme(title: str, intro: str, layout: ModelLayout, rows: list[dict[str, Any]], repo_id: str) -> str:
    evaluated = any(r.get("metrics") for r in rows)
    header = ["layer", "checkpoint", "architecture", "d_sae", "skip"] + (["L0", "FVU", "CE recovered"] * evaluated)
    table = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for r in rows:
        m = r.get("metrics") or {}
        cells = [str(r["layer"]), f"`{r['checkpoint']}`", r["architecture"], str(r["d_sae"]), str(r["skip"]).lower()]
        if evaluated:
            cells += [
                f"{m[k]:.4g}" if isinstance(m.get(k), (int, float)) else "–" for k in ("l0", "fvu", "ce_recovered")
            ]
        table.append("| " + " | ".join(cells) + " |")
    where = repo_id or "/absolute/path/to/this/directory"
    return "\n".join(
        [
            f"# {title} for {layout.name} (circuit-tracer)",
            "",
            intro,
            "",
            *table,
            "",
            "```python",
            "import torch",
            "from circuit_tracer import ReplacementModel, attribute",
            "",
            f'model = ReplacementModel.from_pretrained("{layout.name}", "{where}", backend="nnsight", dtype=torch.float32)',
            'graph = attribute("The capital of France is", model)',
            "```",
            "",
            "A local directory must be given by its absolute path.",
            "",
        ]
    )


def _row(layer: int, directory: Path, meta: dict[str, Any], sae: SAE, metrics: dict[str, Any]) -> dict[str, Any]:
    return {
        "layer": layer,
        "checkpoint": meta.get("tag") or directory.name,
        "architecture": sae.cfg.architecture,
        "d_sae": sae.cfg.d_sae,
        "skip": sae.cfg.skip,
        "metrics": metrics,
    }


def _transcoder_set(
    entries: list[tuple[Path, dict[str, Any], SAE]], layout: ModelLayout, results: EvalResults | None, repo_id: str
) -> tuple[dict[str, dict[str, Tensor]], list[dict[str, Any]], str]:
    """(files, README rows, README) of a transcoder set."""
    layers = transcoder_set_layers(entries, layout)
    rows = []
    for layer, (directory, meta, sae) in layers.items():
        eval_name = results.match(meta) if results else None
        metrics = dict(results.entries[eval_name].get("metrics") or {}) if results and eval_name else {}
        rows.append(_row(layer, directory, meta, sae, metrics))
    intro = (
        f"One transcoder per layer (0..{layout.n_layers - 1}) from the MLP's input (`{INPUT_HOOK}`) to its "
        f"output (`{layout.output_hook}`), trained with sae-train, normalisations folded in."
    )
    return transcoder_set_files(layers), rows, _readme("Transcoder set", intro, layout, rows, repo_id)


def _cross_layer(
    entry: tuple[Path, dict[str, Any], SAE], layout: ModelLayout, results: EvalResults | None, repo_id: str
) -> tuple[dict[str, dict[str, Tensor]], list[dict[str, Any]], str]:
    """(files, README rows: one per layer with that layer's eval numbers, README) of a CLT."""
    directory, meta, sae = entry
    clt = cast(CrossLayerTranscoder, sae)
    check_cross_layer(directory, meta, clt, layout)
    eval_name = results.match(meta) if results else None
    m = dict(results.entries[eval_name].get("metrics") or {}) if results and eval_name else {}

    def layer_metrics(i: int) -> dict[str, Any]:
        """Layer i's L0 and FVU (eval's `l0_<i>`, `fvu_<i>`), the replacement model's CE recovered."""
        if not m:
            return {}
        return {k: m[f"{k}_{i}"] for k in ("l0", "fvu") if f"{k}_{i}" in m} | {"ce_recovered": m.get("ce_recovered")}

    rows = [_row(i, directory, meta, sae, layer_metrics(i)) for i in range(clt.n_layers)]
    intro = (
        f"One cross-layer transcoder over layers 0..{layout.n_layers - 1}: an encoder per layer reading the MLP's "
        f"input (`{INPUT_HOOK}`), decoders to that layer's MLP output (`{layout.output_hook}`) and every later "
        "one's, JumpReLU thresholds, trained with sae-train, normalisations folded in. CE recovered is the "
        "replacement model's (every MLP output replaced at once)."
    )
    return cross_layer_files(clt), rows, _readme("Cross-layer transcoder", intro, layout, rows, repo_id)


def run(cfg: ExportConfig) -> CircuitTracerSummary:
    """Export the transcoder set or the cross-layer transcoder at cfg.checkpoint in
    circuit-tracer's layout (and push it)."""
    token = None
    if cfg.push_to_hub:
        from sae_train.hub import resolve_token

        token = resolve_token()
    out, plans = find_checkpoints_to_export(cfg)
    _check_out_dir(out, {CONFIG_FILE, README})
    results: EvalResults | None = read_eval(cfg.eval_dir) if cfg.eval_dir else None
    layout = model_layout(plans[0].meta)
    entries = [(p.directory, p.meta, load_sae(p.directory)) for p in plans]
    cross_layer = [e for e in entries if e[2].cross_layer]
    if cross_layer and len(entries) > 1:
        raise UserError(
            f"{cfg.checkpoint} holds {len(entries)} checkpoints, among them cross-layer transcoder {cross_layer[0][0]}; "
            "a circuit-tracer directory holds one CLT or one transcoder set. Pass checkpoint= that CLT's directory."
        )
    model_kind = CROSS_LAYER_KIND if cross_layer else "transcoder_set"
    files, rows, readme = (
        _cross_layer(cross_layer[0], layout, results, cfg.repo_id)
        if cross_layer
        else _transcoder_set(entries, layout, results, cfg.repo_id)
    )
    names = write_directory(out, files, write_config(model_kind, layout), readme)
    log.info("exported %s (%d layers) -> %s", model_kind, len(rows), out)
    summary = CircuitTracerSummary(
        out_dir=str(out), model_kind=model_kind, model_name=layout.name, layers=rows, files=names
    )
    if cfg.push_to_hub:
        from sae_train.hub import push

        summary.repo_id = cfg.repo_id
        try:
            summary.commit_url = push(out, cfg.repo_id, private=cfg.private, token=token, paths=names)
        except UserError as err:
            raise UserError(f"{err}\nThe export in {out} is complete; run the same command again to push it.") from None
    return summary
