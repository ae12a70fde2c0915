"""Conversion between our inference SAE and the SAELens v6 layout (dicts and tensors only).

SAELens (github.com/decoderesearch/SAELens, read at v6.54) loads a folder holding `cfg.json` and
`sae_weights.safetensors` (+ optional `sparsity.safetensors`: log10 firing frequencies under
the key "sparsity") with `SAE.load_from_disk(folder)`, or from a hub repo with
`SAE.from_pretrained(repo_id, folder)`. Its inference math (sae_lens/saes/*.py) is ours:

    z = (x - b_dec * apply_b_dec_to_input) @ W_enc + b_enc
    standard: f = relu(z)                      <- our relu (either sparsity penalty)
    topk:     f = relu(top-k of z)             <- our topk (rescale_acts_by_decoder_norm false)
    jumprelu: f = relu(z) * [z > threshold]    <- our jumprelu, and our batchtopk at inference
    x_hat = f @ W_dec + b_dec

relu(z) * [z > t] equals our z * [z > t] exactly when t >= 0, which our thresholds always are
(JumpReLU clamps them, BatchTopK's is a mean of kept ReLU outputs); a negative one is refused.
Our checkpoints are already folded (raw activations, unit-norm decoder rows), so the export
says normalize_activations "none".

Transcoders go out as SAELens's transcoder classes (sae_lens/saes/transcoder.py), whose encoder
reads x itself (apply_b_dec_to_input false, like ours) and whose W_skip is [d_out, d_in] (ours
transposed): relu -> `transcoder` / `skip_transcoder`, jumprelu and batchtopk ->
`jumprelu_transcoder` / `jumprelu_skip_transcoder`; metadata.hook_name is the site read,
metadata.hook_name_out the target. SAELens has no TopK transcoder, so a topk one cannot go out.

Our own record (the checkpoint's whole cfg.json) rides in `metadata.sae_train`: SAELens keeps
unknown metadata keys as attributes and ignores them otherwise, and `from_saelens` uses it to
rebuild exactly the SAE that was exported (BatchTopK included). SAELens SAEs trained elsewhere
(standard, topk, jumprelu) load too, with identical latents and reconstructions.

`saelens_reference` writes SAELens's inference out in plain torch: the export checks every
converted SAE against it on a probe batch (no sae_lens import needed), and the tests pin it to
sae_lens itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import torch
from torch import Tensor

from sae_train.errors import UserError
from sae_train.sae.base import SAE
from sae_train.sae.config import SAEConfig
from sae_train.sae.registry import ARCHITECTURES, for_saelens, load_folded

SAELENS_VERSION = "6.0.0"
"""The SAELens cfg layout written (checked against sae-lens 6.54): SAELens treats a config
without `metadata.sae_lens_version` >= 6.0.0 as pre-6 and renames its keys."""

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SPARSITY_FILE = "sparsity.safetensors"
METADATA_KEY = "sae_train"
"""cfg["metadata"][METADATA_KEY] = {"architecture", "checkpoint_cfg", "exported_by"}."""

LOG_SPARSITY_FLOOR = 1e-10
"""log10(frequency + floor): SAELens's convention, so dead latents read -10 rather than -inf."""


TRANSCODERS = {
    ("standard", False): "transcoder",
    ("standard", True): "skip_transcoder",
    ("jumprelu", False): "jumprelu_transcoder",
    ("jumprelu", True): "jumprelu_skip_transcoder",
}
"""(SAE inference architecture, skip connection) -> SAELens's transcoder architecture."""
_TRANSCODER_BASE = {name: key for key, name in TRANSCODERS.items()}


def _base(saelens_architecture: str) -> tuple[str, bool, bool]:
    """(SAE architecture computing its latents, is a transcoder, has a skip connection)."""
    if saelens_architecture in _TRANSCODER_BASE:
        base, skip = _TRANSCODER_BASE[saelens_architecture]
        return base, True, skip
    return saelens_architecture, False, False


def _tensor_names(saelens_architecture: str) -> list[str]:
    """The weights of a SAELens SAE of this inference architecture."""
    base, _, skip = _base(saelens_architecture)
    names = ["W_enc", "W_dec", "b_enc", "b_dec"]
    return names + ["threshold"] * (base == "jumprelu") + ["W_skip"] * skip


