"""The export stage: checkpoints -> SAELens v6 folders + a model card, optionally pushed to the hub.

    sae-train export checkpoint=runs/sae out_dir=runs/export [eval_dir=runs/eval] \\
                     [push_to_hub=true repo_id=org/name private=true]

For every checkpoint at or below `checkpoint` (DESIGN.md, Contract 2) it writes
`out_dir/<tag>/` — the trainer's tag: the site, plus the sweep values for sweeps, e.g.
`blocks.8.hook_resid_post/k=16` — holding `cfg.json` + `sae_weights.safetensors` (+
`sparsity.safetensors` when the eval recorded per-latent firing frequencies), which
`sae_lens.SAE.load_from_disk` / `SAE.from_pretrained(repo_id, tag)` load, and `out_dir/README.md`,
a Hugging Face model card. Training-only files never leave the checkpoint. The conversion is
sae_train/sae/saelens.py; every converted SAE is checked against SAELens's inference math on a
probe batch before it is written.

Each SAE folder is written complete under a temporary name and swapped in, so an interrupted
export leaves every folder either as it was or new. Nothing outside `out_dir` is written, and
an `out_dir` that would overwrite a checkpoint or a non-export folder is refused before any
work.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sae_train import __version__
from sae_train.atomic import drop_previous, staging_dir, swap_dir, write_text_atomic
from sae_train.errors import UserError
from sae_train.provenance import provenance, public_record, public_source
from sae_train.sae import ARCHITECTURES, SAE, load_sae, load_sae_cfg
from sae_train.sae.checkpoint import CFG_FILE as CHECKPOINT_CFG
from sae_train.sae.checkpoint import find_checkpoints
from sae_train.sae.saelens import (
    CFG_FILE,
    METADATA_KEY,
    SPARSITY_FILE,
    WEIGHTS_FILE,
    log_sparsity,
    saelens_reference,
    to_saelens,
)

log = logging.getLogger(__name__)

EXPORT_FILES = (CFG_FILE, WEIGHTS_FILE, SPARSITY_FILE)
README = "README.md"
EVAL_JSON, EVAL_MD = "eval.json", "eval.md"
EVAL_FREQUENCY_FILE = "frequency.safetensors"
"""In an eval out_dir: per-latent firing frequency over the eval tokens, one float tensor
[d_sae] per SAE, keyed by the SAE's name in eval.json "saes". Exported as sparsity.safetensors."""


FORMATS = ("saelens", "circuit_tracer")


@dataclass
class ExportConfig:
    """`sae-train export`: write checkpoints in the SAELens layout with a model card (and push them)."""

    checkpoint: str = ""
    """A checkpoint directory (sae.safetensors + cfg.json), or a directory holding several (a
    training run's out_dir, a sweep): every checkpoint below it is exported."""
    out_dir: str = "runs/export"
    """Export root: one folder per SAE (named by its tag) and README.md. Other content stays.
    format=circuit_tracer: the transcoder set's (or cross-layer transcoder's) directory itself
    (replaced whole)."""
    format: str = "saelens"
    """saelens: one SAELens v6 folder per SAE. circuit_tracer: a transcoder set (a run's
    transcoders at every layer, blocks.L.mlp.hook_in -> blocks.L.hook_mlp_out) as one
    circuit-tracer directory, config.yaml + layer_{i}.safetensors, or a cross-layer transcoder
    (sae=clt) as config.yaml + W_enc_{i}/W_dec_{i}.safetensors (sae_train/circuit_tracer.py)."""
    eval_dir: str = ""
    """out_dir of `sae-train eval` on these checkpoints: its numbers go into the model card, and
    per-latent firing frequencies (when it recorded them) into sparsity.safetensors. Empty = the
    card says the SAEs were not evaluated."""
    push_to_hub: bool = False
    """Upload the export to the hub repository repo_id (token: HF_TOKEN or `hf auth login`)."""
    repo_id: str = ""
    """Hub model repository, 'owner/name'; created when missing. Also used in the model card's
    loading instructions."""
    private: bool = False
    """Create the hub repository as private (an existing repository keeps its visibility)."""

    def __post_init__(self) -> None:
        if not self.checkpoint:
            raise UserError("checkpoint is empty; pass checkpoint=<a checkpoint directory or a training out_dir>.")
        if self.format not in FORMATS:
            raise UserError(f"format={self.format!r} is not an export format; use one of {', '.join(FORMATS)}.")
        if not self.out_dir:
            raise UserError("out_dir is empty; pass out_dir=<directory for the export>, e.g. out_dir=runs/export.")
        if self.push_to_hub and not self.repo_id:
            raise UserError(
                "push_to_hub=true needs repo_id=<owner/name>, the hub repository to upload to "
                "(created if it does not exist), e.g. repo_id=my-org/sae-smollm2-135m."
            )
        if self.private and not self.push_to_hub:
            raise UserError(
                "private=true sets the visibility of the hub repository that push_to_hub=true creates; "
                "add push_to_hub=true repo_id=<owner/name>, or drop private=true."
            )
        if self.repo_id:
            from sae_train.hub import check_repo_id

            check_repo_id(self.repo_id)


