"""Masks against a brute-force NumPy reference; GQA == MHA with repeated K/V; RoPE is relative."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.model.attention import (attention_mask, blocked_attention, dot_product_attention,
                                   key_blocks, skipping_attention, skipping_is_exact)
from jaxlm.model.layers import rope


def brute_force_mask(q_pos, kv_pos, window, q_seg, kv_seg):
    b, t = q_pos.shape
    s = kv_pos.shape[1]
    out = np.zeros((b, t, s), bool)
    for bi, i, j in itertools.product(range(b), range(t), range(s)):
        qi, kj = q_pos[bi, i], kv_pos[bi, j]
        ok = 0 <= kj <= qi
        if window is not None:
            ok = ok and qi - window < kj
        if q_seg is not None:
            ok = ok and q_seg[bi, i] == kv_seg[bi, j]
        out[bi, i, j] = ok
    return out


@pytest.mark.parametrize("window,segments", [(None, False), (3, False), (None, True), (4, True),
                                             (1, True)])
def test_mask_matches_brute_force(window, segments):
    rng = np.random.default_rng(0)
    b, t = 2, 13
    # Packed rows: segments 1,1,1,2,2,... with positions restarting per document, padding = 0.
    seg = np.sort(rng.integers(0, 4, (b, t)), axis=1)
    pos = np.zeros((b, t), np.int32)
    for bi in range(b):
        for i in range(1, t):
            pos[bi, i] = pos[bi, i - 1] + 1 if seg[bi, i] == seg[bi, i - 1] else 0
    q_seg = seg if segments else None
    got = attention_mask(jnp.asarray(pos), jnp.asarray(pos), window=window,
                         q_seg=None if q_seg is None else jnp.asarray(seg),
                         kv_seg=None if q_seg is None else jnp.asarray(seg))
    np.testing.assert_array_equal(np.asarray(got), brute_force_mask(pos, pos, window, q_seg, q_seg))


def test_mask_cache_positions_with_empty_slots():
    # A rolling buffer: keys at scrambled absolute positions, -1 for never-written slots.
    q_pos = np.array([[9, 10]])
    kv_pos = np.array([[8, 9, -1, 5, 6, 7, 10, -1]])
    got = attention_mask(jnp.asarray(q_pos), jnp.asarray(kv_pos), window=4)
    np.testing.assert_array_equal(np.asarray(got), brute_force_mask(q_pos, kv_pos, 4, None, None))


def reference_mha(q, k, v, mask):
    """Plain multi-head attention in NumPy with K/V repeated to every query head (HF repeat_kv)."""
    n, kv = q.shape[2], k.shape[2]
    k = np.repeat(k, n // kv, axis=2)
    v = np.repeat(v, n // kv, axis=2)
    scores = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
    scores = np.where(mask[:, None], scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnh->btnh", p, v)


@pytest.mark.parametrize("n,kv", [(8, 2), (4, 4), (6, 1)])
def test_gqa_equals_mha_with_repeated_kv(n, kv):
    rng = np.random.default_rng(1)
    b, t, h = 2, 7, 8
    q = rng.normal(size=(b, t, n, h)).astype(np.float32)
    k = rng.normal(size=(b, t, kv, h)).astype(np.float32)
    v = rng.normal(size=(b, t, kv, h)).astype(np.float32)
    pos = np.broadcast_to(np.arange(t), (b, t))
    mask = brute_force_mask(pos, pos, 3, None, None)
    keys_t = jnp.asarray(k).transpose(0, 2, 3, 1)          # [B, S, K, H] -> [B, K, H, S]
    values = jnp.asarray(v).swapaxes(1, 2)                 # [B, S, K, H] -> [B, K, S, H]
    got = dot_product_attention(jnp.asarray(q), keys_t, values, jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(got), reference_mha(q, k, v, mask), atol=1e-5)


def test_rope_scores_depend_only_on_relative_position():
    rng = np.random.default_rng(2)
    h = 16
    q = jnp.asarray(rng.normal(size=(1, 1, 1, h)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, 1, 1, h)), jnp.float32)

    def score(m, n):
        qm = rope(q, jnp.array([[m]]), 10000.0)
        kn = rope(k, jnp.array([[n]]), 10000.0)
        return float(jnp.sum(qm * kn))

    for offset in (0, 3, 17):
        values = [score(m + offset, m) for m in (0, 5, 100, 1234)]
        np.testing.assert_allclose(values, values[0], rtol=1e-4, atol=1e-4)
    assert abs(score(3, 0) - score(0, 0)) > 1e-3  # and it does depend on the offset


def test_rope_is_rotate_half_convention():
    # HF: q*cos + rotate_half(q)*sin, rotate_half(x) = cat(-x[H/2:], x[:H/2]); dim i pairs i+H/2.
    h, theta, p = 8, 10000.0, 3.0
    x = np.arange(1, h + 1, dtype=np.float32)
    inv = 1.0 / theta ** (np.arange(0, h, 2) / h)
    ang = np.concatenate([p * inv, p * inv])
    rot = np.concatenate([-x[h // 2:], x[:h // 2]])
    expected = x * np.cos(ang) + rot * np.sin(ang)
    got = rope(jnp.asarray(x)[None, None, None], jnp.array([[p]]), theta)
    np.testing.assert_allclose(np.asarray(got)[0, 0, 0], expected, rtol=1e-5)


def autodiff_attention(q, k, v, mask):
    """The same attention written plainly (K/V repeated per query head) and differentiated by JAX."""
    g = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
    scores = jnp.einsum("BTNH,BSNH->BNTS", q, k) / jnp.sqrt(q.shape[-1])
    scores = jnp.where(mask[:, None], scores, jnp.finfo(jnp.float32).min)
    return jnp.einsum("BNTS,BSNH->BTNH", jax.nn.softmax(scores, axis=-1), v)


@pytest.mark.parametrize("n,kv,window", [(8, 2, 3), (4, 4, None), (6, 1, 5)])
def test_hand_written_gradient_matches_autodiff(n, kv, window):
    """dot_product_attention's custom VJP (probabilities recomputed in the backward) against JAX's
    autodiff of the plain formula, on packed rows with a padding query that sees no key."""
    rng = np.random.default_rng(3)
    b, t, h = 2, 9, 8
    q, d_out = (jnp.asarray(rng.normal(size=(b, t, n, h)), jnp.float32) for _ in range(2))
    k, v = (jnp.asarray(rng.normal(size=(b, t, kv, h)), jnp.float32) for _ in range(2))
    seg = jnp.asarray([[1] * 4 + [2] * 5, [1] * 8 + [0]])   # row 2 ends in padding
    pos = jnp.asarray([list(range(4)) + list(range(5)), list(range(8)) + [-1]])
    mask = attention_mask(pos, pos, window=window, q_seg=seg, kv_seg=seg)
    assert not bool(mask[1, -1].any())  # the padding query sees nothing
    out, vjp = jax.vjp(lambda q, k, v: dot_product_attention(
        q, k.transpose(0, 2, 3, 1), v.swapaxes(1, 2), mask), q, k, v)
    ref_out, ref_vjp = jax.vjp(lambda *a: autodiff_attention(*a, mask), q, k, v)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref_out), atol=1e-5)
    for got, want, name in zip(vjp(d_out), ref_vjp(d_out), "qkv"):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, err_msg=f"d{name}")


def test_key_blocks_of_the_bench_shape():
    assert key_blocks(512, 256, 128) == ((0, 128, 0, 128), (128, 256, 0, 256),
                                         (256, 384, 0, 384), (384, 512, 128, 512))
    assert key_blocks(8, None, 4) == ((0, 4, 0, 4), (4, 8, 0, 8))


def test_long_sequences_use_at_most_16_blocks(monkeypatch):
    calls = []
    monkeypatch.setattr("jaxlm.model.attention.skipping_attention",
                        lambda q, k, v, mask, blocks: calls.append(blocks) or q)
    t = 4096
    q = jax.ShapeDtypeStruct((1, t, 2, 8), jnp.float32)
    k = jax.ShapeDtypeStruct((1, 1, 8, t), jnp.float32)
    v = jax.ShapeDtypeStruct((1, 1, t, 8), jnp.float32)
    mask = jax.ShapeDtypeStruct((1, t, t), jnp.bool_)
    jax.eval_shape(lambda *a: blocked_attention(*a, window=None), q, k, v, mask)
    assert len(calls[0]) == 16 and calls[0][1] == (256, 512, 0, 512)


def _packed_inputs(case):
    """T=16 rows (4-row blocks) whose masks do or do not fit the index-causal blocks."""
    rng = np.random.default_rng(5)
    b, t, n, kv, h = 2, 16, 4, 2, 8
    q = jnp.asarray(rng.normal(size=(b, t, n, h)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(b, kv, t, h)), jnp.float32) for _ in range(2))
    seg = np.array([[1] * 7 + [2] * 9, [1] * 16])                    # packed documents
    pos = np.array([list(range(7)) + list(range(9)), list(range(16))])
    if case == "positions off the index":   # row 2 counts down: later keys are visible
        pos[1] = np.arange(16)[::-1]
    if case == "padding query":             # a query at position -1 sees no key
        pos[1, -1], seg[1, -1] = -1, 0
    mask = attention_mask(jnp.asarray(pos), jnp.asarray(pos), window=5,
                          q_seg=jnp.asarray(seg), kv_seg=jnp.asarray(seg))
    return q, k.swapaxes(2, 3), v, mask        # keys [B, K, H, S]


@pytest.mark.parametrize("case", ["packed", "positions off the index", "padding query"])
def test_blocked_attention_equals_full_with_gradients(case):
    q, k, v, mask = _packed_inputs(case)
    blocks = key_blocks(16, 5, 4)
    assert bool(skipping_is_exact(mask, blocks)) == (case == "packed")
    d_out = jnp.asarray(np.random.default_rng(6).normal(size=q.shape), jnp.float32)
    fns = {"full": dot_product_attention,
           "blocked": lambda *a: blocked_attention(*a, window=5, block=4)}
    if case == "packed":  # the skipping branch itself, not only the lax.cond around it
        fns["skipping"] = lambda *a: skipping_attention(*a, blocks)
    results = {name: jax.vjp(lambda q, k, v: fn(q, k, v, mask), q, k, v) for name, fn in fns.items()}
    want_out, want_vjp = results.pop("full")
    for name, (out, vjp) in results.items():
        np.testing.assert_allclose(np.asarray(out), np.asarray(want_out), atol=1e-5, err_msg=name)
        for got, want, arg in zip(vjp(d_out), want_vjp(d_out), "qkv"):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5,
                                       err_msg=f"{name} d{arg}")
