"""HF transformers Mixtral -> jaxlm: logits and load-balancing loss parity, the invertible name map
with expert indices (also for every-other-layer MoE stacks), the CLI, and config mapping."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from jaxlm.checkpoint import load_model
from jaxlm.config import Dispatch, get_preset
from jaxlm.convert import hf
from jaxlm.convert.__main__ import main as convert_main
from jaxlm.convert.names import rules_for
from jaxlm.model import Transformer

E, K = 4, 2  # tests/conftest.py TINY_MIXTRAL


def _tokens(shape=(2, 24), seed=0):
    return np.random.default_rng(seed).integers(0, 128, shape)


@pytest.fixture(scope="module")
def mixtral(make_hf_model):
    """The tiny HF Mixtral, its directory, and its reference output on fixed tokens."""
    ref_model, path = make_hf_model("mixtral")
    tokens = _tokens()
    with torch.no_grad():
        out = ref_model(torch.tensor(tokens), output_router_logits=True)
    return path, tokens, out


@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_logits_and_load_balance_match_transformers(mixtral, dispatch):
    path, tokens, out = mixtral
    # Capacity at the eval factor 2.0 gives C = ceil(2·24/4·2) = 24 = T: nothing can drop.
    model = hf.load(path, moe={**hf.moe_from_hf(hf.read_hf_config(path)), "dispatch": dispatch})
    assert model.cfg.moe.dispatch is Dispatch(dispatch)
    logits, aux = model.with_aux(jnp.asarray(tokens), train=False)
    np.testing.assert_allclose(np.asarray(logits), out.logits.numpy(), atol=1e-4)
    # HF's loss counts all k choices: per layer it is k x ours (SPEC §10); HF's own function on
    # each layer's router logits, averaged over layers like jaxlm's aux.
    per_layer = [float(load_balancing_loss_func((r,), E, K)) for r in out.router_logits]
    assert float(aux["load_balance"]) == pytest.approx(np.mean(per_layer) / K, rel=1e-5)
    assert float(aux["dropped_fraction"]) == 0.0


def test_name_map_is_invertible_on_mixtral_files(mixtral):
    path, _, _ = mixtral
    model = hf.load(path)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    with safe_open(path / "model.safetensors", "np") as f:
        files = {name: f.get_tensor(name) for name in f.keys()}
    seen = set()
    for rule in rules_for(model.cfg):
        ours = params
        for key in rule.ours:
            ours = ours[key]
        for name, index in rule.entries():
            np.testing.assert_array_equal(np.asarray(rule.layout.to_hf(ours[index])), files[name])
            seen.add(name)
    assert seen == set(files)  # every tensor on disk is one rule entry, and nothing else
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in seen


def test_every_other_layer_moe_round_trips_through_hf_names(tmp_path):
    """Export a GShard-style model (MoE in layers 1, 3) through the rules, import it back."""
    cfg = get_preset("test_moe").replace(n_layers=4)
    cfg = cfg.replace(moe={**cfg.moe.to_dict(), "every": 2})
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: rng.normal(size=a.shape).astype(np.float32),
                          nnx.to_pure_dict(state))
    files = {}
    for rule in rules_for(cfg):
        ours = params
        for key in rule.ours:
            ours = ours[key]
        files.update({name: np.asarray(rule.layout.to_hf(ours[index]))
                      for name, index in rule.entries()})
    assert "model.layers.1.block_sparse_moe.experts.7.w1.weight" in files
    assert "model.layers.2.mlp.up_proj.weight" in files
    assert "model.layers.2.block_sparse_moe.gate.weight" not in files
    np.testing.assert_array_equal(files["model.layers.3.self_attn.q_proj.weight"],
                                  np.asarray(params["layers"]["attn"]["q"][1]).reshape(64, -1).T)
    save_file(files, str(tmp_path / "model.safetensors"))
    back = hf.load_params(tmp_path, cfg, state)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, back), params)


def test_cli_imports_mixtral(mixtral, tmp_path, capsys):
    path, tokens, out = mixtral
    dst = tmp_path / "ckpt"
    assert convert_main(["import-hf", "--src", str(path), "--dst", str(dst)]) == 0
    assert "imported" in capsys.readouterr().out
    saved = json.loads((dst / "config.json").read_text())["model"]["moe"]
    assert saved["n_experts"] == E and saved["dispatch"] == "dropless"
    model = load_model(dst)
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(tokens))), out.logits.numpy(), atol=1e-4)


def test_config_fields_from_hf(mixtral):
    path, _, _ = mixtral
    raw = hf.read_hf_config(path)
    cfg = hf.config_from_hf({**raw, "router_aux_loss_coef": 0.02, "router_jitter_noise": 0.1,
                             "sliding_window": 16, "num_local_experts": 8})
    assert (cfg.moe.n_experts, cfg.moe.top_k, cfg.moe.every) == (8, 2, 1)
    assert cfg.moe.load_balance_coef == pytest.approx(0.04)  # k x HF's coefficient
    assert cfg.moe.router_jitter == 0.1 and cfg.sliding_window == 16
    with pytest.raises(ValueError, match=r"config.json: MoEConfig.top_k \(5\) must be <= n_experts"):
        hf.config_from_hf({**raw, "num_experts_per_tok": 5})
    assert hf.config_from_hf({**raw, "architectures": ["MistralForCausalLM"]}).moe is None