@dataclass
class ExportedSAE:
    """One exported SAE."""

    name: str
    """Its folder below out_dir (and in the hub repo): the trainer's tag."""
    checkpoint: str
    site: str
    architecture: str
    """Ours (`sae.architecture`)."""
    saelens_architecture: str
    d_in: int
    d_sae: int
    k: int | None
    tokens_trained: int | None
    files: list[str]
    """Paths written, relative to out_dir."""
    eval_name: str | None = None
    """Its name in eval.json when it was evaluated."""
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class ExportSummary:
    out_dir: str
    saes: list[ExportedSAE]
    readme: str
    repo_id: str = ""
    commit_url: str = ""
    """The hub commit when pushed, else empty."""

    @property
    def files(self) -> list[str]:
        """Every file this export wrote, relative to out_dir (what a push uploads)."""
        return [f for s in self.saes for f in s.files] + [README]

    def table(self) -> str:
        width = max(len(s.name) for s in self.saes)
        lines = [f"export       {self.out_dir}: {len(self.saes)} SAE(s) in the SAELens layout + {README}"]
        for s in self.saes:
            arch = (
                s.architecture
                if s.architecture == s.saelens_architecture
                else f"{s.architecture} (as {s.saelens_architecture})"
            )
            extra = f"k {s.k}  " if s.k else ""
            status = "evaluated" if s.eval_name else "not evaluated"
            sparsity = ", sparsity" if any(f.endswith(SPARSITY_FILE) for f in s.files) else ""
            lines.append(f"  {s.name:{width}s}  {arch:24s} d_sae {s.d_sae:<6d} {extra}{status}{sparsity}")
        if self.commit_url:
            lines.append(f"pushed       {self.repo_id}: {self.commit_url}")
        return "\n".join(lines)


def _export_name(meta: dict[str, Any], directory: Path) -> str:
    name = meta.get("tag") or meta.get("site") or directory.name
    parts = str(name).split("/")
    if any(p in ("", ".", "..") or p.startswith(".") for p in parts):
        raise UserError(
            f"Checkpoint {directory} has tag {name!r}, which cannot name an export folder. "
            "Fix 'tag' in its cfg.json (the site, then the sweep values, e.g. blocks.8.hook_resid_post/k=16)."
        )
    return str(name)


