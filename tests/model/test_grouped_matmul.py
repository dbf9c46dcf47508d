"""The CPU blocked grouped matmul equals jax.lax.ragged_dot (values and gradients), for empty
groups, one full group, sizes summing past or short of the rows, and several block sizes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.model.moe_dispatch import blocked_grouped_matmul


@pytest.mark.parametrize("sizes,block", [([5, 0, 17, 3], 4), ([0, 0, 0, 30], 4), ([40, 1, 0, 0], 8),
                                         ([2, 3, 4, 1], 4), ([5, 0, 17, 3], 128)])
def test_blocked_grouped_matmul_equals_ragged_dot(sizes, block):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(36, 6)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(4, 6, 5)), jnp.float32)
    sizes = jnp.asarray(sizes, jnp.int32)
    ref = lambda x, w: jax.lax.ragged_dot(x, w, sizes)
    ours = lambda x, w: blocked_grouped_matmul(x, w, sizes, block)
    np.testing.assert_allclose(ours(x, w), ref(x, w), atol=1e-5)
    grad = lambda f: jax.grad(lambda x, w: jnp.sum(jnp.sin(f(x, w))), argnums=(0, 1))(x, w)
    for got, want in zip(grad(ours), grad(ref)):
        np.testing.assert_allclose(got, want, atol=1e-5)
