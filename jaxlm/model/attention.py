"""Grouped-query attention with causal, sliding-window and segment masks.

One implementation serves training, prefill and decode: the mask is a function of absolute
positions, so a KV cache only has to hand over its keys' positions (empty slots at position -1).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.config import ModelConfig
from jaxlm.model.layers import make_param, rope
from jaxlm.sharding import constrain


def attention_mask(q_pos: jax.Array, kv_pos: jax.Array, *, window: int | None = None,
                   q_seg: jax.Array | None = None, kv_seg: jax.Array | None = None) -> jax.Array:
    """Which keys each query may see: bool [B, T, S].

    q_pos [B, T], kv_pos [B, S]: absolute positions; kv_pos < 0 marks an empty cache slot.
    Causal: j <= i. Sliding window (Mistral §2, HF convention): i - W < j, so W keys.
    Segments (packed documents): only keys of the same segment.
    """
    qp, kp = q_pos[:, :, None], kv_pos[:, None, :]
    mask = (kp <= qp) & (kp >= 0)
    if window is not None:
        mask &= kp > qp - window
    if q_seg is not None:
        mask &= q_seg[:, :, None] == kv_seg[:, None, :]
    return mask


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax attention with query heads grouped over shared K/V (never repeated).

    q [B, T, N, H]; k, v [B, S, K, H]; mask bool [B, T, S] -> [B, T, N, H].
    Scores and softmax in float32. A query with no visible key (only padding) gets a uniform
    distribution instead of NaN.
    """
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(b, t, kv_heads, n // kv_heads, h)  # [B, T, K, G, H]
    scores = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32)
    scores = scores * (h ** -0.5)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v)
    return out.reshape(b, t, n, h)


class KVCache(NamedTuple):
    """Keys and values of every layer, in a buffer of S slots per sequence (explicit state).

    Absolute position p lives in slot p mod S. For full attention S is the longest sequence the
    cache will hold, so nothing wraps; for a sliding-window model S = W and the buffer rolls
    (Mistral §2, SPEC §1): memory is constant in the sequence length. Keys are cached after RoPE,
    so slot order never matters: the mask is computed from `pos`.

    k, v: [L, B, S, K, H]; pos: [B, S] absolute position held by each slot, -1 = empty.
    """

    k: jax.Array
    v: jax.Array
    pos: jax.Array

    @classmethod
    def create(cls, cfg: ModelConfig, batch: int, max_len: int) -> "KVCache":
        """An empty cache for sequences of up to `max_len` tokens (prompt + generation)."""
        slots = min(max_len, cfg.sliding_window) if cfg.sliding_window else max_len
        shape = (cfg.n_layers, batch, slots, cfg.n_kv_heads, cfg.head_dim)
        return cls(jnp.zeros(shape, cfg.compute_dtype), jnp.zeros(shape, cfg.compute_dtype),
                   jnp.full((batch, slots), -1, jnp.int32))

    @property
    def size(self) -> int:
        return self.pos.shape[1]


class CacheUpdate(NamedTuple):
    """What every layer needs to read and write its slice of a KVCache for one call.

    Computed once per forward pass (the same slots for every layer): old_pos / new_pos [B, S]
    are the slot positions before / after writing; slots [B, T] is where each new token goes, or
    S (out of bounds, dropped) for padding and for tokens the same call overwrites again.
    """

    old_pos: jax.Array
    new_pos: jax.Array
    slots: jax.Array

    @classmethod
    def plan(cls, pos: jax.Array, positions: jax.Array) -> "CacheUpdate":
        """pos [B, S] current slot positions; positions [B, T] of the new tokens (-1 = padding)."""
        size = pos.shape[1]
        last = positions.max(axis=1, keepdims=True)
        # A chunk longer than the buffer keeps only its last S tokens: no two writes collide.
        keep = (positions >= 0) & (positions > last - size)
        slots = jnp.where(keep, positions % size, size)
        rows = jnp.arange(pos.shape[0])[:, None]
        return cls(pos, pos.at[rows, slots].set(positions, mode="drop"), slots)

    def write(self, buffer: jax.Array, new: jax.Array) -> jax.Array:
        """buffer [B, S, K, H] with new [B, T, K, H] written into this update's slots."""
        rows = jnp.arange(buffer.shape[0])[:, None]
        return buffer.at[rows, self.slots].set(new.astype(buffer.dtype), mode="drop")


class Attention(nnx.Module):
    """Self-attention block: q/k/v projections, RoPE, masked GQA, output projection."""

    def __init__(self, cfg: ModelConfig, *, layers: int | None = None, rngs: nnx.Rngs):
        self.cfg = cfg
        d, n, k, h = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q = make_param(rngs, (d, n, h), ("embed", "heads", "head_dim"), cfg, layers=layers)
        self.k = make_param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), cfg, layers=layers)
        self.v = make_param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), cfg, layers=layers)
        self.o = make_param(rngs, (n, h, d), ("heads", "head_dim", "embed"), cfg, layers=layers)

    def project_kv(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x [B, T, D] -> keys (RoPE applied) and values, each [B, T, K, H]."""
        dt = self.cfg.compute_dtype
        k = jnp.einsum("BTD,DKH->BTKH", x, self.k[...].astype(dt))
        v = jnp.einsum("BTD,DKH->BTKH", x, self.v[...].astype(dt))
        k = rope(k, positions, self.cfg.rope_theta)
        names = ("activation_batch", "activation_length", "activation_kv_heads", None)
        return constrain(k, names), constrain(v, names)

    def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array | None = None,
                 cache: tuple[jax.Array, jax.Array] | None = None,
                 update: CacheUpdate | None = None):
        """x [B, T, D], positions [B, T] (-1 = padding), segment_ids [B, T] or None.

        Without a cache: returns [B, T, D]. With `cache` = this layer's (k, v) [B, S, K, H] and
        its `update`: returns ([B, T, D], (k, v) with the new tokens written).
        """
        dt = self.cfg.compute_dtype
        q = jnp.einsum("BTD,DNH->BTNH", x, self.q[...].astype(dt))
        q = rope(q, positions, self.cfg.rope_theta)
        q = constrain(q, ("activation_batch", "activation_length", "activation_heads", None))
        k, v = self.project_kv(x, positions)
        window = self.cfg.sliding_window
        if cache is None:
            mask = attention_mask(positions, positions, window=window,
                                  q_seg=segment_ids, kv_seg=segment_ids)
            out = dot_product_attention(q, k, v, mask)
        else:
            new_cache = (update.write(cache[0], k), update.write(cache[1], v))
            if x.shape[1] == 1:
                # Decode: write first, then attend to the buffer alone (no concatenation). The
                # slot overwritten held position p - S, which the window excludes anyway.
                kv_k, kv_v, kv_pos = *new_cache, update.new_pos
            else:
                # Prefill chunk: attend to the cache as it was plus the chunk itself, since the
                # chunk may overwrite slots its own earlier queries still need.
                kv_k = jnp.concatenate([cache[0], k.astype(cache[0].dtype)], axis=1)
                kv_v = jnp.concatenate([cache[1], v.astype(cache[1].dtype)], axis=1)
                kv_pos = jnp.concatenate([update.old_pos, positions], axis=1)
            mask = attention_mask(positions, kv_pos, window=window)
            out = dot_product_attention(q, kv_k.astype(dt), kv_v.astype(dt), mask)
        out = jnp.einsum("BTNH,NHD->BTD", out, self.o[...].astype(dt))
        return out if cache is None else (out, new_cache)
