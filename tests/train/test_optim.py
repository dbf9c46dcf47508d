"""Optimizer recipes: schedule values against the formula, the weight-decay mask."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxlm.config import get_preset
from jaxlm.model import Transformer
from jaxlm.train.optim import (OptimConfig, decay_mask, learning_rate, llama2_ppo, llama2_pretrain,
                               llama2_reward_model, llama2_sft, make_optimizer)


def formula(step, peak, warmup, total, final=0.1):
    """Llama 2 §2.2: linear warmup to peak, cosine decay to final·peak at `total`."""
    if step < warmup:
        return peak * step / warmup
    progress = (step - warmup) / (total - warmup)
    return final * peak + (peak - final * peak) * 0.5 * (1 + math.cos(math.pi * progress))


def test_llama2_schedule_matches_formula():
    cfg = llama2_pretrain(total_steps=10_000)
    lr = learning_rate(cfg)
    for step in (0, 1000, 2000, 6000, 10_000):  # start, mid-warmup, end, mid-decay, last
        assert float(lr(step)) == pytest.approx(formula(step, 3e-4, 2000, 10_000), rel=1e-5, abs=1e-12)
    assert float(lr(10_000)) == pytest.approx(3e-5)  # 10% of peak


def test_other_recipes():
    rm = llama2_reward_model(total_steps=1000)
    assert rm.warmup == 30 and rm.peak_lr == 1e-5          # 3% of steps
    assert llama2_reward_model(total_steps=100).warmup == 5  # ... with a minimum of 5
    ppo = learning_rate(llama2_ppo(total_steps=50))
    assert float(ppo(0)) == pytest.approx(1e-6) and float(ppo(49)) == pytest.approx(1e-6)
    sft = learning_rate(llama2_sft(total_steps=100))
    assert float(sft(0)) == pytest.approx(2e-5) and float(sft(100)) == pytest.approx(2e-6)


@pytest.mark.parametrize("kwargs,msg", [
    (dict(total_steps=0, warmup_steps=0), "total_steps"),
    (dict(total_steps=10, warmup_steps=0, peak_lr=0), "peak_lr"),
    (dict(total_steps=10, warmup_steps=20), "warmup"),
    (dict(total_steps=10, warmup_steps=0, clip_norm=0), "clip_norm"),
    (dict(total_steps=10, warmup_steps=0, final_lr_fraction=2), "final_lr_fraction"),
    (dict(total_steps=10, warmup_steps=10), r"warmup_steps: warmup \(10 steps\) must be shorter"),
    (dict(total_steps=10, warmup_steps=-1), "warmup_steps must be >= 0"),
    # the field the warmup came from is the one named
    (dict(total_steps=4, warmup_fraction=0.9), r"warmup_fraction: warmup \(4 steps\)"),
    (dict(total_steps=4, warmup_fraction=0.03, min_warmup_steps=5), r"min_warmup_steps: warmup \(5"),
    (dict(total_steps=10, warmup_steps=0, b1=1.0), r"b1 must be in \[0, 1\)"),
    (dict(total_steps=10, warmup_steps=0, b2=-0.1), r"b2 must be in \[0, 1\)"),
    (dict(total_steps=10, warmup_steps=0, eps=0.0), "eps must be > 0"),
    (dict(total_steps=10, warmup_steps=0, weight_decay=-0.1), "weight_decay must be >= 0"),
])
def test_invalid_optim_config(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        OptimConfig(**kwargs)


def test_warmup_as_long_as_a_constant_schedule_is_allowed():
    lr = learning_rate(OptimConfig(total_steps=10, warmup_steps=10, schedule="constant"))
    assert float(lr(10)) == pytest.approx(3e-4)


def test_weight_decay_skips_only_norm_scales():
    model = Transformer(get_preset("test"), rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    mask = nnx.to_pure_dict(decay_mask(params))
    assert mask["final_norm"]["scale"] is False
    assert mask["layers"]["attn_norm"]["scale"] is False and mask["layers"]["mlp_norm"]["scale"] is False
    assert mask["embed"]["embedding"] and mask["lm_head"] and mask["layers"]["attn"]["q"]
    assert mask["layers"]["mlp"]["down"]
    # With zero gradients, AdamW moves exactly the decayed parameters, by lr·wd·w.
    pure = nnx.to_pure_dict(params)
    cfg = OptimConfig(total_steps=10, peak_lr=1.0, warmup_steps=0, schedule="constant")
    tx = make_optimizer(cfg, params)
    grads = jax.tree.map(jnp.zeros_like, pure)
    updates, _ = jax.jit(tx.update)(grads, tx.init(pure), pure)
    np.testing.assert_allclose(updates["lm_head"], -0.1 * pure["lm_head"], rtol=1e-6)
    assert float(jnp.abs(updates["final_norm"]["scale"]).max()) == 0.0
    assert optax.tree.norm(updates["layers"]["mlp_norm"]) == 0.0
