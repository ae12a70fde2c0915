"""SAEConfig: validation with helpful errors, resolution of automatic sizes, Hydra compatibility."""

import pytest
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError

from sae_train.errors import UserError
from sae_train.sae import ARCHITECTURES, SAEConfig
from sae_train.train.config import comparable


def test_defaults_are_valid_and_resolve():
    cfg = SAEConfig().resolved(576)
    assert (cfg.d_in, cfg.d_sae, cfg.aux_k) == (576, 8 * 576, 288)
    assert SAEConfig(d_sae=100, aux_k=7).resolved(10).d_sae == 100
    assert SAEConfig(d_sae=100, aux_k=7).resolved(10).aux_k == 7


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"architecture": "gated"}, "batchtopk, clt, jumprelu, matryoshka, relu, topk"),
        ({"k": 0}, "k=0"),
        ({"k": -3}, "k=-3"),
        ({"d_in": 16, "d_sae": 64, "k": 65}, "at most d_sae = 64"),
        ({"sparsity": "l2"}, "l1, l1_decnorm"),
        ({"architecture": "topk", "sparsity": "l1_decnorm"}, "relu architecture only"),
        ({"l1_coefficient": -1.0}, "l1_coefficient"),
        ({"l0_coefficient": float("nan")}, "l0_coefficient"),
        ({"aux_coefficient": -0.5}, "aux_coefficient"),
        ({"jumprelu_bandwidth": 0.0}, "jumprelu_bandwidth"),
        ({"b_dec_init": "median"}, "geometric_median, mean, zeros"),
        ({"expansion_factor": 0}, "expansion_factor"),
        ({"batchtopk_threshold_beta": 1.0}, "batchtopk_threshold_beta"),
        ({"k_anneal": 1.5}, "k_anneal=1.5"),
        ({"k_anneal": -0.1}, "k_anneal=-0.1"),
    ],
)
def test_bad_values_name_the_field_and_the_fix(kwargs, needle):
    with pytest.raises(UserError, match="SAE config") as err:
        SAEConfig(**kwargs)
    assert needle in str(err.value)


def test_k_anneal_defaults_to_the_architectures_choice_for_a_transcoder_and_0_for_an_sae():
    """Resolved configs (cfg.json) record the fraction used; runs saved before the field existed
    trained without it, so a resumed TopK transcoder must say so (its default is not 0)."""
    target = "blocks.0.hook_mlp_out"
    for arch, expected in (("topk", 0.2), ("matryoshka", 0.2), ("batchtopk", 0.0), ("clt", 0.0), ("relu", 0.0)):
        assert SAEConfig(architecture=arch, target=target).resolved(16, 8).k_anneal == expected
    for arch in ("topk", "matryoshka"):
        assert SAEConfig(architecture=arch).resolved(16).k_anneal == 0.0
    assert SAEConfig(target=target, k_anneal=0).resolved(16, 8).k_anneal == 0.0
    assert SAEConfig(k_anneal=0.5).resolved(16).k_anneal == 0.5
    old_sae, old_transcoder = {"sae": {"k": 32}}, {"sae": {"k": 32, "target": "blocks.0.hook_mlp_out"}}
    assert comparable(old_sae) == comparable({"sae": {"k": 32, "k_anneal": None}})
    assert comparable(old_transcoder) != comparable({"sae": {**old_transcoder["sae"], "k_anneal": None}})
    assert comparable(old_transcoder) == comparable({"sae": {**old_transcoder["sae"], "k_anneal": 0}})


def test_k_larger_than_d_sae_is_caught_when_resolving():
    with pytest.raises(UserError, match="at most d_sae = 32"):
        SAEConfig(k=40, expansion_factor=2).resolved(16)


def test_resolving_to_a_different_width_is_an_error():
    with pytest.raises(UserError, match="d_in=16 but the activations have width 32"):
        SAEConfig(d_in=16).resolved(32)


def test_every_architecture_is_registered_once():
    assert set(ARCHITECTURES) == {"relu", "topk", "batchtopk", "matryoshka", "jumprelu", "clt"}
    for name, cls in ARCHITECTURES.items():
        assert cls.architecture == name


def test_structured_config_roundtrip_through_omegaconf():
    base = OmegaConf.structured(SAEConfig)
    merged = OmegaConf.merge(base, OmegaConf.from_dotlist(["architecture=jumprelu", "l0_coefficient=0.01"]))
    cfg = OmegaConf.to_object(merged)
    assert isinstance(cfg, SAEConfig) and cfg.architecture == "jumprelu" and cfg.l0_coefficient == 0.01
    with pytest.raises(ConfigKeyError):  # wrong key: OmegaConf refuses before any work starts
        OmegaConf.merge(base, OmegaConf.from_dotlist(["no_such_field=1"]))


def test_from_dict_ignores_metadata_keys():
    cfg = SAEConfig.from_dict({**SAEConfig().resolved(8).to_dict(), "site": "blocks.0.hook_resid_post"})
    assert cfg == SAEConfig().resolved(8)
