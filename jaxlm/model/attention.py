"""Grouped-query attention with causal, sliding-window and segment masks.

One implementation serves training, prefill and decode: the mask is a function of absolute
positions, so a KV cache only has to hand over its keys' positions (empty slots at position -1).
"""
from __future__ import annotations

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

    def __call__(self, x: jax.Array, positions: jax.Array,
                 segment_ids: jax.Array | None = None) -> jax.Array:
        """x [B, T, D], positions [B, T], segment_ids [B, T] or None -> [B, T, D]."""
        dt = self.cfg.compute_dtype
        q = jnp.einsum("BTD,DNH->BTNH", x, self.q[...].astype(dt))
        q = rope(q, positions, self.cfg.rope_theta)
        q = constrain(q, ("activation_batch", "activation_length", "activation_heads", None))
        k, v = self.project_kv(x, positions)
        mask = attention_mask(positions, positions, window=self.cfg.sliding_window,
                              q_seg=segment_ids, kv_seg=segment_ids)
        out = dot_product_attention(q, k, v, mask)  # [B, T, N, H]
        return jnp.einsum("BTNH,NHD->BTD", out, self.o[...].astype(dt))