def _overlaps(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


@dataclass
class _Plan:
    name: str
    directory: Path
    meta: dict[str, Any]


def find_checkpoints_to_export(cfg: ExportConfig) -> tuple[Path, list[_Plan]]:
    """out_dir and the checkpoints below cfg.checkpoint with their cfg.json, checked: out_dir is
    no file and not inside the checkpoints, every checkpoint records its site."""
    out = Path(cfg.out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"out_dir={cfg.out_dir} is a file; choose a directory path for the export.")
    root, directories = find_checkpoints(cfg.checkpoint)
    out_r, root_r = out.resolve(), root.resolve()
    if out_r == root_r or root_r in out_r.parents:
        raise UserError(
            f"out_dir={cfg.out_dir} is inside checkpoint={cfg.checkpoint}; an export there would mix "
            "with the checkpoints. Choose an out_dir outside it, e.g. runs/export."
        )
    plans = []
    for directory in directories:
        meta = load_sae_cfg(directory)
        if not isinstance(meta.get("site"), str) or not meta["site"]:
            raise UserError(
                f"Checkpoint {directory}: {CHECKPOINT_CFG} records no activation site ('site'), which "
                "SAELens needs (hook_name). Checkpoints written by sae-train train always have one."
            )
        plans.append(_Plan(_export_name(meta, directory), directory, meta))
    return out, plans


def _plan(cfg: ExportConfig) -> tuple[Path, list[_Plan]]:
    """Everything checkable before writing: checkpoints, their cfg.json, folder names, out_dir."""
    out, plans = find_checkpoints_to_export(cfg)
    cross_layer = [
        p.directory for p in plans if getattr(ARCHITECTURES.get(str(p.meta.get("architecture"))), "cross_layer", False)
    ]
    if cross_layer:
        raise UserError(
            f"Checkpoint {cross_layer[0]} is a cross-layer transcoder, which SAELens has no layout for. Export it "
            "for circuit-tracer: `sae-train export format=circuit_tracer checkpoint=<its directory> out_dir=...`."
        )
    names: dict[str, Path] = {}
    for p in plans:
        if p.name in names:
            raise UserError(
                f"Checkpoints {names[p.name]} and {p.directory} have the same tag {p.name!r}, so they "
                "would export to the same folder. Export them in separate calls, to different out_dirs."
            )
        names[p.name] = p.directory
    for a in names:
        for b in names:
            if b.startswith(a + "/"):
                raise UserError(
                    f"Export folders {a!r} and {b!r} would nest (one SAE folder inside another). "
                    "Export these checkpoints in separate calls, to different out_dirs."
                )
    checkpoints = [p.directory.resolve() for p in plans]
    for p in plans:
        target = out / p.name
        if any(_overlaps(target.resolve(), c) for c in checkpoints):
            raise UserError(f"Exporting to {target} would overwrite checkpoint data. Choose another out_dir.")
        if target.exists():
            foreign = (
                sorted(c.name for c in target.iterdir() if c.name not in EXPORT_FILES)
                if target.is_dir()
                else [target.name]
            )
            if foreign:
                raise UserError(
                    f"{target} exists and holds {', '.join(foreign[:5])}, which an export did not write; "
                    "it is not replaced. Choose another out_dir or move it away."
                )
    return out, plans


# ---------------------------------------------------------------------------------- eval results


@dataclass
class EvalResults:
    """What an eval out_dir offers the export (any part may be missing)."""

    directory: Path
    entries: dict[str, dict[str, Any]]
    """eval.json "saes": name -> entry (site, architecture, metrics, checkpoint_cfg...)."""
    markdown: str
    frequencies: dict[str, torch.Tensor]

    def match(self, meta: dict[str, Any]) -> str | None:
        """The eval name of the checkpoint whose cfg.json is `meta` (None: not evaluated).

        Matching on the whole recorded cfg.json, not the path, is immune to where eval ran
        from, and a checkpoint retrained after the eval does not inherit stale numbers."""
        for name, entry in self.entries.items():
            if entry.get("checkpoint_cfg") == meta:
                return name
        return None


def read_eval(eval_dir: str) -> EvalResults:
    directory = Path(eval_dir)
    if not directory.is_dir():
        raise UserError(
            f"eval_dir={eval_dir} is not a directory. Pass the out_dir of sae-train eval, or leave "
            "eval_dir empty to export without eval numbers."
        )
    json_file, md_file = directory / EVAL_JSON, directory / EVAL_MD
    if not json_file.is_file() and not md_file.is_file():
        raise UserError(
            f"eval_dir={eval_dir} holds neither {EVAL_JSON} nor {EVAL_MD}. Run sae-train eval with "
            f"out_dir={eval_dir} first, or leave eval_dir empty."
        )
    entries: dict[str, dict[str, Any]] = {}
    if json_file.is_file():
        try:
            payload = json.loads(json_file.read_text())
            entries = dict(payload["saes"])
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise UserError(
                f"{json_file} is unreadable or not an eval report ({type(exc).__name__}: {exc}). "
                "Run sae-train eval again."
            ) from exc
    markdown = md_file.read_text() if md_file.is_file() else ""
    frequencies: dict[str, torch.Tensor] = {}
    freq_file = directory / EVAL_FREQUENCY_FILE
    if freq_file.is_file():
        try:
            frequencies = load_file(str(freq_file))
        except (SafetensorError, OSError, ValueError) as exc:
            raise UserError(f"{freq_file} is corrupt ({exc}). Run sae-train eval again.") from exc
    return EvalResults(directory, entries, markdown, frequencies)


# ---------------------------------------------------------------------------------- conversion


def saelens_metadata(meta: dict[str, Any]) -> dict[str, Any]:
    """cfg.json "metadata" of the export of the checkpoint whose cfg.json is `meta` (published:
    no local paths, see `public_record`)."""
    source = public_source(meta.get("source") or {})
    model = source.get("model") or {}
    data = source.get("data") or {}
    text = source.get("text") or {}
    return {
        "hook_name": meta["site"],
        **({"hook_name_out": meta["target"]} if meta.get("target") else {}),
        "hook_head_index": None,
        "model_name": model.get("hub_id") or None,
        "context_size": text.get("context_size"),
        "prepend_bos": text.get("prepend_bos"),
        "exclude_special_tokens": text.get("exclude_special_tokens"),
        # SAELens reads dataset_path as a hub dataset id; local and stdlib corpora have none.
        "dataset_path": data.get("path") if data.get("source") == "hf" else None,
        METADATA_KEY: {
            "architecture": meta["architecture"],
            "checkpoint_cfg": public_record(meta),
            "exported_by": provenance(),
        },
    }


def probe_batch(sae: SAE, n: int = 256) -> torch.Tensor:
    """Raw-scale activations for checking a conversion: around b_dec for an SAE (a transcoder's
    b_dec is an output bias), norm ~ 1/normalization_scale, the data's."""
    gen = torch.Generator().manual_seed(0)
    d_in = sae.cfg.d_in
    centre = 0.0 if sae.cfg.is_transcoder else sae.b_dec.detach().float()
    scale = sae.normalization_scale
    assert isinstance(scale, float)  # one site, one scale (a cross-layer transcoder's probe: circuit_tracer.py)
    return centre + torch.randn(n, d_in, generator=gen) / (d_in**0.5 * scale)


@torch.no_grad()
def check_conversion(sae: SAE, reference: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor, layout: str) -> None:
    """Raise unless `reference` (latents, output) that another library's math computes on the
    converted weights for `x` equals `sae.reconstruct(x)` to 1e-5: a mismatch is a conversion bug,
    never bad input."""
    f_ref, x_ref = reference
    f, x_hat = sae.reconstruct(x)
    tol = 1e-5 * float(x_ref.abs().max().clamp_min(1e-12))
    if not (torch.allclose(f, f_ref, rtol=1e-5, atol=tol) and torch.allclose(x_hat, x_ref, rtol=1e-5, atol=tol)):
        raise RuntimeError(
            f"{layout} conversion check failed for a {sae.cfg.architecture} SAE: max latent difference "
            f"{(f - f_ref).abs().max():.3g}, max reconstruction difference {(x_hat - x_ref).abs().max():.3g}"
        )


def verify(sae: SAE, cfg: dict[str, Any], tensors: dict[str, torch.Tensor], *, n: int = 256) -> None:
    """Check that SAELens's math on the converted weights reproduces `sae` on a probe batch."""
    x = probe_batch(sae, n)
    check_conversion(sae, saelens_reference(cfg, tensors, x), x, "SAELens")


def _write_folder(
    target: Path, cfg: dict[str, Any], tensors: dict[str, torch.Tensor], sparsity: torch.Tensor | None
) -> list[str]:
    """Write one SAE folder complete under a temporary name, then swap it in; returns its file names."""
    staging = staging_dir(target)
    try:
        save_file(tensors, str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
        names = [WEIGHTS_FILE]
        if sparsity is not None:
            save_file({"sparsity": sparsity.contiguous()}, str(staging / SPARSITY_FILE), metadata={"format": "pt"})
            names.append(SPARSITY_FILE)
        (staging / CFG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
        names.append(CFG_FILE)
        swap_dir(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    drop_previous(target)
    return sorted(names)


def _export_one(plan: _Plan, out: Path, results: EvalResults | None) -> ExportedSAE:
    sae = load_sae(plan.directory)
    cfg, tensors = to_saelens(sae, saelens_metadata(plan.meta))
    verify(sae, cfg, tensors)
    eval_name = results.match(plan.meta) if results else None
    sparsity = None
    if results is not None and eval_name is not None and eval_name in results.frequencies:
        frequency = results.frequencies[eval_name]
        if frequency.shape != (sae.cfg.d_sae,):
            raise UserError(
                f"{results.directory / EVAL_FREQUENCY_FILE} has {eval_name!r} of shape "
                f"{tuple(frequency.shape)}; the SAE has d_sae={sae.cfg.d_sae}. Run sae-train eval again."
            )
        sparsity = log_sparsity(frequency)
    names = _write_folder(out / plan.name, cfg, tensors, sparsity)
    log.info("exported %s -> %s", plan.directory, out / plan.name)
    arch = sae.cfg.architecture
    return ExportedSAE(
        name=plan.name,
        checkpoint=str(plan.directory),
        site=plan.meta["site"],
        architecture=arch,
        saelens_architecture=cfg["architecture"],
        d_in=sae.cfg.d_in,
        d_sae=sae.cfg.d_sae,
        k=sae.cfg.k if "k" in sae.config_fields else None,
        tokens_trained=plan.meta.get("tokens_trained"),
        files=[f"{plan.name}/{n}" for n in names],
        eval_name=eval_name,
        metrics=dict(results.entries[eval_name].get("metrics") or {}) if results and eval_name is not None else {},
    )


# ---------------------------------------------------------------------------------- model card

_CARD_METRICS = [
    ("L0", "l0", "{:.1f}"),
    ("FVU", "fvu", "{:.4f}"),
    ("dead", "dead_fraction", "{:.1%}"),
    ("CE recovered", "ce_recovered", "{:.4f}"),
    ("KL", "kl", "{:.4f}"),
]


def _fmt(fmt: str, value: Any) -> str:
    return "–" if not isinstance(value, (int, float)) or value != value else fmt.format(value)


def _distinct(values: list[Any]) -> list[Any]:
    return [v for i, v in enumerate(values) if v is not None and v not in values[:i]]


def _nested_markdown(text: str) -> list[str]:
    """eval.md's lines to sit under the card's "## Evaluation": its title dropped, headings one level down."""
    lines = text.split("\n")
    if lines and lines[0].startswith("# "):
        lines = lines[1:]
    out, fenced = [], False
    for line in lines:
        fenced ^= line.startswith("```")
        out.append("#" + line if line.startswith("#") and not fenced else line)
    return out


def model_card(saes: list[ExportedSAE], metas: list[dict[str, Any]], results: EvalResults | None, repo_id: str) -> str:
    """README.md of the export: hub YAML header, the table of SAEs, how to load them, eval, provenance."""
    sources = [public_source(m.get("source") or {}) for m in metas]  # published: no local paths
    models = _distinct([(s.get("model") or {}).get("hub_id") or None for s in sources])
    names = _distinct([(s.get("model") or {}).get("name") for s in sources])
    header = ["---", "library_name: saelens", "tags:"]
    header += [f"- {t}" for t in ("sparse-autoencoder", "saelens", "sae-train", "interpretability")]
    if models:
        header.append("base_model:" if len(models) > 1 else f"base_model: {json.dumps(models[0])}")
        header += [f"- {json.dumps(m)}" for m in models] if len(models) > 1 else []
    header.append("---")

    model_text = ", ".join(f"`{m}`" for m in (models or names)) or "an unrecorded model"
    datas = _distinct([s.get("data") for s in sources])
    data_text = (
        "; ".join(
            d.get("source", "?")
            + (f" `{d['path']}`" if d.get("path") else "")
            + (f" ({d['name']})" if d.get("name") else "")
            for d in datas
        )
        or "unrecorded data"
    )
    versions = _distinct([(m.get("provenance") or {}).get("version") for m in metas])
    commits = _distinct([(m.get("provenance") or {}).get("commit") for m in metas])
    repo = repo_id or "<owner/name>"
    example = saes[0].name

    columns = ["SAE (folder)", "site", "architecture", "d_in", "d_sae", "k", "tokens trained"]
    evaluated = results is not None and bool(results.entries)
    if evaluated:
        columns += [c[0] for c in _CARD_METRICS]
    rows = []
    for s in saes:
        arch = (
            s.architecture
            if s.architecture == s.saelens_architecture
            else f"{s.architecture} (SAELens {s.saelens_architecture})"
        )
        row = [
            f"`{s.name}`",
            f"`{s.site}`",
            arch,
            str(s.d_in),
            str(s.d_sae),
            str(s.k) if s.k else "–",
            f"{s.tokens_trained:,}" if isinstance(s.tokens_trained, int) else "–",
        ]
        if evaluated:
            row += (
                [_fmt(fmt, s.metrics.get(key)) for _, key, fmt in _CARD_METRICS]
                if s.eval_name
                else ["not evaluated"] * len(_CARD_METRICS)
            )
        rows.append(row)
    table = ["| " + " | ".join(r) + " |" for r in [columns, ["---"] * len(columns), *rows]]

    lines = [
        *header,
        "",
        f"# Sparse autoencoders for {model_text}",
        "",
        f"{len(saes)} sparse autoencoder(s) trained with sae-train "
        f"{', '.join(versions) or __version__} on activations of {model_text} ({data_text}).",
        "",
        *table,
        "",
        "Every SAE acts on raw activations of its site (TransformerLens hook names): "
        "`f = σ((x − b_dec) W_enc + b_enc)`, `x̂ = f W_dec + b_dec`, with the training-time input "
        "normalisation folded into the weights (`normalize_activations: none`) and unit-norm decoder rows. "
        "Where the table names a SAELens architecture, the SAE is stored as that SAELens architecture, "
        "which computes exactly what it computes at inference (a BatchTopK SAE, for instance, as a JumpReLU "
        "SAE with its inference threshold).",
        "",
        *(
            [
                (
                    "A transcoder (a SAELens `*transcoder` architecture) reads its site and writes another "
                    "(`metadata.hook_name_out`): `f = σ(x W_enc + b_enc)`, `ŷ = f W_dec + b_dec (+ x W_skipᵀ)`, both sites' "
                    "normalisations folded in; with sae-train, `sae.reconstruct(x)` returns (latents, output)."
                ),
                "",
            ]
            if any(s.saelens_architecture.endswith("transcoder") for s in saes)
            else []
        ),
        "## Usage",
        "",
        "With [SAELens](https://github.com/decoderesearch/SAELens) (>= 6):",
        "",
        "```python",
        "from sae_lens import SAE",
        "",
        f'sae = SAE.from_pretrained("{repo}", "{example}")   # from the hub: repo id, then the SAE folder',
        f'sae = SAE.load_from_disk("path/to/export/{example}")   # or from a local copy',
        "```",
        "",
        "With sae-train:",
        "",
        "```python",
        "from sae_train.hub import load_exported",
        "",
        f'sae = load_exported("{repo}", folder="{example}")',
        "latents = sae.encode(x)          # x: [n_tokens, d_in] raw activations",
        "x_hat = sae.decode(latents)",
        "```",
        "",
        "## Evaluation",
        "",
    ]
    if results is None:
        lines.append("Not evaluated.")
    elif results.markdown:
        lines += _nested_markdown(results.markdown)
    elif not evaluated:
        lines.append("Not evaluated.")
    else:
        lines.append(f"The numbers in the table above come from `sae-train eval` ({EVAL_JSON}).")
    lines += [
        "",
        "## Provenance",
        "",
        f"Trained with sae-train {', '.join(versions) or '?'} (commit {', '.join(c for c in commits if c) or 'unknown'}); "
        f"exported with sae-train {__version__}. Each SAE's `cfg.json` holds the full training record under "
        f"`metadata.{METADATA_KEY}` (SAE config, normalisation constant, tokens trained, model and data, "
        "optimiser settings); SAELens ignores it.",
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- stage


def run(cfg: ExportConfig) -> Any:
    """Export (and push) the checkpoints at cfg.checkpoint; returns what was written (an
    ExportSummary, or for format=circuit_tracer a circuit_tracer.CircuitTracerSummary)."""
    if cfg.format == "circuit_tracer":
        from sae_train import circuit_tracer  # it builds on this module's checkpoint discovery

        return circuit_tracer.run(cfg)
    token = None
    if cfg.push_to_hub:
        from sae_train.hub import resolve_token

        token = resolve_token()  # before any work: a missing token fails fast
    out, plans = _plan(cfg)
    results = read_eval(cfg.eval_dir) if cfg.eval_dir else None
    out.mkdir(parents=True, exist_ok=True)
    saes = [_export_one(plan, out, results) for plan in plans]
    readme = out / README
    write_text_atomic(readme, model_card(saes, [p.meta for p in plans], results, cfg.repo_id))
    summary = ExportSummary(out_dir=str(out), saes=saes, readme=str(readme), repo_id=cfg.repo_id)
    if cfg.push_to_hub:
        from sae_train.hub import push

        try:
            summary.commit_url = push(out, cfg.repo_id, private=cfg.private, token=token, paths=summary.files)
        except UserError as err:
            raise UserError(f"{err}\nThe export in {out} is complete; run the same command again to push it.") from None
    return summary
