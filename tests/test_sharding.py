"""Mesh construction, the logical-axis table, and sharded == unsharded on 8 emulated devices."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxlm.config import get_preset
from jaxlm.model import Transformer
from jaxlm.sharding import (MeshConfig, init_sharded, is_split, logical_to_spec, make_mesh,
                            state_partition_specs)


def test_eight_emulated_devices():
    assert jax.device_count() == 8


def test_mesh_fill_and_errors():
    assert MeshConfig().resolve(8) == ((1, 8, 1, 1), (1, 1, 1, 1))
    assert MeshConfig(data=2, fsdp=-1, tensor=2).resolve(8) == ((2, 2, 1, 2), (1, 1, 1, 1))
    assert MeshConfig(fsdp=4, dcn_data=-1).resolve(16, n_slices=4) == ((1, 4, 1, 1), (4, 1, 1, 1))
    with pytest.raises(ValueError, match="multiply to 6 but there are 8 devices"):
        MeshConfig(data=3, fsdp=2).resolve(8)
    with pytest.raises(ValueError, match="not divisible by the product of the fixed axes"):
        MeshConfig(tensor=3).resolve(8)
    with pytest.raises(ValueError, match="at most one ici axis may be -1"):
        MeshConfig(data=-1, fsdp=-1)
    with pytest.raises(ValueError, match="MeshConfig.tensor must be a positive integer or -1"):
        MeshConfig(tensor=0)
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "expert": 1, "tensor": 2}


def test_table_skips_axes_that_do_not_divide_or_repeat():
    shape = {"data": 2, "fsdp": 2, "expert": 1, "tensor": 4}
    assert logical_to_spec(("embed", "kv_heads"), (64, 8), shape) == P("fsdp", "tensor")
    assert logical_to_spec(("embed", "kv_heads"), (64, 2), shape) == P("fsdp", None)
    assert logical_to_spec(("activation_batch", None), (8, 3), shape) == P(("data", "fsdp"), None)
    assert logical_to_spec(("activation_batch", None), (2, 3), shape) == P("data", None)
    with pytest.raises(KeyError, match="'widgets' is not in jaxlm.sharding.RULES"):
        logical_to_spec(("widgets",), (4,), shape)


def test_expert_dimension_claims_the_expert_axis_before_embed():
    """Non-expert weights split D over fsdp x expert; an expert weight's E takes `expert` whether
    it is named before or after `embed`."""
    shape = {"data": 1, "fsdp": 2, "expert": 4, "tensor": 2}
    assert logical_to_spec(("embed", None), (64, 8), shape) == P(("fsdp", "expert"), None)
    assert logical_to_spec(("expert", "embed", "mlp"), (8, 64, 32), shape) == P("expert", "fsdp", "tensor")
    assert logical_to_spec(("embed", "expert", "mlp"), (64, 8, 32), shape) == P("fsdp", "expert", "tensor")


MESHES = {
    "data8": MeshConfig(data=8, fsdp=1),
    "data2_fsdp4": MeshConfig(data=2, fsdp=4),
    "fsdp2_tensor4": MeshConfig(fsdp=2, tensor=4),
}

# What the table must give for the "test" preset (d=64, N=8, K=4, H=8, F=128, V=256), written out
# by hand from RULES so a change to the table shows up here.
EXPECTED_SPECS = {
    "data8": {},  # everything replicated
    "data2_fsdp4": {
        ("embed", "embedding"): P(None, "fsdp"),
        ("layers", "attn", "q"): P(None, "fsdp", None, None),
        ("layers", "attn", "o"): P(None, None, None, "fsdp"),
        ("layers", "mlp", "down"): P(None, None, "fsdp"),
        ("lm_head",): P("fsdp", None),
    },
    "fsdp2_tensor4": {
        ("embed", "embedding"): P("tensor", "fsdp"),
        ("layers", "attn", "q"): P(None, "fsdp", "tensor", None),
        ("layers", "attn", "k"): P(None, "fsdp", "tensor", None),
        ("layers", "attn", "o"): P(None, "tensor", None, "fsdp"),
        ("layers", "mlp", "gate"): P(None, "fsdp", "tensor"),
        ("layers", "mlp", "down"): P(None, "tensor", "fsdp"),
        ("layers", "attn_norm", "scale"): P(None, None),
        ("lm_head",): P("fsdp", "tensor"),
    },
}


def _loss(model, tokens):
    logits = model(tokens)
    targets = jnp.roll(tokens, -1, axis=1)
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))


@jax.jit
def _loss_and_grads(graphdef, state, tokens):
    model = nnx.merge(graphdef, state)
    loss, grads = nnx.value_and_grad(_loss)(model, tokens)
    return loss, nnx.state(grads)


def _run(model, tokens):
    graphdef, state = nnx.split(model)
    logits = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(state, tokens)
    loss, grads = _loss_and_grads(graphdef, state, tokens)
    return np.asarray(logits), float(loss), jax.tree.map(np.asarray, nnx.to_pure_dict(grads))


@pytest.fixture(scope="module")
def single_device():
    cfg = get_preset("test")
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (8, 16)), jnp.int32)
    return cfg, tokens, _run(Transformer(cfg, rngs=nnx.Rngs(0)), tokens)


@pytest.mark.parametrize("mesh_name", sorted(MESHES))
def test_sharded_equals_single_device(single_device, mesh_name):
    cfg, tokens, reference = single_device
    mesh = make_mesh(MESHES[mesh_name])
    model = init_sharded(lambda: Transformer(cfg, rngs=nnx.Rngs(0)), mesh)

    # Parameters carry the table's shardings.
    specs = nnx.to_pure_dict(state_partition_specs(nnx.state(model), dict(mesh.shape)))
    params = nnx.to_pure_dict(nnx.state(model))
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        key = tuple(k.key for k in path)
        assert leaf.sharding.spec == specs_for(specs, key)
        want = EXPECTED_SPECS[mesh_name].get(key)
        if want is not None or mesh_name == "data8":
            assert leaf.sharding.spec == (want or P(*[None] * leaf.ndim)), key

    with jax.set_mesh(mesh):
        _assert_same_run(_run(model, tokens), reference)


def _assert_same_run(got, want):
    """(logits, loss, grads) of a sharded run equal the single-device ones. Tolerance: f32,
    different reduction orders across shards."""
    (logits, loss, grads), (ref_logits, ref_loss, ref_grads) = got, want
    np.testing.assert_allclose(logits, ref_logits, atol=1e-5)
    assert abs(loss - ref_loss) < 1e-5
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grads, ref_grads)


def test_blocked_attention_sharded_equals_single_device():
    """T=256: training attention takes the block-skipping branch (lax.cond) under the mesh too."""
    cfg = get_preset("test_swa", max_seq_len=256)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (8, 256)), jnp.int32)
    want = _run(Transformer(cfg, rngs=nnx.Rngs(0)), tokens)
    mesh = make_mesh(MESHES["fsdp2_tensor4"])
    model = init_sharded(lambda: Transformer(cfg, rngs=nnx.Rngs(0)), mesh)
    with jax.set_mesh(mesh):
        _assert_same_run(_run(model, tokens), want)


def test_blocked_attention_fallback_sharded_equals_single_device():
    """Padding queries (they see no key) send blocked_attention to its fallback, each query
    block against every key; under a mesh it equals one device, outputs and gradients."""
    from jax.sharding import NamedSharding

    from jaxlm.model.attention import attention_mask, blocked_attention, dot_product_attention

    rng = np.random.default_rng(7)
    b, t, n, kv, h = 8, 32, 4, 2, 8
    q = jnp.asarray(rng.normal(size=(b, t, n, h)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(b, kv, h, t)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(b, kv, t, h)), jnp.float32)
    pos = np.tile(np.arange(t), (b, 1))
    pos[0, -3:], pos[3, 10:12] = -1, -1                       # padding queries (and keys)
    mask = attention_mask(jnp.asarray(pos), jnp.asarray(pos), window=6)
    d_out = jnp.asarray(rng.normal(size=q.shape), jnp.float32)

    def run(q, k, v, mask, fn):
        out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, mask), q, k, v)
        return out, vjp(d_out)

    blocked = lambda *a: blocked_attention(*a, window=6, block=8)
    want = jax.jit(run, static_argnums=4)(q, k, v, mask, dot_product_attention)
    mesh = make_mesh(MeshConfig(fsdp=2, tensor=4))
    with jax.set_mesh(mesh):
        put = lambda a: jax.device_put(a, NamedSharding(mesh, P("fsdp")))
        got = jax.jit(run, static_argnums=4)(*map(put, (q, k, v, mask)), blocked)
    jax.tree.map(lambda a, w: np.testing.assert_allclose(np.asarray(a), np.asarray(w), atol=1e-5),
                 got, want)


def specs_for(specs, key):
    node = specs
    for k in key:
        node = node[k]
    return node


def test_is_split_reads_the_current_mesh():
    assert not is_split("heads", 8)                      # no mesh context
    with jax.set_mesh(make_mesh(MeshConfig(fsdp=2, tensor=4))):
        assert is_split("heads", 8) and is_split("embed", 64)
        assert not is_split("kv_heads", 2)               # 2 heads on tensor=4: replicated
        assert not is_split("head_dim", 8)


def test_kv_heads_fewer_than_tensor_axis_are_replicated():
    cfg = get_preset("test_swa")  # K = 2 kv heads on tensor = 4
    mesh = make_mesh(MeshConfig(fsdp=2, tensor=4))
    model = init_sharded(lambda: Transformer(cfg, rngs=nnx.Rngs(0)), mesh)
    assert model.layers.attn.k[...].sharding.spec == P(None, "fsdp", None, None)
    assert model.layers.attn.q[...].sharding.spec == P(None, "fsdp", "tensor", None)
