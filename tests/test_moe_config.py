"""MoEConfig validation and round trips; MoE presets and their (active) parameter counts (SPEC §10)."""
import dataclasses
import json

import jax
import pytest
from flax import nnx

from jaxlm.config import PRESETS, Dispatch, Gate, ModelConfig, MoEConfig, get_preset
from jaxlm.model import Transformer


@pytest.mark.parametrize("field,value,words", [
    ("n_experts", 0, "integer >= 1"),
    ("top_k", 3, "must be <= n_experts"),
    ("top_k", 1.0, "integer >= 1"),
    ("every", 0, "integer >= 1"),
    ("capacity_factor", 0.0, "number > 0"),
    ("eval_capacity_factor", -2.0, "number > 0"),
    ("group_size", 0, "integer >= 1"),
    ("dispatch", "megablocks", "['capacity', 'dropless']"),
    ("gate", "sigmoid", "['topk_softmax', 'softmax']"),
    ("router_jitter", 1.0, "[0, 1)"),
    ("load_balance_coef", -0.01, "number >= 0"),
    ("router_z_coef", "x", "number >= 0"),
])
def test_invalid_field_names_the_field(field, value, words):
    with pytest.raises(ValueError, match=f"MoEConfig.{field}") as e:
        MoEConfig(**{"n_experts": 2, field: value})
    assert words in str(e.value)


def test_moe_must_fit_the_layer_count():
    with pytest.raises(ValueError, match=r"ModelConfig.moe.every \(3\) must divide n_layers \(2\)"):
        get_preset("test_moe").replace(moe=dict(n_experts=4, every=3))
    with pytest.raises(ValueError, match="ModelConfig.moe must be None"):
        get_preset("test").replace(moe=4)


def test_config_round_trips_through_a_nested_dict():
    cfg = get_preset("gemini_moe_16e")
    assert cfg.moe.dispatch is Dispatch.CAPACITY and cfg.moe.gate is Gate.TOPK_SOFTMAX
    d = json.loads(json.dumps(cfg.to_dict()))  # plain JSON: enums become their values
    assert d["moe"]["dispatch"] == "capacity" and d["moe"]["every"] == 2
    assert ModelConfig.from_dict(d) == cfg
    assert get_preset("test").to_dict()["moe"] is None
    assert ModelConfig.from_dict(get_preset("test").to_dict()) == get_preset("test")
    with pytest.raises(ValueError, match=r"unknown MoEConfig field\(s\) \['experts'\]"):
        ModelConfig.from_dict({**d, "moe": {**d["moe"], "experts": 3}})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.moe.top_k = 1


def _count(cfg):
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))  # nothing allocated
    return sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


def test_mixtral_8x7b_has_46_7b_parameters_12_9b_active():
    cfg = PRESETS["mixtral_8x7b"]
    n = _count(cfg)
    assert n == cfg.param_count() and f"{n / 1e9:.1f}" == "46.7"            # SPEC §10
    assert f"{cfg.active_param_count() / 1e9:.1f}" == "12.9"
    # Active = the same model with k experts and no spare ones (the router still counts in full).
    dense_k = cfg.replace(moe=None, ffn_hidden=cfg.ffn_hidden * cfg.moe.top_k)
    router = cfg.n_layers * cfg.d_model * cfg.moe.n_experts
    assert cfg.active_param_count() == dense_k.param_count() + router


@pytest.mark.parametrize("name", ["gemini_moe_8e", "gemini_moe_16e", "gemini_moe_32e",
                                  "tiny_moe", "test_moe"])
def test_moe_preset_counts_match_the_model(name):
    cfg = PRESETS[name]
    assert _count(cfg) == cfg.param_count() > cfg.active_param_count()


def test_gemini_family_keeps_active_size_as_experts_grow():
    active = [PRESETS[f"gemini_moe_{e}e"].active_param_count() for e in (8, 16, 32)]
    total = [PRESETS[f"gemini_moe_{e}e"].param_count() for e in (8, 16, 32)]
    assert max(active) / min(active) < 1.001 and total[0] < total[1] < total[2]
    tiny, tiny_moe = PRESETS["tiny"], PRESETS["tiny_moe"]
    assert abs(tiny_moe.active_param_count() / tiny.param_count() - 1) < 0.01
