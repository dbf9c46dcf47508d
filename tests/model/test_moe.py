"""MoE layer: router gates, aux losses vs the papers' formulas, capacity drops vs a NumPy routing
reference, capacity == dropless when nothing is dropped, jitter, and the MoE Transformer (with_aux
gradients, every-other-layer stacks, cached generation)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm.config import Gate, get_preset
from jaxlm.inference.generate import generate
from jaxlm.model import Transformer
from jaxlm.model.moe import MoE, MoEMode, load_balance_loss, route, router_z_loss
from jaxlm.model.moe_dispatch import (ExpertWeights, capacity_dispatch, capacity_slots,
                                      dropless_dispatch, expert_capacity)

B, T, D, F, E = 2, 16, 32, 24, 4


def numpy_init(make, seed=0, std=0.02):
    """Build an nnx module with NumPy random weights: jax.random init compiles slowly on CPU."""
    graphdef, state = nnx.split(nnx.eval_shape(make))
    rng = np.random.default_rng(seed)

    def draw(path, a):  # norm scales around 1, everything else N(0, std)
        value = rng.normal(size=a.shape) * std + (path[-1].key == "scale")
        return value.astype(a.dtype)

    pure = jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


def _softmax(a):
    a = np.exp(a - a.max(-1, keepdims=True))
    return a / a.sum(-1, keepdims=True)


@pytest.fixture(scope="module")
def layer():
    """Random layer inputs: x, weights, router logits, and a padding mask (last 3 of row 1)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(B, T, D)).astype(np.float32)
    w = ExpertWeights(*(rng.normal(size=s).astype(np.float32) / np.sqrt(s[1])
                        for s in [(E, D, F), (E, D, F), (E, F, D)]))
    logits = (2 * rng.normal(size=(B, T, E))).astype(np.float32)
    valid = np.ones((B, T), bool)
    valid[1, -3:] = False
    return x, w, logits, valid


def np_moe(x, w, experts, gates, kept):
    """Direct loop: y[t] = Σ over kept choices of gate · SwiGLU_e(x[t])."""
    y = np.zeros_like(x)
    silu = lambda a: a / (1 + np.exp(-a))
    for b, t, r in zip(*np.nonzero(kept)):
        e = experts[b, t, r]
        h = silu(x[b, t] @ w.gate[e]) * (x[b, t] @ w.up[e])
        y[b, t] += gates[b, t, r] * (h @ w.down[e])
    return y


def np_capacity_keep(experts, valid, n_experts, capacity):
    """GShard §2.2 priority: all 1st choices in position order, then all 2nd choices; an
    assignment is kept iff fewer than C earlier-priority assignments went to its expert."""
    kept = np.zeros(experts.shape, bool)
    for b in range(experts.shape[0]):
        queued = np.zeros(n_experts, int)
        for r in range(experts.shape[2]):
            for t in range(experts.shape[1]):
                if valid[b, t]:
                    e = experts[b, t, r]
                    kept[b, t, r] = queued[e] < capacity
                    queued[e] += 1
    return kept


@pytest.mark.parametrize("gate", list(Gate))
def test_gates(layer, gate):
    *_, logits, _ = layer
    experts, gates = route(jnp.asarray(logits), 2, gate)
    probs = _softmax(logits)
    top = np.argsort(-logits, axis=-1)[..., :2]
    np.testing.assert_array_equal(np.asarray(experts), top)
    chosen = np.take_along_axis(probs, top, -1)
    want = chosen / chosen.sum(-1, keepdims=True) if gate is Gate.TOPK_SOFTMAX else chosen
    np.testing.assert_allclose(np.asarray(gates), want, rtol=1e-5)