def saelens_architecture_of(sae: SAE) -> str:
    """The SAELens architecture `sae` exports as (a UserError where SAELens has none)."""
    arch = sae.saelens_architecture
    if not sae.cfg.is_transcoder:
        return arch
    key = (arch, sae.cfg.skip)
    if key not in TRANSCODERS:
        raise UserError(
            f"SAELens has no {arch} transcoder (it loads {', '.join(TRANSCODERS.values())}), so this "
            f"{sae.cfg.architecture} transcoder cannot be exported to its layout. Train it with "
            "sae.architecture=batchtopk (exported as JumpReLU: k per token on average), jumprelu or relu."
        )
    return TRANSCODERS[key]


def _loadable() -> list[str]:
    """The SAELens architectures that load as one of ours."""
    return sorted(
        {
            c.saelens_architecture
            for c in ARCHITECTURES.values()
            if c.saelens_architecture == c.saelens_training_architecture
        }
    )


def to_saelens(sae: SAE, metadata: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(cfg.json dict, sae_weights tensors) of the SAELens v6 SAE that computes what `sae` does.

    `sae` must be an inference SAE (folded: it acts on raw activations). `metadata` becomes
    cfg["metadata"] after `sae_lens_version`: SAELens's keys (hook_name, model_name,
    context_size, prepend_bos, dataset_path, ...) and ours (METADATA_KEY).
    """
    if not sae.folded:
        raise ValueError("to_saelens converts inference SAEs (acting on raw activations); pass sae.fold(scale)")
    ours, arch = sae.cfg.architecture, saelens_architecture_of(sae)
    if sorted(sae.inference_tensors) != sorted(_tensor_names(arch)):
        raise ValueError(
            f"architecture {ours!r} has tensors {list(sae.inference_tensors)} but exports as a "
            f"SAELens {arch!r} SAE, which has {_tensor_names(arch)}: fix its saelens_architecture"
        )
    with torch.no_grad():
        tensors = {
            name: getattr(sae, name).detach().to("cpu", torch.float32).clone().contiguous()
            for name in _tensor_names(arch)
        }
        if "W_skip" in tensors:  # SAELens: x @ W_skip.T with W_skip [d_out, d_in]
            tensors["W_skip"] = tensors["W_skip"].t().contiguous()
    if "threshold" in tensors and bool((tensors["threshold"] < 0).any()):
        n = int((tensors["threshold"] < 0).sum())
        raise UserError(
            f"This {ours} SAE has {n} negative thresholds; SAELens's JumpReLU applies a ReLU before its "
            f"threshold, so it cannot represent them. Thresholds trained by sae_train are never negative: "
            f"the checkpoint was edited or is corrupt."
        )
    cfg: dict[str, Any] = {
        "architecture": arch,
        "d_in": sae.cfg.d_in,
        "d_sae": sae.cfg.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": not sae.cfg.is_transcoder,
        "normalize_activations": "none",
        "reshape_activations": "none",
    }
    if sae.cfg.is_transcoder:
        cfg["d_out"] = sae.cfg.d_out
    if arch == "topk":
        cfg["k"] = sae.cfg.k
        cfg["rescale_acts_by_decoder_norm"] = False
    cfg["metadata"] = {
        "sae_lens_version": SAELENS_VERSION,
        "sae_lens_training_version": None,
        "training_architecture": sae.saelens_training_architecture,
        **metadata,
    }
    return cfg, tensors


def log_sparsity(frequency: Tensor) -> Tensor:
    """The `sparsity` tensor of sparsity.safetensors: log10 of each latent's firing frequency (fp32)."""
    return torch.log10(frequency.double() + LOG_SPARSITY_FLOOR).float()


def _bad(source: str, what: str) -> UserError:
    return UserError(f"{source}: {what}")


