"""The decoder: packing isolation, remat/dtype options, scan, and input errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm.config import get_preset
from jaxlm.model import Transformer


@pytest.fixture(scope="module")
def model():
    return Transformer(get_preset("test_swa"), rngs=nnx.Rngs(0))


def test_packed_documents_do_not_see_each_other(model):
    rng = np.random.default_rng(0)
    doc_a, doc_b = rng.integers(0, 256, 11), rng.integers(0, 256, 9)
    packed = np.concatenate([doc_a, doc_b])[None]
    segments = np.array([[1] * 11 + [2] * 9])
    positions = np.array([list(range(11)) + list(range(9))])
    out = np.asarray(model(jnp.asarray(packed), jnp.asarray(positions), jnp.asarray(segments)))
    alone_a = np.asarray(model(jnp.asarray(doc_a[None])))
    alone_b = np.asarray(model(jnp.asarray(doc_b[None])))
    np.testing.assert_allclose(out[0, :11], alone_a[0], atol=1e-5)
    np.testing.assert_allclose(out[0, 11:], alone_b[0], atol=1e-5)


def test_sliding_window_changes_only_positions_beyond_window(model):
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 256, (1, 24)))
    full = Transformer(model.cfg.replace(sliding_window=None), rngs=nnx.Rngs(0))
    a, b = np.asarray(model(tokens)), np.asarray(full(tokens))
    w = model.cfg.sliding_window
    np.testing.assert_allclose(a[:, :w], b[:, :w], atol=1e-5)  # window not yet binding
    assert np.abs(a[:, w:] - b[:, w:]).max() > 1e-3


@pytest.mark.parametrize("remat", [pytest.param("full", marks=pytest.mark.slow), "dots"])
def test_remat_policies_give_identical_gradients(remat):
    cfg = get_preset("test")
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 256, (2, 16)))

    def grads(c):
        m = Transformer(c, rngs=nnx.Rngs(0))
        return nnx.to_pure_dict(nnx.state(nnx.grad(lambda mm: jnp.mean(mm(tokens) ** 2))(m)))

    base, other = grads(cfg), grads(cfg.replace(remat=remat))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), base, other)


def test_bf16_compute_stays_close_to_f32(model):
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, 256, (2, 16)))
    bf16 = Transformer(model.cfg.replace(dtype="bfloat16"), rngs=nnx.Rngs(0))
    out16 = bf16(tokens)
    assert out16.dtype == jnp.float32  # logits always f32
    assert bf16.layers.attn.q[...].dtype == jnp.float32  # param_dtype unchanged
    np.testing.assert_allclose(np.asarray(out16), np.asarray(model(tokens)), atol=5e-2)


def test_layers_are_scanned_not_unrolled():
    # Compiled program size must not grow with depth: the scan traces one layer.
    def n_ops(layers):
        cfg = get_preset("test", n_layers=layers)
        m = Transformer(cfg, rngs=nnx.Rngs(0))
        graphdef, state = nnx.split(m)
        f = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))
        return f.lower(state, jnp.zeros((1, 8), jnp.int32)).as_text().count("dot_general")

    assert n_ops(2) == n_ops(6)


@pytest.mark.parametrize("tokens,msg", [
    (np.array([[1, 2, 256]]), r"token ids must be in \[0, 256\)"),
    (np.array([[-1, 2]]), r"got min -1"),
    (np.array([1, 2, 3]), "must be \\[batch, length\\]"),
    (np.array([[1.0, 2.0]]), "must be integers"),
])
def test_bad_tokens_raise_before_compiling(model, tokens, msg):
    with pytest.raises(ValueError, match=msg):
        model(jnp.asarray(tokens))


def test_tied_embeddings_have_no_head():
    cfg = get_preset("test", tie_embeddings=True)
    m = Transformer(cfg, rngs=nnx.Rngs(0))
    assert not hasattr(m, "lm_head")
    n = sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param)))
    assert n == cfg.param_count()
    assert m(jnp.zeros((1, 4), jnp.int32)).shape == (1, 4, 256)


def test_swiglu_hand_written_gradient_matches_autodiff():
    """The SwiGLU custom VJP against JAX's autodiff of the plain formula."""
    from jaxlm.model.mlp import swiglu

    rng = np.random.default_rng(4)
    x, dy = (jnp.asarray(rng.normal(size=(2, 5, 8)), jnp.float32) for _ in range(2))
    gate, up = (jnp.asarray(rng.normal(size=(8, 12)), jnp.float32) for _ in range(2))
    down = jnp.asarray(rng.normal(size=(12, 8)), jnp.float32)
    plain = lambda x, g, u, d: (jax.nn.silu(x @ g) * (x @ u)) @ d
    out, vjp = jax.vjp(swiglu, x, gate, up, down)
    ref_out, ref_vjp = jax.vjp(plain, x, gate, up, down)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref_out), rtol=1e-5, atol=1e-5)
    for got, want, name in zip(vjp(dy), ref_vjp(dy), ["x", "gate", "up", "down"]):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-4,
                                   err_msg=f"d{name}")
