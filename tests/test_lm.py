"""Sites, capture and splicing against the models' own outputs, for every supported family."""

from __future__ import annotations

import pytest
import torch

from sae_train.errors import UserError
from sae_train.lm import LanguageModel, ModelConfig, capture, splice
from tests.tiny import FAMILIES

N_LAYERS = 3


def load(path) -> LanguageModel:
    return LanguageModel.load(ModelConfig(name=str(path), dtype="float32", device="cpu"))


def ids(lm: LanguageModel, batch: int = 2, seq: int = 12, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, lm.model.config.vocab_size, (batch, seq), generator=gen)


@pytest.fixture(params=FAMILIES)
def lm(request, tiny_model_dir) -> LanguageModel:
    return load(tiny_model_dir(request.param))


def test_resid_sites_equal_output_hidden_states(lm):
    tokens = ids(lm)
    with torch.no_grad():
        hidden = lm.model(tokens, output_hidden_states=True).hidden_states
    names = [f"blocks.{i}.hook_resid_pre" for i in range(N_LAYERS)] + [
        f"blocks.{i}.hook_resid_post" for i in range(N_LAYERS - 1)
    ]
    acts = lm.capture([lm.site(n) for n in names], tokens)
    for i in range(N_LAYERS):
        assert torch.equal(acts[f"blocks.{i}.hook_resid_pre"], hidden[i])
    for i in range(N_LAYERS - 1):
        assert torch.equal(acts[f"blocks.{i}.hook_resid_post"], hidden[i + 1])


def test_early_stop_gives_the_same_values_and_skips_later_layers(lm):
    tokens = ids(lm)
    full = lm.capture([lm.site(f"blocks.{i}.hook_resid_post") for i in range(N_LAYERS)], tokens)
    ran = []
    handles = [layer.register_forward_hook(lambda m, a, o, i=i: ran.append(i)) for i, layer in enumerate(lm.layers)]
    try:
        early = lm.capture([lm.site("blocks.0.hook_resid_post")], tokens)
    finally:
        for h in handles:
            h.remove()
    assert ran == [0]
    assert torch.equal(early["blocks.0.hook_resid_post"], full["blocks.0.hook_resid_post"])


def test_sublayer_sites_sum_to_the_residual_update(lm):
    """resid_post = resid_pre + attn_out + mlp_out holds for every family (Gemma-2 after its post-norms,
    NeoX with its parallel residual), so the sublayer sites are the right tensors."""
    tokens = ids(lm)
    layer = 1
    names = ["hook_resid_pre", "hook_attn_out", "hook_mlp_out", "hook_resid_post", "mlp.hook_post"]
    acts = lm.capture([lm.site(f"blocks.{layer}.{n}") for n in names], tokens)
    a = {n: acts[f"blocks.{layer}.{n}"] for n in names}
    torch.testing.assert_close(a["hook_resid_pre"] + a["hook_attn_out"] + a["hook_mlp_out"], a["hook_resid_post"])
    # mlp.hook_post is the MLP hidden: the output projection maps it onto the MLP's output.
    family = lm.model.config.model_type
    down = {"gpt2": "mlp.c_proj", "gpt_neox": "mlp.dense_4h_to_h"}.get(family, "mlp.down_proj")
    with torch.no_grad():
        projected = lm.layers[layer].get_submodule(down)(a["mlp.hook_post"])
        if family == "gemma2":
            projected = lm.layers[layer].post_feedforward_layernorm(projected)
    torch.testing.assert_close(projected, a["hook_mlp_out"])


def test_mlp_input_site_is_what_the_mlp_reads(lm):
    """mlp.hook_in (a transcoder's source) is the MLP module's input: the MLP maps it onto its
    output (hook_mlp_out, after Gemma-2's post-norm); for GPT-2 it is ln_2 of the residual."""
    tokens = ids(lm)
    layer = 1
    acts = lm.capture(
        [lm.site(f"blocks.{layer}.{n}") for n in ("mlp.hook_in", "hook_mlp_out", "hook_attn_out", "hook_resid_pre")],
        tokens,
    )
    x = acts[f"blocks.{layer}.mlp.hook_in"]
    block = lm.layers[layer]
    with torch.no_grad():
        out = block.mlp(x)
        if lm.model.config.model_type == "gemma2":
            out = block.post_feedforward_layernorm(out)
        if lm.model.config.model_type == "gpt2":
            resid_mid = acts[f"blocks.{layer}.hook_resid_pre"] + acts[f"blocks.{layer}.hook_attn_out"]
            torch.testing.assert_close(x, block.ln_2(resid_mid))
    torch.testing.assert_close(out, acts[f"blocks.{layer}.hook_mlp_out"])