def _weights(cfg: Mapping[str, Any], tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The tensors SAELens's architecture reads (others in the file are ignored), fp32 on CPU."""
    weights = {
        n: tensors[n].detach().to("cpu", torch.float32) for n in _tensor_names(cfg["architecture"]) if n in tensors
    }
    if "W_skip" in weights:
        weights["W_skip"] = weights["W_skip"].t().contiguous()  # SAELens's [d_out, d_in] -> ours
    return weights


def _check_cfg(cfg: Mapping[str, Any], source: str) -> None:
    arch = cfg.get("architecture")
    if not isinstance(arch, str) or for_saelens(_base(arch)[0]) is None:
        raise _bad(
            source,
            f"architecture {arch!r} is not one sae_train can run; it loads SAELens "
            f"{', '.join(_loadable())} SAEs and their transcoders. Load this one with sae_lens itself.",
        )
    for key in ("d_in", "d_sae", *(("d_out",) if _base(arch)[1] else ())):
        if not isinstance(cfg.get(key), int) or cfg[key] <= 0:
            raise _bad(source, f"{key}={cfg.get(key)!r}; expected a positive integer.")
    norm = cfg.get("normalize_activations", "none")
    if norm not in (None, "none"):
        raise _bad(
            source,
            f"normalize_activations={norm!r}: the SAE expects normalised inputs, and sae_train "
            "runs SAEs on raw activations. Fold the normalisation into the weights first "
            "(SAELens: fold_activation_norm_scaling_factor) and save it again.",
        )
    if cfg.get("reshape_activations", "none") not in (None, "none"):
        raise _bad(
            source,
            f"reshape_activations={cfg['reshape_activations']!r} (per-head hook_z input) is not "
            "supported; sae_train SAEs take one flat vector per token.",
        )
    if arch == "topk" and (not isinstance(cfg.get("k"), int) or not 0 < cfg["k"] <= cfg["d_sae"]):
        raise _bad(source, f"k={cfg.get('k')!r}; a topk SAE needs 0 < k <= d_sae.")


def from_saelens(cfg: Mapping[str, Any], tensors: Mapping[str, Tensor], *, source: str = "SAELens SAE") -> SAE:
    """Our inference SAE from a SAELens v6 cfg.json dict and its weights.

    An export of ours (cfg["metadata"]["sae_train"] present) comes back as exactly the SAE that
    was exported: same architecture (BatchTopK too), config, weights and normalization_scale.
    Other SAELens SAEs (standard, topk, jumprelu) come back with the same latents and
    reconstructions as SAELens computes (apply_b_dec_to_input false and
    rescale_acts_by_decoder_norm true are folded into the weights). `source` names the input in
    error messages.
    """
    _check_cfg(cfg, source)
    weights = _weights(cfg, tensors)
    metadata = cfg.get("metadata") or {}
    record = metadata.get(METADATA_KEY) if isinstance(metadata, Mapping) else None
    if record:
        return _from_our_export(cfg, weights, record, source)
    return _from_foreign(cfg, weights, source)


def _from_our_export(cfg: Mapping[str, Any], weights: dict[str, Tensor], record: Mapping[str, Any], source: str) -> SAE:
    meta = record.get("checkpoint_cfg")
    if not isinstance(meta, Mapping):
        raise _bad(source, f"metadata.{METADATA_KEY} has no checkpoint_cfg; the export is incomplete. Export it again.")
    ours = SAEConfig.from_dict(dict(meta), source=f"{source} (metadata.{METADATA_KEY}.checkpoint_cfg)")
    arch = ARCHITECTURES[ours.architecture].saelens_architecture
    expected = {
        "architecture": TRANSCODERS.get((arch, ours.skip), arch) if ours.is_transcoder else arch,
        "d_in": ours.d_in,
        "d_sae": ours.d_sae,
    }
    if ours.is_transcoder:
        expected["d_out"] = ours.d_out
    if expected["architecture"] == "topk":
        expected["k"] = ours.k
    clash = {k: (cfg.get(k), v) for k, v in expected.items() if cfg.get(k) != v}
    centred = not ours.is_transcoder
    if (
        clash
        or cfg.get("apply_b_dec_to_input", centred) is not centred
        or cfg.get("rescale_acts_by_decoder_norm", False)
    ):
        raise _bad(
            source,
            f"cfg.json disagrees with the sae_train record in its metadata ({clash or 'bias/rescale flags'}); "
            "the file was edited after export. Export the checkpoint again.",
        )
    return load_folded(
        ours,
        weights,
        normalization_scale=meta.get("normalization_scale", 1.0),
        target_normalization_scale=meta.get("target_normalization_scale"),
        source=source,
    )


def _from_foreign(cfg: Mapping[str, Any], weights: dict[str, Tensor], source: str) -> SAE:
    arch, transcoder, skip = _base(cfg["architecture"])
    ours = for_saelens(arch)
    assert ours is not None, arch  # the caller checked that we run this SAELens architecture
    fields: dict[str, Any] = {"architecture": ours.architecture, "d_sae": cfg["d_sae"]}
    if arch == "topk":
        fields["k"] = cfg["k"]
    if transcoder:
        metadata = cfg.get("metadata") or {}
        target = metadata.get("hook_name_out") if isinstance(metadata, Mapping) else None
        if not isinstance(target, str) or not target:
            raise _bad(
                source,
                "a transcoder without metadata.hook_name_out: the site it writes is unknown. "
                "Add hook_name_out to its cfg.json metadata.",
            )
        fields |= {"target": target, "skip": skip}
    sae = load_folded(SAEConfig(**fields).resolved(cfg["d_in"], cfg.get("d_out", 0)), weights, source=source)
    with torch.no_grad():
        W_enc, W_dec, b_enc, b_dec = (getattr(sae, n).double() for n in ("W_enc", "W_dec", "b_enc", "b_dec"))
        if not transcoder and not cfg.get("apply_b_dec_to_input", True):  # transcoders never centre, like ours
            # x @ W_enc + b_enc == (x - b_dec) @ W_enc + (b_enc + b_dec @ W_enc)
            b_enc = b_enc + b_dec @ W_enc
        if arch == "topk" and cfg.get("rescale_acts_by_decoder_norm", False):
            # SAELens ranks z * n and decodes (f / n) @ W_dec: fold n into the encoder, 1/n into the decoder.
            n = W_dec.norm(dim=-1)
            W_enc, b_enc, W_dec = W_enc * n, b_enc * n, W_dec / n[:, None]
        for name, value in (("W_enc", W_enc), ("W_dec", W_dec), ("b_enc", b_enc)):
            getattr(sae, name).copy_(value.float())
        if "threshold" in sae.inference_tensors:
            # relu(z) * [z > t] == z * [z > max(t, 0)]
            cast(Tensor, sae.threshold).clamp_(min=0)
    return sae


def saelens_reference(cfg: Mapping[str, Any], tensors: Mapping[str, Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
    """(latents, reconstruction) that SAELens v6 computes for input x [n, d_in] (fp32).

    The plain-torch twin of sae_lens's StandardSAE/TopKSAE/JumpReLUSAE encode and decode
    (normalize_activations "none"), for checking conversions without importing sae_lens.
    """
    arch, transcoder, skip = _base(cfg["architecture"])
    W_enc, W_dec, b_enc, b_dec = (tensors[n].float() for n in ("W_enc", "W_dec", "b_enc", "b_dec"))
    x = x.float()
    centred = not transcoder and bool(cfg.get("apply_b_dec_to_input", True))
    z = (x - b_dec if centred else x) @ W_enc + b_enc
    rescale = arch == "topk" and cfg.get("rescale_acts_by_decoder_norm", False)
    if rescale:
        z = z * W_dec.norm(dim=-1)
    if arch == "standard":
        f = torch.relu(z)
    elif arch == "topk":
        values, indices = torch.topk(z, k=cfg["k"], dim=-1, sorted=False)
        f = torch.zeros_like(z).scatter(-1, indices, values.relu())
    elif arch == "jumprelu":
        f = torch.relu(z) * (z > tensors["threshold"].float()).to(z.dtype)
    else:
        raise ValueError(f"no reference for SAELens architecture {arch!r}")
    decoded = (f / W_dec.norm(dim=-1) if rescale else f) @ W_dec + b_dec
    if skip:
        decoded = decoded + x @ tensors["W_skip"].float().T
    return f, decoded
