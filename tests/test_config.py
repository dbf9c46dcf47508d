"""ModelConfig validation, presets and their parameter counts (SPEC.md §1)."""
import dataclasses
import json
from pathlib import Path

import jax
import pytest
from flax import nnx

from jaxlm.config import PRESETS, ModelConfig, Remat, get_preset, llama_ffn_hidden
from jaxlm.model import Transformer

BASE = dict(vocab_size=256, d_model=64, n_layers=2, n_heads=8, n_kv_heads=4, head_dim=8,
            ffn_hidden=128)


@pytest.mark.parametrize("field,value,words", [
    ("n_kv_heads", 3, "must divide n_heads"),
    ("head_dim", 7, "head_dim must be even"),
    ("sliding_window", 0, "sliding_window"),
    ("vocab_size", 0, "vocab_size"),
    ("d_model", -4, "d_model"),
    ("n_layers", 1.5, "n_layers"),
    ("ffn_hidden", True, "ffn_hidden"),
    ("rope_theta", 0.0, "rope_theta"),
    ("norm_eps", 0.0, "norm_eps"),
    ("init_std", -1.0, "init_std"),
    ("dtype", "float8", "dtype"),
    ("param_dtype", "int8", "param_dtype"),
    ("remat", "sometimes", "remat"),
])
def test_invalid_field_names_the_field(field, value, words):
    with pytest.raises(ValueError, match=f"ModelConfig.{field}") as e:
        ModelConfig(**{**BASE, field: value})
    assert words in str(e.value)


def test_config_is_frozen_and_round_trips():
    cfg = ModelConfig(**BASE, remat="dots")
    assert cfg.remat is Remat.DOTS
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.d_model = 3
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match=r"unknown ModelConfig field\(s\) \['hidden'\]"):
        ModelConfig.from_dict({**cfg.to_dict(), "hidden": 3})
    with pytest.raises(ValueError, match="unknown model preset 'llama9'"):
        get_preset("llama9")
    assert get_preset("test", sliding_window=4).sliding_window == 4


def test_ffn_width_rule_reproduces_meta_sizes():
    assert llama_ffn_hidden(4096, 256) == 11008
    assert llama_ffn_hidden(5120, 256) == 13824
    assert llama_ffn_hidden(8192, 4096, 1.3) == 28672


# SPEC.md §1 "params" column, to three significant figures.
SPEC_PARAMS = {"llama2_7b": "6.74", "llama2_13b": "13.0", "llama2_70b": "69.0", "mistral_7b": "7.24"}


@pytest.mark.parametrize("name", sorted(SPEC_PARAMS))
def test_big_preset_parameter_count_matches_spec(name):
    cfg = PRESETS[name]
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))  # nothing allocated
    n = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert f"{n / 1e9:#.3g}" == SPEC_PARAMS[name]
    assert n == cfg.param_count()


BENCH_JSON = Path(__file__).resolve().parents[1] / "experiments" / "configs" / "bench.json"


def test_bench_preset_matches_the_bench_config():
    m = json.loads(BENCH_JSON.read_text())["model"]
    cfg = PRESETS["bench"]
    assert (cfg.vocab_size, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim,
            cfg.ffn_hidden, cfg.sliding_window, cfg.rope_theta, cfg.norm_eps, cfg.tie_embeddings) == (
        m["vocab_size"], m["d_model"], m["n_layers"], m["n_heads"], m["n_kv_heads"],
        m["head_dim"], m["ffn_hidden"], m["sliding_window"], m["rope_theta"], m["norm_eps"],
        m["tie_embeddings"])


def test_bench_config_is_a_copy_of_the_shared_one():
    shared = Path(__file__).resolve().parents[2] / "shared" / "bench" / "config.json"
    if not shared.is_file():
        pytest.skip(f"{shared} not present (the shared folder sits beside the checkout in CI)")
    assert json.loads(shared.read_text()) == json.loads(BENCH_JSON.read_text())
