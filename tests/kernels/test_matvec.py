"""The batch-1 CPU matvec kernel: its results against NumPy, its gradients against jnp.einsum,
when `weight_einsum` routes to it, its build failures, and that decode actually runs on it."""
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType

from jaxlm.config import get_preset
from jaxlm.inference import generate as gen
from jaxlm.kernels import matvec as mv
from jaxlm.model import Transformer


def kernel_calls(text: str) -> int:
    """Custom calls of the kernel in a lowered program's text."""
    return len(re.findall(r"@jaxlm_matvec_f32\b", text))


def lowered(fn, *args) -> str:
    return jax.jit(fn).lower(*args).as_text()


def test_the_kernel_builds_here():
    assert mv.available(), "c++ should build jaxlm/kernels/matvec.cc on this machine"
    assert mv.library_path().exists()


# K below the 16 rows a thread block needs (one block), not a multiple of 4 (the tail loop), not
# a multiple of the thread count; N = 1 and an output-head-sized N.
@pytest.mark.parametrize("k,n", [(1, 3), (7, 5), (33, 1), (64, 96), (515, 130), (256, 32000)])
def test_matches_numpy(k, n):
    rng = np.random.default_rng(k * 1000 + n)
    x = rng.standard_normal(k).astype(np.float32)
    w = rng.standard_normal((k, n)).astype(np.float32)
    want = x.astype(np.float64) @ w.astype(np.float64)
    got = np.asarray(jax.jit(mv.matvec)(x, w))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.sqrt(k))


def test_routes_only_single_row_float32_plain_products():
    x1, x2 = jnp.ones((1, 1, 8)), jnp.ones((1, 2, 8))
    w = jnp.ones((8, 4, 2))
    assert mv.applies("BTD,DJH->BTJH", x1, w)
    assert not mv.applies("BTD,DJH->BTJH", x2, w)                       # two rows: a GEMM
    assert not mv.applies("BTD,DJH->BTJH", x1.astype(jnp.bfloat16), w)  # not float32
    assert not mv.applies("BTD,JDH->BTJH", x1, jnp.ones((4, 8, 2)))      # contracts w's middle
    assert not mv.applies("BTD,DJH->BTHJ", x1, w)                       # output re-ordered
    mesh = jax.make_mesh((2,), ("fsdp",), axis_types=(AxisType.Auto,), devices=jax.devices()[:2])
    with jax.set_mesh(mesh):                                            # no sharding rule
        assert not mv.applies("BTD,DJH->BTJH", x1, w)


@pytest.mark.parametrize("spec, x_shape, w_shape, kwargs", [
    ("D,DD->D", (4,), (4, 4), {}),                       # repeated letter: einsum's diagonal
    ("BD,DD->BD", (1, 4), (4, 4), {}),
    ("...D,DV->...V", (1, 4), (4, 3), {}),               # ellipsis
    ("BTD,DV->BTV", (2, 3, 0), (0, 5), {}),              # nothing to contract
    ("TD,DV->TV", (1, 8), (1, 5), {}),                   # w broadcast along K
    ("TD,DV->TV", (1, 8), (8, 5), {"precision": "highest"}),
    ("TD,DV->TV", (1, 8), (8, 5), {"preferred_element_type": jnp.bfloat16}),
])
def test_everything_else_is_jnp_einsum(spec, x_shape, w_shape, kwargs):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
    w = jnp.asarray(rng.standard_normal(w_shape), jnp.float32)
    assert not mv.applies(spec, x, w, **kwargs)
    got = jax.jit(lambda x, w: mv.weight_einsum(spec, x, w, **kwargs))(x, w)
    want = jnp.einsum(spec, x, w, **kwargs)
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=1e-6)


def test_many_products_at_once_on_the_thread_pool():
    """Sixteen independent products in one program, which XLA may run side by side: each
    call's blocks, claimed by its caller or by pool threads, add up to NumPy's result."""
    rng = np.random.default_rng(7)
    xs = [rng.standard_normal(300).astype(np.float32) for _ in range(16)]
    ws = [rng.standard_normal((300, 50 + i)).astype(np.float32) for i in range(16)]
    got = jax.jit(lambda xs, ws: [mv.matvec(x, w) for x, w in zip(xs, ws)])(xs, ws)
    for x, w, g in zip(xs, ws, got):
        np.testing.assert_allclose(g, x.astype(np.float64) @ w, rtol=1e-5, atol=1e-4)


