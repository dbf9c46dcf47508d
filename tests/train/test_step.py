"""The pure train step: accumulation equivalence, non-finite guard, overfitting, sharding."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm.config import get_preset
from jaxlm.model import Transformer
from jaxlm.sharding import MeshConfig, init_sharded, logical_to_spec, make_mesh
from jaxlm.train.losses import token_losses
from jaxlm.train.optim import OptimConfig, make_optimizer
from jaxlm.train.step import init_state, make_train_step


def setup(seed=0, lr=3e-3, warmup=5):
    model = Transformer(get_preset("test"), rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(model)
    tx = make_optimizer(OptimConfig(total_steps=200, peak_lr=lr, warmup_steps=warmup), params)
    return graphdef, tx, init_state(nnx.to_pure_dict(params), tx)


def make_batch(rows=8, t=16, seed=0):
    rng = np.random.default_rng(seed)
    toks = rng.integers(0, 256, (rows, t + 1))
    return {"inputs": jnp.asarray(toks[:, :-1], jnp.int32), "targets": jnp.asarray(toks[:, 1:], jnp.int32),
            "positions": jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (rows, t)),
            "segment_ids": jnp.ones((rows, t), jnp.int32),
            "loss_mask": jnp.asarray(rng.integers(0, 2, (rows, t)), jnp.float32)}


def test_token_losses_match_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
    targets = rng.integers(0, 7, (2, 5))
    mask = rng.integers(0, 2, (2, 5)).astype(np.float32)
    out = token_losses(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask), z_loss=1e-3)
    lse = np.log(np.exp(logits).sum(-1))
    ce = lse - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    assert float(out["ce_sum"]) == pytest.approx((ce * mask).sum(), rel=1e-5)
    assert float(out["z_sum"]) == pytest.approx((1e-3 * lse ** 2 * mask).sum(), rel=1e-5)
    assert float(out["tokens"]) == mask.sum()


def test_token_loss_gradient_matches_numpy():
    """The hand-written cross-entropy VJP: d/dlogits of ce_sum + z_sum is
    mask · (softmax · (1 + 2·z·lse) - onehot), from the formula in NumPy."""
    rng = np.random.default_rng(1)
    logits = (3 * rng.normal(size=(2, 5, 7))).astype(np.float32)
    targets = rng.integers(0, 7, (2, 5))
    mask = rng.integers(0, 2, (2, 5)).astype(np.float32)
    z = 1e-2
    grad = jax.grad(lambda lg: (lambda o: o["ce_sum"] + o["z_sum"])(
        token_losses(lg, jnp.asarray(targets), jnp.asarray(mask), z_loss=z)))(jnp.asarray(logits))
    lse = np.log(np.exp(logits).sum(-1, keepdims=True))
    softmax = np.exp(logits - lse)
    onehot = np.eye(7)[targets]
    expected = mask[..., None] * (softmax * (1 + 2 * z * lse) - onehot)
    np.testing.assert_allclose(np.asarray(grad), expected, atol=1e-6)
    # bf16 logits get a bf16 gradient (a custom VJP must return the primal's dtype).
    half = jax.grad(lambda lg: token_losses(lg, jnp.asarray(targets), jnp.asarray(mask))["ce_sum"])(
        jnp.asarray(logits, jnp.bfloat16))
    assert half.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(half, np.float32), expected - 2 * z * lse * softmax * mask[..., None],
                               atol=2e-2)


def test_accumulation_equals_one_big_batch():
    graphdef, tx, state = setup(warmup=0)  # with warmup, lr(0) = 0: no update to compare
    batch = make_batch(rows=8)
    one = jax.jit(make_train_step(graphdef, tx, accum_steps=1))
    four = jax.jit(make_train_step(graphdef, tx, accum_steps=4))
    s1, m1 = one(state, batch)
    s4, m4 = four(state, batch)
    assert float(m1["loss"]) == pytest.approx(float(m4["loss"]), rel=1e-6)
    assert float(m1["grad_norm"]) == pytest.approx(float(m4["grad_norm"]), rel=1e-5)
    # f32 sums in a different order: parameters agree to rounding.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), s1.params, s4.params)
    moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), s1.params, state.params)
    assert min(jax.tree.leaves(moved)) > 1e-4  # every parameter took a real step


def test_non_finite_step_is_skipped_and_counted():
    graphdef, tx, state = setup()
    step = jax.jit(make_train_step(graphdef, tx))
    batch = make_batch()
    poisoned = dict(batch, loss_mask=batch["loss_mask"].at[0, 0].set(jnp.nan))
    after, m = step(state, poisoned)
    assert not bool(m["finite"])
    assert int(after.bad_in_a_row) == 1 and int(after.bad_total) == 1 and int(after.step) == 1
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), after.params, state.params)
    again, m = step(after, batch)  # a good step applies and resets the streak
    assert bool(m["finite"]) and int(again.bad_in_a_row) == 0 and int(again.bad_total) == 1
    # The schedule reads optax's count, which the skipped step did not advance: the logged
    # learning rate follows it (metrics["optimizer_step"]), not the step number.
    counts = lambda s: {int(leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(
        s.opt_state)[0] if "count" in jax.tree_util.keystr(path)}
    assert counts(after) == {0} and int(m["optimizer_step"]) == 0
    _, m = step(again, batch)
    assert counts(again) == {1} and int(m["optimizer_step"]) == 1


def test_overfits_a_single_batch():
    graphdef, tx, state = setup(lr=3e-3)
    step = jax.jit(make_train_step(graphdef, tx))
    batch = make_batch(rows=4, t=16, seed=3)
    first = None
    for _ in range(120):
        state, m = step(state, batch)
        first = first if first is not None else float(m["loss"])
    assert first > 5.0 and float(m["loss"]) < 0.05


def test_sharded_steps_equal_single_device():
    # data, fsdp and tensor parallelism at once (the model tests cover each mesh on its own).
    mesh_cfg = MeshConfig(data=2, fsdp=2, tensor=2)
    graphdef, tx, state = setup()
    batches = [make_batch(seed=s) for s in range(3)]
    step = jax.jit(make_train_step(graphdef, tx, accum_steps=2))
    ref, ref_losses = state, []
    for b in batches:
        ref, m = step(ref, b)
        ref_losses.append(float(m["loss"]))

    mesh = make_mesh(mesh_cfg)
    model = init_sharded(lambda: Transformer(get_preset("test"), rngs=nnx.Rngs(0)), mesh)
    with jax.set_mesh(mesh):
        sharded = jax.jit(lambda p: init_state(p, tx))(nnx.to_pure_dict(nnx.state(model)))
        shard = jax.tree.map(lambda a: a.sharding, sharded)
        spec = logical_to_spec(("activation_batch", "activation_length"), (8, 16), dict(mesh.shape))
        bsh = jax.sharding.NamedSharding(mesh, spec)
        sstep = jax.jit(make_train_step(graphdef, tx, accum_steps=2), in_shardings=(shard, bsh),
                        out_shardings=(shard, None), donate_argnums=0)
        losses = []
        for b in batches:
            sharded, m = sstep(sharded, jax.device_put(b, bsh))
            losses.append(float(m["loss"]))
    np.testing.assert_allclose(losses, ref_losses, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), sharded.params, ref.params)


def test_router_jitter_is_applied_in_training_and_deterministic():
    """MoE router jitter reaches the model in the train step (it was silently off): jitter > 0
    changes the loss, and the same seed and step give the same numbers (exact resume)."""
    base = get_preset("test_moe")
    batch = make_batch(rows=4, t=16)

    def stepper(jitter):
        # capacity dispatch: the quicker compile on CPU; the jitter is in the router either way.
        cfg = base.replace(moe={**base.moe.to_dict(), "router_jitter": jitter,
                                "dispatch": "capacity"})
        graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
        tx = make_optimizer(OptimConfig(total_steps=10, peak_lr=1e-2, warmup_steps=0), params)
        state = init_state(nnx.to_pure_dict(params), tx)
        return jax.jit(make_train_step(graphdef, tx, accum_steps=2, seed=0)), state

    plain_step, state = stepper(0.0)
    jitter_step, _ = stepper(0.5)
    plain = float(plain_step(state, batch)[1]["loss"])
    first = float(jitter_step(state, batch)[1]["loss"])
    assert plain != first  # the router saw U(0.5, 1.5)-scaled inputs
    assert float(jitter_step(state, batch)[1]["loss"]) == first  # same seed and step: the same
    later = float(jitter_step(state._replace(step=state.step + 1), batch)[1]["loss"])
    assert later != first  # the key follows state.step
