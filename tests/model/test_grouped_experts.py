"""The CPU chunk-loop grouped SwiGLU (`chunked_swiglu`, hand-written gradient) equals the same
experts computed with jax.lax.ragged_dot and autodiff, values and gradients (rows, all weights),
for empty experts, one expert with every row, sizes summing short of or past the rows, no rows,
and sizes that exercise every chunk of the ladder (512-row chunks, then 256 ... 32, the last one
padded)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.model.grouped_experts import (CHUNKS, ExpertWeights, chunked_swiglu, grouped_swiglu_rows,
                                        ragged_swiglu, row_chunks)


def _weights(rng, e, d, f, dtype=jnp.float32):
    return ExpertWeights(*(jnp.asarray(rng.normal(size=s) / np.sqrt(s[1]), dtype)
                           for s in ((e, d, f), (e, d, f), (e, f, d))))


@pytest.mark.parametrize("sizes,rows", [
    ([5, 0, 17, 3], 36),          # rows past sum(sizes) belong to no expert: output 0, grad 0
    ([0, 0, 0, 30], 30),          # every row in the last expert
    ([40, 1, 0, 0], 41),
    ([1100, 0, 33, 480], 1613),   # 512-row chunks, then 64 + 32 (padded) ... and 480 = 256+128+64+32
    ([0, 991, 0, 0], 991),        # 512 + 256 + 128 + 64 + 32 (padded)
    ([20, 40], 37),               # sizes past the rows: cut to the rows there are, as ragged_dot
    ([0, 0], 0),                  # no rows at all
])
def test_chunked_swiglu_equals_ragged_dot(sizes, rows):
    rng = np.random.default_rng(0)
    d, f = 8, 12
    x = jnp.asarray(rng.normal(size=(rows, d)), jnp.float32)
    w = _weights(rng, len(sizes), d, f)
    sizes = jnp.asarray(sizes, jnp.int32)
    probe = jnp.asarray(rng.normal(size=(rows, d)), jnp.float32)   # a non-uniform cotangent

    def run(fn):
        loss = lambda x, w: jnp.sum(jnp.sin(fn(x, sizes, w)) * probe)
        return fn(x, sizes, w), jax.grad(loss, argnums=(0, 1))(x, w)

    (y, (dx, dw)), (y_ref, (dx_ref, dw_ref)) = jax.jit(lambda: run(chunked_swiglu))(), run(ragged_swiglu)
    np.testing.assert_allclose(y, y_ref, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(dx, dx_ref, atol=2e-5, rtol=1e-5)
    for got, want in zip(dw, dw_ref):
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-5)
    total = min(int(sizes.sum()), rows)
    assert np.all(np.asarray(y[total:]) == 0) and np.all(np.asarray(dx[total:]) == 0)


def test_rows_past_every_expert_do_not_reach_the_gradients():
    """Rows after sum(sizes) (other devices' experts under expert parallelism) may hold anything:
    a chunk that reads them must not turn 0 * inf into NaN weight gradients."""
    rng = np.random.default_rng(2)
    sizes = jnp.asarray([3, 40], jnp.int32)
    x = np.asarray(rng.normal(size=(50, 8)), np.float32)
    x[43:] = [np.inf] * 4 + [1e30] * 4
    x, w = jnp.asarray(x), _weights(rng, 2, 8, 12)
    for fn in (chunked_swiglu, ragged_swiglu):
        grads = jax.grad(lambda w: jnp.sum(fn(x, sizes, w)[:43] ** 2))(w)
        assert all(np.isfinite(np.asarray(g)).all() for g in grads), fn.__name__


def test_chunked_swiglu_bfloat16_close_to_float32():
    rng = np.random.default_rng(1)
    sizes = jnp.asarray([70, 0, 300], jnp.int32)
    x = jnp.asarray(rng.normal(size=(370, 16)), jnp.float32)
    w = _weights(rng, 3, 16, 24)
    loss = lambda x, w: jnp.sum(chunked_swiglu(x, sizes, w) ** 2)
    g32 = jax.grad(loss, argnums=(0, 1))(x, w)
    g16 = jax.grad(loss, argnums=(0, 1))(x.astype(jnp.bfloat16), jax.tree.map(lambda a: a.astype(jnp.bfloat16), w))
    for a, b in zip(jax.tree.leaves(g16), jax.tree.leaves(g32)):
        assert a.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(a, np.float32), b, rtol=0.05, atol=0.05 * float(jnp.max(jnp.abs(b))))


@pytest.mark.parametrize("n_rows,limit", [(0, 2048), (1, 2048), (31, 2048), (32, 2048), (33, 2048),
                                          (511, 2048), (512, 2048), (513, 2048), (1000, 2048),
                                          (1536, 2048), (2047, 2048), (40, 64), (100, 130)])
def test_row_chunks_cover_each_row_once(n_rows, limit):
    """Chunks tile [start, start + n_rows) in order, each valid row once, read under CHUNKS[-1]
    rows past the end, and use no chunk larger than `limit` (the array the chunks slice)."""
    start = 7

    chunk_sizes = []                      # the static chunk sizes the program was traced with

    def body(rows, first, valid, carry):
        chunk_sizes.append(rows)
        seen, end = carry
        idx = first + jnp.arange(rows)
        seen = seen.at[idx].add(jnp.where(jnp.arange(rows) < valid, 1, 0), mode="drop")
        return seen, jnp.maximum(end, first + rows)

    run = lambda n: row_chunks(jnp.int32(start), n, body,
                               (jnp.zeros(3000, jnp.int32), jnp.int32(start)), limit=limit)
    seen, end = jax.jit(run)(n_rows)
    want = np.zeros(3000, np.int32)
    want[start:start + n_rows] = 1
    np.testing.assert_array_equal(seen, want)
    assert 0 <= int(end) - (start + n_rows) < CHUNKS[-1]   # reads under 32 rows past the end
    assert max(chunk_sizes) <= limit


@pytest.mark.parametrize("platform,want", [("tpu", "ragged_dot_general"), ("cpu", "while")])
def test_form_follows_the_mesh_platform(platform, want):
    """A CPU host compiling for TPU devices (AOT) must trace ragged_dot, not the CPU loop."""
    from jax.sharding import AbstractDevice, AbstractMesh
    mesh = AbstractMesh((1,), ("data",), abstract_device=AbstractDevice(
        device_kind="test", num_cores=1, platform=platform))
    rng = np.random.default_rng(0)
    x, w = jnp.asarray(rng.normal(size=(8, 4)), jnp.float32), _weights(rng, 2, 4, 6)
    with jax.sharding.use_abstract_mesh(mesh):
        jaxpr = str(jax.make_jaxpr(grouped_swiglu_rows)(x, jnp.asarray([3, 5]), w))
    other = {"ragged_dot_general": "while", "while": "ragged_dot_general"}[want]
    assert want in jaxpr and other not in jaxpr