def test_weight_einsum_equals_einsum_with_gradients():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((1, 1, 40)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((40, 3, 5)), jnp.float32)
    spec = "BTD,DJH->BTJH"
    ours = lambda x, w: jnp.sum(jnp.sin(mv.weight_einsum(spec, x, w)))
    ref = lambda x, w: jnp.sum(jnp.sin(jnp.einsum(spec, x, w)))
    assert kernel_calls(lowered(ours, x, w)) == 1 and kernel_calls(lowered(ref, x, w)) == 0
    np.testing.assert_allclose(jax.jit(ours)(x, w), ref(x, w), rtol=1e-5)
    for g, r in zip(jax.grad(ours, (0, 1))(x, w), jax.grad(ref, (0, 1))(x, w)):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)
    head = lambda x, w: mv.weight_einsum("BTD,DV->BTV", x, w, preferred_element_type=jnp.float32)
    assert kernel_calls(lowered(head, x, w[:, 0])) == 1  # as the output head asks for it


def test_switched_off_and_bad_setting(monkeypatch):
    x, w = jnp.ones((1, 8)), jnp.ones((8, 4))
    monkeypatch.setenv("JAXLM_CPU_MATVEC", "0")
    assert not mv.applies("TD,DV->TV", x, w)
    monkeypatch.setenv("JAXLM_CPU_MATVEC", "yes")
    with pytest.raises(ValueError, match="JAXLM_CPU_MATVEC must be auto, 0 or 1, got 'yes'"):
        mv.applies("TD,DV->TV", x, w)


def test_failed_build_warns_and_falls_back(monkeypatch, tmp_path):
    monkeypatch.setenv("JAXLM_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises(RuntimeError, match="could not run the C\\+\\+ compiler .*no-such-compiler"):
        mv.build()
    register = mv._registered.__wrapped__  # the uncached body: this process keeps its kernel
    with pytest.warns(UserWarning, match="decode uses XLA's dot .*JAXLM_CPU_MATVEC=0 silences"):
        assert register() is False
    monkeypatch.setenv("JAXLM_CPU_MATVEC", "1")
    with pytest.raises(RuntimeError, match="JAXLM_CPU_MATVEC=1 but the CPU matvec kernel"):
        register()
    # A compiler that runs and fails: its last line of output is in the message.
    bad = tmp_path / "cxx"
    bad.write_text("#!/bin/sh\necho 'matvec.cc:1: error: something broke' >&2\nexit 1\n")
    bad.chmod(0o755)
    monkeypatch.setenv("CXX", str(bad))
    with pytest.raises(RuntimeError, match="failed: matvec.cc:1: error: something broke"):
        mv.build()
    assert not list(tmp_path.glob("kernels/*.so"))  # no half-written library left behind


def test_built_library_is_readable_by_others(monkeypatch, tmp_path):
    monkeypatch.setenv("JAXLM_CACHE_DIR", str(tmp_path))
    old = os.umask(0o022)
    try:
        lib = mv.build()
    finally:
        os.umask(old)
    assert lib.stat().st_mode & 0o777 == 0o755  # a shared cache: other users can load it
    assert [p.name for p in lib.parent.iterdir()] == [lib.name]


def _decode_program(model, batch):
    graphdef, state = nnx.split(model)
    tokens = jnp.ones((batch, 8), jnp.int32)
    return gen._generate.lower(graphdef, state, tokens, jnp.full((batch,), 8, jnp.int32),
                               jax.random.key(0), chunk=8, max_new=4, sampling=gen.SamplingConfig(),
                               eos_id=None, return_logits=False).as_text()


@pytest.mark.parametrize("tied", [False, True])
def test_decode_at_batch_one_runs_every_product_on_the_kernel(tied):
    cfg = get_preset("test", tie_embeddings=tied)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    # Per layer: q/k/v, o, gate, up, down; plus the head twice (first token and in the loop),
    # except a tied head, which reads the embedding through a transposed view (XLA's dot).
    head = 0 if tied else 2
    assert kernel_calls(_decode_program(model, 1)) == 5 * cfg.n_layers + head
    assert kernel_calls(_decode_program(model, 2)) == 0


def test_generate_with_and_without_the_kernel_agree(monkeypatch):
    model = Transformer(get_preset("test"), rngs=nnx.Rngs(3))
    prompt = [[1, 5, 9, 2, 7]]
    run = lambda: gen.generate(model, prompt, max_new_tokens=12, return_logits=True)
    jax.clear_caches()
    with_kernel = run()
    monkeypatch.setenv("JAXLM_CPU_MATVEC", "0")
    jax.clear_caches()
    without = run()
    jax.clear_caches()
    assert with_kernel.tokens == without.tokens
    np.testing.assert_allclose(with_kernel.logits, without.logits, atol=1e-4)