@pytest.mark.parametrize("k", [1, 2])
def test_aux_losses_match_the_paper_formulas(layer, k):
    *_, logits, valid = layer
    experts, _ = route(jnp.asarray(logits), k, Gate.TOPK_SOFTMAX)
    probs = _softmax(logits)
    balance, load = load_balance_loss(jnp.asarray(probs), experts, jnp.asarray(valid))
    # Switch §2.2 eq. 4-6 over the valid tokens; each of the k choices counts 1/k (k=1: Switch).
    toks = np.asarray(experts)[valid]                                     # [n, k]
    f = np.array([(toks == i).sum() for i in range(E)]) / toks.size
    p = probs[valid].mean(0)
    np.testing.assert_allclose(np.asarray(load), f, rtol=1e-6)
    np.testing.assert_allclose(float(balance), E * np.sum(f * p), rtol=1e-5)
    # ST-MoE §3.1 eq. 5: mean of logsumexp(x)^2.
    lse = np.log(np.exp(logits[valid].astype(np.float64)).sum(-1))
    np.testing.assert_allclose(float(router_z_loss(jnp.asarray(logits), jnp.asarray(valid))),
                               np.mean(lse ** 2), rtol=1e-5)
    # Perfect balance (uniform probabilities, one token per expert) gives exactly 1.
    balanced, _ = load_balance_loss(jnp.full((1, E, E), 1 / E), jnp.arange(E)[None, :, None],
                                    jnp.ones((1, E), bool))
    assert float(balanced) == pytest.approx(1.0)


def test_tight_capacity_drops_exactly_the_assignments_over_capacity(layer):
    x, w, logits, valid = layer
    experts, gates = route(jnp.asarray(logits), 2, Gate.TOPK_SOFTMAX)
    gates = gates * valid[..., None]
    capacity = expert_capacity(T, 2, E, 0.5)                               # ceil(2·16/4·0.5) = 4
    assert capacity == 4
    _, kept = capacity_slots(experts, jnp.asarray(valid), E, capacity)
    want = np_capacity_keep(np.asarray(experts), valid, E, capacity)
    np.testing.assert_array_equal(np.asarray(kept), want)
    assert 0 < want.sum() < valid.sum() * 2                                 # some, not all, dropped
    y, kept2 = jax.jit(capacity_dispatch, static_argnames=("capacity_factor", "group_size"))(
        x, experts, gates, jnp.asarray(valid), w, capacity_factor=0.5, group_size=None)
    np.testing.assert_array_equal(np.asarray(kept2), want)
    np.testing.assert_allclose(np.asarray(y), np_moe(x, w, np.asarray(experts),
                                                     np.asarray(gates), want), atol=1e-5)


def test_generous_capacity_equals_dropless_equals_reference(layer):
    x, w, logits, valid = layer
    experts, gates = route(jnp.asarray(logits), 2, Gate.TOPK_SOFTMAX)
    gates = gates * valid[..., None]
    want = np_moe(x, w, np.asarray(experts), np.asarray(gates), np.asarray(valid)[..., None]
                  .repeat(2, -1))
    y_drop, kept = jax.jit(dropless_dispatch)(x, experts, gates, jnp.asarray(valid), w)
    y_cap, kept_cap = jax.jit(capacity_dispatch, static_argnames=("capacity_factor", "group_size"))(
        x, experts, gates, jnp.asarray(valid), w, capacity_factor=E / 2, group_size=None)
    np.testing.assert_allclose(np.asarray(y_drop), want, atol=1e-5)
    np.testing.assert_allclose(np.asarray(y_cap), want, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(kept), np.asarray(kept_cap))


def test_routing_groups_split_sequences(layer):
    x, w, logits, valid = layer
    experts, gates = route(jnp.asarray(logits), 2, Gate.TOPK_SOFTMAX)
    y, _ = capacity_dispatch(x, experts, gates, jnp.asarray(valid), w, capacity_factor=0.5,
                             group_size=T // 2)
    halves = [a.reshape(2 * B, T // 2, *a.shape[2:]) for a in (x, experts, gates, valid)]
    y2, _ = capacity_dispatch(*halves[:3], jnp.asarray(halves[3]), w, capacity_factor=0.5,
                              group_size=None)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y2).reshape(B, T, D), atol=1e-6)
    with pytest.raises(ValueError, match=r"not a multiple of MoEConfig.group_size \(5\)"):
        capacity_dispatch(x, experts, gates, jnp.asarray(valid), w, capacity_factor=1.0,
                          group_size=5)


def test_router_jitter_only_in_training_with_a_key():
    cfg = get_preset("test_moe")
    jittery = cfg.replace(moe={**cfg.moe.to_dict(), "router_jitter": 0.1})
    moe = numpy_init(lambda: MoE(jittery, rngs=nnx.Rngs(0)))
    x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 4, cfg.d_model)), jnp.float32)
    clean = moe.router_logits(x)
    a, b = moe.router_logits(x, jax.random.key(0)), moe.router_logits(x, jax.random.key(1))
    assert not np.allclose(a, clean) and not np.allclose(a, b)
    np.testing.assert_array_equal(moe.router_logits(x, jax.random.key(0)), a)  # deterministic
    valid = jnp.ones((1, 4), bool)
    y_eval, _ = moe(x, valid, MoEMode(train=False), jax.random.key(0))        # eval ignores the key
    y_clean, _ = moe(x, valid, MoEMode(train=True), None)                     # no key: no jitter
    np.testing.assert_allclose(y_eval, y_clean, atol=1e-7)
    off = numpy_init(lambda: MoE(cfg, rngs=nnx.Rngs(0)))                       # router_jitter = 0
    np.testing.assert_array_equal(off.router_logits(x, jax.random.key(0)), off.router_logits(x))