def test_identity_splice_is_exactly_clean(lm):
    tokens = ids(lm)
    with torch.no_grad():
        clean = lm.model(tokens).logits
        with lm.splice(lm.site("blocks.1.hook_resid_post"), lambda x: x):
            spliced = lm.model(tokens).logits
    assert torch.equal(clean, spliced)


def test_zero_splice_equals_manual_zero_ablation(lm):
    tokens = ids(lm)
    site = lm.site("blocks.1.hook_mlp_out")
    with torch.no_grad():
        with lm.splice(site, torch.zeros_like):
            spliced = lm.model(tokens).logits
        mlp = lm.model.get_submodule(site.module)
        handle = mlp.register_forward_hook(lambda m, a, o: torch.zeros_like(o[0] if isinstance(o, tuple) else o))
        try:
            manual = lm.model(tokens).logits
        finally:
            handle.remove()
        clean = lm.model(tokens).logits
    assert torch.equal(spliced, manual)
    assert not torch.equal(spliced, clean)


@pytest.mark.parametrize(
    "site_name",
    [
        "blocks.0.hook_resid_pre",
        "blocks.1.hook_resid_post",
        "blocks.1.hook_attn_out",
        "blocks.2.mlp.hook_in",
        "blocks.2.mlp.hook_post",
        "blocks.2.hook_resid_post",
    ],
)
def test_shared_prefix_equals_full_spliced_forward(lm, site_name):
    """The fast path (earlier layers stubbed) matches a full forward with the splice, bit for bit."""
    tokens = ids(lm)
    site = lm.site(site_name)
    fns = {"half": lambda x: 0.5 * x, "zero": torch.zeros_like, "shift": lambda x: x + 1.0}
    prefix = lm.shared_prefix(site, tokens)
    with torch.no_grad():
        assert torch.equal(prefix.clean.logits, lm.model(tokens).logits)
        assert torch.equal(prefix.activation, capture(lm.model, [site], tokens)[site.name])
        for fn in fns.values():
            with splice(lm.model, site, fn):
                slow = lm.model(tokens).logits
            assert torch.equal(prefix.run(fn).logits, slow)
    # The stubs are gone: a plain forward is clean again.
    with torch.no_grad():
        assert torch.equal(lm.model(tokens).logits, prefix.clean.logits)


def test_shared_prefix_runs_only_layers_from_the_site(tiny_model_dir):
    lm = load(tiny_model_dir("llama"))
    tokens = ids(lm)
    prefix = lm.shared_prefix(lm.site("blocks.1.hook_resid_post"), tokens)
    ran = []
    handles = [layer.mlp.register_forward_hook(lambda m, a, o, i=i: ran.append(i)) for i, layer in enumerate(lm.layers)]
    try:
        prefix.run(lambda x: x)
    finally:
        for h in handles:
            h.remove()
    assert ran == [2]


def test_raw_module_path_is_accepted(tiny_model_dir):
    lm = load(tiny_model_dir("llama"))
    tokens = ids(lm)
    raw = lm.capture([lm.site("model.layers.1.mlp")], tokens)["model.layers.1.mlp"]
    named = lm.capture([lm.site("blocks.1.hook_mlp_out")], tokens)["blocks.1.hook_mlp_out"]
    assert torch.equal(raw, named)
    assert lm.site("model.layers.1").resume_layer == 2


def test_unknown_site_lists_valid_names(tiny_model_dir):
    lm = load(tiny_model_dir("gpt2"))
    with pytest.raises(UserError, match=r"blocks\.\{0\.\.2\}.*hook_resid_post.*transformer\.h\.1\.mlp"):
        lm.site("blocks.1.hook_resid_middle")
    with pytest.raises(UserError, match="has 3 layers"):
        lm.site("blocks.7.hook_resid_post")


def test_unknown_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="neither a model directory nor a .gguf file"):
        LanguageModel.load(ModelConfig(name=str(tmp_path / "nope"), device="cpu"))
    with pytest.raises(UserError, match="does not exist"):
        LanguageModel.load(ModelConfig(name=str(tmp_path / "missing.gguf"), device="cpu"))
    with pytest.raises(UserError, match="not installed"):
        LanguageModel.load(ModelConfig(name="pkg:no_such_package_xyz/model.gguf", device="cpu"))


def test_identity_records_revision_and_dtype(tiny_model_dir):
    lm = load(tiny_model_dir("gpt2"))
    assert lm.identity["dtype"] == "float32"
    assert lm.identity["revision"].startswith("sha256:")
    assert lm.site_width(lm.site("blocks.0.mlp.hook_post")) == 128  # GPT-2's MLP is 4 x n_embd
