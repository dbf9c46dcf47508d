"""Expert parallelism on 8 emulated devices: sharded MoE == single device (outputs, aux, grads),
for both dispatch paths, and expert weights carry the table's shardings."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxlm.config import get_preset
from jaxlm.model import Transformer
from jaxlm.model.moe import MoE, MoEMode
from jaxlm.sharding import MeshConfig, logical_to_spec, make_mesh, shard_model

MESHES = {
    "expert8": MeshConfig(expert=8, fsdp=1),
    "expert4_data2": MeshConfig(expert=4, data=2, fsdp=1),
    "expert2_tensor2_data2": MeshConfig(expert=2, tensor=2, data=2, fsdp=1),
    "expert2_tensor2_fsdp2": MeshConfig(expert=2, tensor=2, fsdp=2),
    "fsdp2_tensor4": MeshConfig(fsdp=2, tensor=4),  # no expert axis: every device has all experts
}

# test_moe: D = 64, F = 64, E = 8. Written out by hand from jaxlm.sharding.RULES
# (expert -> expert, mlp -> tensor, embed -> fsdp then expert). Expert weights take `expert` on
# their E dimension, so their D goes over fsdp only; the router [D, E] (like every non-expert
# weight) splits D over fsdp and expert.
EXPECTED = {
    "expert8": {"gate": P("expert", None, None), "up": P("expert", None, None),
                "down": P("expert", None, None), "router": P("expert", None)},
    "expert4_data2": {"gate": P("expert", None, None), "up": P("expert", None, None),
                      "down": P("expert", None, None), "router": P("expert", None)},
    "expert2_tensor2_data2": {"gate": P("expert", None, "tensor"), "up": P("expert", None, "tensor"),
                              "down": P("expert", "tensor", None), "router": P("expert", None)},
    "expert2_tensor2_fsdp2": {"gate": P("expert", "fsdp", "tensor"),
                              "up": P("expert", "fsdp", "tensor"),
                              "down": P("expert", "tensor", "fsdp"),
                              "router": P(("fsdp", "expert"), None)},
    "fsdp2_tensor4": {"gate": P(None, "fsdp", "tensor"), "up": P(None, "fsdp", "tensor"),
                      "down": P(None, "tensor", "fsdp"), "router": P("fsdp", None)},
}


def numpy_init(make, seed=0, std=0.1):
    """NumPy random weights (jax.random init compiles slowly on CPU); norm scales around 1."""
    graphdef, state = nnx.split(nnx.eval_shape(make))
    rng = np.random.default_rng(seed)

    def draw(path, a):
        return (rng.normal(size=a.shape) * std + (path[-1].key == "scale")).astype(a.dtype)

    nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(state)))
    return nnx.merge(graphdef, state)


def _cfg(dispatch):
    cfg = get_preset("test_moe")
    return cfg.replace(moe={**cfg.moe.to_dict(), "dispatch": dispatch})


def _layers():
    """The same weights as a dropless and a capacity layer (train factor 1.25: tokens drop)."""
    return [numpy_init(lambda: MoE(_cfg(d), rngs=nnx.Rngs(0))) for d in ("dropless", "capacity")]


def _run_layers(layers, x, mesh=None):
    """Outputs, aux and gradients (weights and input) of both layers, in one jit."""
    graphdefs, states = zip(*(nnx.split(m) for m in layers))
    r = jnp.asarray(np.random.default_rng(1).normal(size=x.shape), jnp.float32)
    valid = jnp.ones(x.shape[:2], bool)

    def loss(states, x):
        outs = [nnx.merge(g, s)(x, valid, MoEMode(train=True)) for g, s in zip(graphdefs, states)]
        total = sum(jnp.sum(y * r) + aux["aux_loss"] for y, aux in outs)
        return total, outs

    f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    if mesh is None:
        (_, outs), grads = f(states, x)
    else:
        with jax.set_mesh(mesh):
            spec = logical_to_spec(("activation_batch", None, None), x.shape, dict(mesh.shape))
            (_, outs), grads = f(states, jax.device_put(x, NamedSharding(mesh, spec)))
    grads = (tuple(nnx.to_pure_dict(g) for g in grads[0]), grads[1])
    return jax.tree.map(np.asarray, (outs, grads))


def _assert_close(got, want):
    # f32; different reduction orders across shards.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), got, want)


@pytest.fixture(scope="module")
def reference():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 16, 64)), jnp.float32)
    return x, _run_layers(_layers(), x)


@pytest.mark.parametrize("mesh_name", sorted(MESHES))
def test_expert_parallel_layer_equals_single_device(reference, mesh_name):
    x, want = reference
    mesh = make_mesh(MESHES[mesh_name])
    layers = [shard_model(m, mesh) for m in _layers()]
    for layer in layers:
        for name, spec in EXPECTED[mesh_name].items():
            assert getattr(layer, name)[...].sharding.spec == spec, name
    got = _run_layers(layers, x, mesh)
    _assert_close(got, want)
    (_, aux_drop), (_, aux_cap) = got[0]
    assert aux_drop["dropped_fraction"] == 0 and 0 < aux_cap["dropped_fraction"] < 0.5


def test_tokens_replicated_over_the_expert_axis():
    """Batch 2 cannot be split over expert=8 (e.g. decode): each device runs its experts on all
    tokens and the shares are summed."""
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 16, 64)), jnp.float32)
    want = _run_layers(_layers(), x)
    mesh = make_mesh(MESHES["expert8"])
    _assert_close(_run_layers([shard_model(m, mesh) for m in _layers()], x, mesh), want)


def test_experts_must_divide_the_expert_axis():
    cfg = get_preset("test_moe")
    cfg = cfg.replace(moe={**cfg.moe.to_dict(), "n_experts": 6})
    mesh = make_mesh(MeshConfig(expert=4, data=2, fsdp=1))
    layer = shard_model(numpy_init(lambda: MoE(cfg, rngs=nnx.Rngs(0))), mesh)
    x = jnp.zeros((8, 4, 64))
    with jax.set_mesh(mesh), pytest.raises(ValueError, match=r"MoEConfig.n_experts \(6\) must be "
                                                              r"divisible by the mesh's expert axis \(4\)"):
        layer(x, jnp.ones((8, 4), bool))


# The whole model: with_aux logits, aux and gradients (slow: one compile per mesh and path).
def _run_model(model, tokens, mesh=None):
    graphdef, state = nnx.split(model)
    targets = jnp.roll(tokens, -1, axis=1)

    def loss(state):
        logits, aux = nnx.merge(graphdef, state).with_aux(tokens)
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], -1)) + aux["aux_loss"], \
            (logits, aux)

    f = jax.jit(jax.value_and_grad(loss, has_aux=True))
    if mesh is None:
        (_, out), grads = f(state)
    else:
        with jax.set_mesh(mesh):
            (_, out), grads = f(state)
    return jax.tree.map(np.asarray, (out, nnx.to_pure_dict(grads)))


@pytest.mark.slow
@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_sharded_model_equals_single_device(dispatch):
    cfg = _cfg(dispatch)
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, 256, (8, 16)), jnp.int32)
    model = numpy_init(lambda: Transformer(cfg, rngs=nnx.Rngs(0)), std=0.05)
    want = _run_model(model, tokens)
    for name in ("expert8", "expert4_data2", "expert2_tensor2_data2"):
        mesh = make_mesh(MESHES[name])
        sharded = shard_model(model, mesh)
        for param, spec in EXPECTED[name].items():
            assert getattr(sharded.layers.moe, param)[...].sharding.spec == P(None, *spec)
        _assert_close(_run_model(sharded, tokens, mesh), want)
