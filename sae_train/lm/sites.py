"""Activation sites: TransformerLens-style names mapped onto Hugging Face modules.

A site is a tensor inside the forward pass, named like `blocks.8.hook_resid_post` so SAEs
trained here interoperate with SAELens. Each name resolves to a module and whether its input
or output is the activation; `resume_layer` is the first decoder layer that has to run again
when the site's value is replaced, which lets eval share the layers before it across
conditions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from torch import nn

from sae_train.errors import UserError

SITE_KINDS = ("hook_resid_pre", "hook_resid_post", "hook_mlp_out", "hook_attn_out", "mlp.hook_in", "mlp.hook_post")
"""`mlp.hook_in` is the MLP's input: the normalised residual stream it reads (circuit-tracer's
and SAELens's name; TransformerLens calls it `ln2.hook_normalized`), the source of a transcoder
whose target is `hook_mlp_out`."""
_SITE_RE = re.compile(r"^blocks\.(\d+)\.(" + "|".join(re.escape(k) for k in SITE_KINDS) + r")$")


@dataclass(frozen=True)
class Family:
    """Where a model family keeps its decoder layers and the modules inside one layer.

    Paths inside a layer are relative to it. `mlp` is the MLP module: its input is
    `mlp.hook_in` (every family calls it on the normalised residual stream). `mlp_down` is the
    MLP's output projection: its input is the MLP hidden activation (`mlp.hook_post`), for
    gated MLPs act(gate) * up.
    """

    layers: str
    attn_out: str
    mlp_out: str
    mlp_down: str
    mlp: str = "mlp"


_LLAMA = Family("model.layers", attn_out="self_attn", mlp_out="mlp", mlp_down="mlp.down_proj")
# Gemma 2/3 normalise each sublayer's output before adding it to the residual stream;
# TransformerLens's hook_attn_out/hook_mlp_out sit after those norms.
_GEMMA2 = Family(
    "model.layers",
    attn_out="post_attention_layernorm",
    mlp_out="post_feedforward_layernorm",
    mlp_down="mlp.down_proj",
)
FAMILIES: dict[str, Family] = {
    "gpt2": Family("transformer.h", attn_out="attn", mlp_out="mlp", mlp_down="mlp.c_proj"),
    "gpt_neox": Family("gpt_neox.layers", attn_out="attention", mlp_out="mlp", mlp_down="mlp.dense_4h_to_h"),
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gemma": _LLAMA,
    "gemma2": _GEMMA2,
    "gemma3_text": _GEMMA2,
}


@dataclass(frozen=True)
class Site:
    """A resolved activation site.

    `module` is the full module path to hook; `on_input` says the activation is the module's
    first positional input (a pre-hook) rather than its output. `layer` is the decoder layer
    that computes it (None outside the layers) and `resume_layer` the first layer that must
    run again when the site's value is replaced.
    """

    name: str
    module: str
    on_input: bool
    layer: int | None
    resume_layer: int


def family_of(model: nn.Module) -> Family:
    """The layer layout of `model`, by its config's model_type."""
    model_type = getattr(model.config, "model_type", "")
    if model_type not in FAMILIES:
        raise UserError(
            f"Model type '{model_type}' is not supported for named activation sites. Supported "
            f"families: {', '.join(sorted(FAMILIES))}. Add an entry to FAMILIES in "
            "sae_train/lm/sites.py, or open an issue with the model name."
        )
    return FAMILIES[model_type]


def n_layers(model: nn.Module) -> int:
    config: Any = model.config
    return int(config.num_hidden_layers)


def valid_site_names(model: nn.Module) -> str:
    """A one-line description of the names `resolve_site` accepts for `model`."""
    family = family_of(model)
    last = n_layers(model) - 1
    kinds = "|".join(SITE_KINDS)
    return (
        f"blocks.{{0..{last}}}.{{{kinds}}} (e.g. blocks.{last // 2}.hook_resid_post), "
        f"or a module path such as {family.layers}.{last // 2}.mlp"
    )


def resolve_site(model: nn.Module, name: str) -> Site:
    """Map a TransformerLens-style site name (or a raw module path) onto `model`'s modules."""
    family = family_of(model)
    layer_count = n_layers(model)
    match = _SITE_RE.match(name)
    if match:
        layer, kind = int(match.group(1)), match.group(2)
        if layer >= layer_count:
            raise UserError(
                f"Site '{name}' asks for layer {layer}, but the model has {layer_count} layers "
                f"(0..{layer_count - 1}). Valid sites: {valid_site_names(model)}."
            )
        prefix = f"{family.layers}.{layer}"
        if kind == "hook_resid_pre":
            return Site(name, prefix, on_input=True, layer=layer, resume_layer=layer)
        if kind == "hook_resid_post":
            return Site(name, prefix, on_input=False, layer=layer, resume_layer=layer + 1)
        sub = {
            "hook_attn_out": family.attn_out,
            "hook_mlp_out": family.mlp_out,
            "mlp.hook_in": family.mlp,
            "mlp.hook_post": family.mlp_down,
        }[kind]
        return Site(
            name, f"{prefix}.{sub}", on_input=kind in ("mlp.hook_in", "mlp.hook_post"), layer=layer, resume_layer=layer
        )

    modules = dict(model.named_modules())
    if name in modules and name != "":
        layer_match = re.match(re.escape(family.layers) + r"\.(\d+)(\.|$)", name)
        if layer_match:
            layer = int(layer_match.group(1))
            # A whole layer's output is its resid_post: the next layer is the first to rerun.
            resume = layer + 1 if layer_match.group(2) == "" else layer
            return Site(name, name, on_input=False, layer=layer, resume_layer=resume)
        return Site(name, name, on_input=False, layer=None, resume_layer=0)

    raise UserError(f"Unknown activation site '{name}'. Valid sites for this model: {valid_site_names(model)}.")


# ------------------------------------------------------------------ layer patterns (cross-layer transcoders)

_LAYER_PATTERN_RE = re.compile(r"^blocks\.\*\.(.+)$")
_LAYER_OF_RE = re.compile(r"^blocks\.(\d+)\.")


def expand_layer_sites(sites: list[str], n_layers: int) -> list[str]:
    """`sites` with each pattern `blocks.*.KIND` replaced by blocks.0.KIND .. blocks.{n_layers-1}.KIND
    (in layer order); other names as they are."""
    out: list[str] = []
    for name in sites:
        match = _LAYER_PATTERN_RE.match(name)
        out += [f"blocks.{i}.{match.group(1)}" for i in range(n_layers)] if match else [name]
    return out


def layer_count(sites: list[str]) -> int:
    """1 + the deepest layer named among `sites` (`blocks.N.…`), 0 if none: what `blocks.*`
    spans over the sites of an activation store."""
    return 1 + max((int(m.group(1)) for s in sites if (m := _LAYER_OF_RE.match(s))), default=-1)


def layer_target(template: str, site: str) -> str:
    """The site a dictionary reading `site` writes: `template` with `{layer}` replaced by the
    layer of `site` (blocks.{layer}.hook_mlp_out for blocks.3.mlp.hook_in -> blocks.3.hook_mlp_out);
    a template without `{layer}` is the target itself."""
    if "{layer}" not in template:
        return template
    match = _LAYER_OF_RE.match(site)
    if match is None:
        raise UserError(
            f"sae.target={template} names a target per layer ({{layer}}), but site {site} has no layer "
            "(blocks.N.…). Use layer sites, e.g. sites=[blocks.*.mlp.hook_in]."
        )
    return template.replace("{layer}", match.group(1))