# The Transformer with MoE layers -------------------------------------------------------------
def _moe_cfg(**moe):
    cfg = get_preset("test_moe")
    return cfg.replace(moe={**cfg.moe.to_dict(), **moe})


def test_with_aux_gradients_agree_across_dispatch_paths():
    """jit(grad) through with_aux for both paths; with C = T nothing drops, so they agree."""
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 256, (2, 16)))
    targets = jnp.roll(tokens, -1, axis=1)

    def run(cfg):
        graphdef, state = nnx.split(numpy_init(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))

        def loss(state):
            logits, aux = nnx.merge(graphdef, state).with_aux(tokens)
            logp = jax.nn.log_softmax(logits)
            ce = -jnp.mean(jnp.take_along_axis(logp, targets[..., None], -1))
            return ce + aux["aux_loss"], aux

        (value, aux), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(state)
        return float(value), aux, nnx.to_pure_dict(grads)

    v1, aux1, g1 = run(_moe_cfg(dispatch="dropless"))
    # Capacity with factor E/k gives C = T; remat changes nothing either.
    v2, aux2, g2 = run(_moe_cfg(dispatch="capacity", capacity_factor=4.0).replace(remat="full"))
    assert set(aux1) == {"aux_loss", "load_balance", "router_z", "dropped_fraction", "expert_load"}
    assert aux1["expert_load"].shape == (8,) and float(aux1["dropped_fraction"]) == 0.0
    assert v1 == pytest.approx(v2, abs=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), g1, g2)
    assert np.abs(g1["layers"]["moe"]["router"]).max() > 0                 # router learns
    assert float(aux1["aux_loss"]) == pytest.approx(
        0.01 * float(aux1["load_balance"]) + 0.001 * float(aux1["router_z"]), rel=1e-5)


def test_every_other_layer_stacks_and_counts():
    cfg = _moe_cfg(every=2).replace(n_layers=4)
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    shapes = jax.tree.map(lambda a: a.shape, nnx.to_pure_dict(nnx.state(model)))
    assert shapes["layers"]["moe"]["gate"] == (2, 8, 64, 64)              # layers 1, 3
    assert shapes["dense_layers"]["mlp"]["gate"] == (2, 64, 64)           # layers 0, 2
    assert "mlp" not in shapes["layers"] and "moe" not in shapes["dense_layers"]
    n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert n == cfg.param_count() > cfg.active_param_count()


def test_moe_layers_are_scanned_not_unrolled():
    def n_ops(layers):
        cfg = _moe_cfg(every=2).replace(n_layers=layers)
        graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
        f = jax.jit(lambda s, t: nnx.merge(graphdef, s).with_aux(t))
        return f.lower(state, jnp.zeros((1, 8), jnp.int32)).as_text().count("dot_general")

    assert n_ops(2) == n_ops(6)


def test_greedy_generation_equals_full_recompute():
    """KV-cache decode (dropless) vs one full forward (capacity, eval factor E/k: no drops) of
    prompt + generated tokens, on a model with MoE every other layer."""
    cfg = _moe_cfg(every=2, dispatch="capacity", eval_capacity_factor=4.0).replace(n_layers=4)
    model = numpy_init(lambda: Transformer(cfg, rngs=nnx.Rngs(0)), seed=3, std=0.1)
    prompts = [[5, 17, 99, 3, 42], [7, 8]]
    out = generate(model, prompts, max_new_tokens=6, return_logits=True)
    for row, prompt in enumerate(prompts):
        full = np.array(prompt + out.tokens[row])[None]
        logits = np.asarray(model(jnp.asarray(full)))[0, len(prompt) - 1:-1]
        np.testing.assert_array_equal(logits.argmax(-1), out.tokens[row])
        np.testing.assert_allclose(out.logits[row], logits, atol=1e-4)
