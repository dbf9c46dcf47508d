"""Grouped-query attention with causal, sliding-window and segment masks.

One implementation serves training, prefill and decode: the mask is a function of absolute
positions, so a KV cache only has to hand over its keys' positions (empty slots at position -1).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.config import ModelConfig
from jaxlm.kernels.matvec import weight_einsum
from jaxlm.model.layers import make_param, rope
from jaxlm.sharding import constrain, is_split


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


# Score of a masked-out key. Finite (not -inf) so that a query with no visible key (only padding)
# gets a uniform distribution instead of NaN, in the forward and the backward alike.
_MASKED = float(jnp.finfo(jnp.float32).min)


@jax.custom_vjp
def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax attention with query heads grouped over shared K/V (never repeated).

    q [B, T, N, H]; k [B, K, H, S] (keys transposed) and v [B, K, S, H], the KV cache's
    layouts; mask bool [B, T, S] -> [B, T, N, H]. Scores and softmax in float32. A query with no
    visible key (only padding) gets a uniform distribution instead of NaN.

    The gradient is written by hand (flash-attention style, Dao et al. 2022 §3.1): the backward
    keeps only q, k, v, the output and the softmax's max and normaliser, and recomputes the
    [B, K, G, T, S] probabilities from them instead of storing one such tensor per layer. Every
    contraction is oriented so that XLA:CPU transposes only small [.., T, H]-sized operands
    (q, keys, dV), never a [.., T, S] one. Measured on the bench config (8 layers, 8x512 tokens):
    attention forward + backward 2.2 s -> 1.3 s, and 1.4 -> 1.2-1.3 s with keys transposed.
    """
    return _attention_fwd(q, k, v, mask)[0]


def _heads_first(x: jax.Array, kv_heads: int) -> jax.Array:
    """[B, T, N, H] -> [B, K, G, T, H]."""
    b, t, n, h = x.shape
    return x.reshape(b, t, kv_heads, n // kv_heads, h).transpose(0, 2, 3, 1, 4)


def _heads_last(x: jax.Array) -> jax.Array:
    """[B, K, G, T, H] -> [B, T, N, H] (the inverse of _heads_first)."""
    b, k, g, t, h = x.shape
    return x.transpose(0, 3, 1, 2, 4).reshape(b, t, k * g, h)


def _masked_scores(q: jax.Array, k: jax.Array, mask: jax.Array) -> jax.Array:
    """q [B, K, G, T, H] (already scaled), k [B, K, H, S] -> float32 scores [B, K, G, T, S]."""
    scores = jnp.einsum("BKGTH,BKHS->BKGTS", q, k, preferred_element_type=jnp.float32)
    return jnp.where(mask[:, None, None], scores, _MASKED)


def _attention_fwd(q, k, v, mask):
    h = q.shape[-1]
    q = _heads_first(q * jnp.asarray(h ** -0.5, q.dtype), v.shape[1])  # [B, K, G, T, H]
    scores = _masked_scores(q, k, mask)
    top = jnp.max(scores, axis=-1, keepdims=True)
    e = jnp.exp(scores - top)
    total = jnp.sum(e, axis=-1, keepdims=True)
    # Normalise the [.., T, H] output instead of the [.., T, S] probabilities: one pass fewer.
    out = jnp.einsum("BKGTS,BKSH->BKGTH", e.astype(v.dtype), v,
                     preferred_element_type=jnp.float32) / total
    result = _heads_last(out).astype(q.dtype)
    # (max, 1/sum) rather than log-sum-exp: for a query that sees no key, max is float32's min and
    # adding log(S) to it would round away.
    return result, (q, k, v, mask, out.astype(q.dtype), top, 1.0 / total)


def _attention_bwd(res, d_out):
    q, k, v, mask, out, top, inv_total = res  # q [B, K, G, T, H] scaled; top [B, K, G, T, 1]
    h = q.shape[-1]
    d_out = _heads_first(d_out, q.shape[1])                                  # [B, K, G, T, H]
    probs = jnp.exp(_masked_scores(q, k, mask) - top) * inv_total
    d_probs = jnp.einsum("BKGTH,BKSH->BKGTS", d_out, v, preferred_element_type=jnp.float32)
    # Softmax backward: dS = P * (dP - rowsum(dP * P)), and rowsum(dP * P) = rowsum(dO * O).
    # Masked scores are constants: no gradient (it matters for a query that sees no key).
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
    d_scores = jnp.where(mask[:, None, None], probs * (d_probs - delta), 0.0).astype(q.dtype)
    dq = jnp.einsum("BKGTS,BKHS->BKGTH", d_scores, k) * jnp.asarray(h ** -0.5, q.dtype)
    # dK and dV contract over (G, T): computed as [B, K, H, S], so the big [.., T, S] operand is
    # already in the layout the matmul wants; only the small dV is transposed afterwards.
    dk = jnp.einsum("BKGTH,BKGTS->BKHS", q, d_scores).astype(k.dtype)
    dv = jnp.einsum("BKGTH,BKGTS->BKHS", d_out, probs.astype(v.dtype))
    dv = dv.swapaxes(2, 3).astype(v.dtype)                                   # [B, K, S, H]
    return _heads_last(dq), dk, dv, None


dot_product_attention.defvjp(_attention_fwd, _attention_bwd)

# Query rows per block of blocked_attention (on the bench config 64 and 256 were slower), and at
# most this many blocks, so that long sequences do not unroll into hundreds of attention calls
# (16 causal blocks already skip 47 % of the work; the limit is 50 %).
ATTENTION_BLOCK = 128
MAX_ATTENTION_BLOCKS = 16


def key_blocks(t: int, window: int | None, block: int) -> tuple[tuple[int, int, int, int], ...]:
    """Static (q0, q1, k0, k1): the keys [k0, k1) that query rows [q0, q1) can see when key j is
    visible to query i only for i - W < j <= i (causal by index, window W), in `block` steps."""
    def first_key(q0: int) -> int:  # the block holding key q0 - W + 1, the oldest one visible
        return 0 if window is None else max(0, (q0 - window + 1) // block * block)

    return tuple((q0, q0 + block, first_key(q0), q0 + block) for q0 in range(0, t, block))


def blocked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                      window: int | None, block: int = ATTENTION_BLOCK) -> jax.Array:
    """dot_product_attention over the same sequence (T == S), skipping the key blocks that the
    causal / sliding-window structure leaves fully masked.

    With T = 512, W = 256 and 128-row blocks each query block reads at most 384 keys, and the
    first ones fewer: 56 % of the score work. Measured on the bench config (8 layers, 8x512
    tokens): attention forward + backward 1.52 s -> 0.80 s.

    The mask is a function of positions and segments, not of indices, so skipping is only exact
    when every visible key lies inside the blocks and every query sees a key (a query that sees
    none averages over all keys in dot_product_attention). That is checked on the mask at run
    time (`lax.cond`): rows packed by the data pipeline pass; anything else (positions that do
    not follow the index, padding queries) takes the full computation (each query block against
    every key), with the same result.
    """
    t = q.shape[1]
    block = max(block, -(-t // MAX_ATTENTION_BLOCKS))
    if k.shape[-1] != t or t % block or t < 2 * block:
        return dot_product_attention(q, k, v, mask)
    blocks = key_blocks(t, window, block)
    # The fallback runs the same query blocks against every key: exact for any mask (a block of
    # queries is a block of independent softmaxes), and its temporaries are block-sized like the
    # skipping branch's, which matters because XLA keeps both branches' buffers: with one
    # [T, S] computation as the fallback, mistral_7b at T = 8192 needed 71.6 GiB per v5p chip,
    # with this one 60.9 GiB (experiments/aot_check.py; the [T, S] computation alone: 60.3).
    every_key = tuple((q0, q1, 0, t) for q0, q1, _, _ in blocks)
    return jax.lax.cond(skipping_is_exact(mask, blocks),
                        lambda *a: skipping_attention(*a, blocks),
                        lambda *a: skipping_attention(*a, every_key), q, k, v, mask)


def skipping_is_exact(mask: jax.Array, blocks) -> jax.Array:
    """bool []: every visible key of `mask` [B, T, S] lies inside `blocks`, every query sees one."""
    inside = np.zeros(mask.shape[1:], bool)
    for q0, q1, k0, k1 in blocks:
        inside[q0:q1, k0:k1] = True
    return ~jnp.any(mask & ~inside) & jnp.all(jnp.any(mask, axis=-1))


def skipping_attention(q, k, v, mask, blocks) -> jax.Array:
    """dot_product_attention of each query block against its key block only."""
    return jnp.concatenate([
        dot_product_attention(q[:, q0:q1], k[..., k0:k1], v[:, :, k0:k1], mask[:, q0:q1, k0:k1])
        for q0, q1, k0, k1 in blocks], axis=1)


class KVCache(NamedTuple):
    """Keys and values of every layer, in a buffer of S slots per sequence (explicit state).

    Absolute position p lives in slot p mod S. For full attention S is the longest sequence the
    cache will hold, so nothing wraps; for a sliding-window model S = W and the buffer rolls
    (Mistral §2, SPEC §1): memory is constant in the sequence length. Keys are cached after RoPE,
    so slot order never matters: the mask is computed from `pos`.

    k: [L, B, K, H, S] (keys transposed), v: [L, B, K, S, H] (or tuples of L per-layer buffers,
    see per_layer); pos: [B, S] absolute position held by each slot, -1 = empty.
    Heads first and keys transposed, so that decode's score (q . K: [H] x [H, S]) and value
    (p . V: [S] x [S, H]) contractions read the buffers in place. With [.., S, K, H] XLA:CPU
    copied a transposed buffer every layer, every token, and with keys as [.., S, H] it still
    transposed the key buffer: 8-28 % of the attention time in decode (bench config, b=1..16).
    """

    k: jax.Array
    v: jax.Array
    pos: jax.Array

    @classmethod
    def create(cls, cfg: ModelConfig, batch: int, max_len: int) -> "KVCache":
        """An empty cache for sequences of up to `max_len` tokens (prompt + generation).

        Precondition: every position written must be < max_len (unless the model's sliding
        window is <= max_len, when the buffer rolls by design). A smaller full-attention cache
        would overwrite the oldest keys; Transformer raises when positions are concrete, and
        cannot check under jit. generate() sizes the cache itself.
        """
        slots = min(max_len, cfg.sliding_window) if cfg.sliding_window else max_len
        shape = (cfg.n_layers, batch, cfg.n_kv_heads, slots, cfg.head_dim)
        keys = (cfg.n_layers, batch, cfg.n_kv_heads, cfg.head_dim, slots)
        return cls(jnp.zeros(keys, cfg.compute_dtype), jnp.zeros(shape, cfg.compute_dtype),
                   jnp.full((batch, slots), -1, jnp.int32))

    @property
    def size(self) -> int:
        return self.pos.shape[1]

    def per_layer(self) -> "KVCache":
        """The same cache with k and v as tuples of L per-layer buffers, [B·K, H, S] and
        [B·K, S, H], for a decode loop that runs the layers unrolled (Transformer.hidden with
        layer_groups): each layer then updates its own buffer instead of slicing and re-stacking
        the [L, ...] array. B and K are merged because the attention matmuls see them as one
        batch dimension: with [1, K, ...] buffers XLA:CPU fused the batch-1 cache update once
        for the loop carry and once more for the matmul's [K, ...] view, with a buffer copy each.
        (Single-device decode; under a mesh that splits K but not B the merged axis would not
        tile: keep the stacked cache there.)
        """
        if isinstance(self.k, tuple):
            return self
        merge = lambda a: tuple(layer.reshape(-1, *layer.shape[2:]) for layer in a)
        return self._replace(k=merge(self.k), v=merge(self.v))


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

    def write(self, buffer: jax.Array, new: jax.Array, axis: int) -> jax.Array:
        """new written into this update's slots of buffer, along `axis`, the slot axis of both:
        keys [B, K, H, S] <- [B, K, H, T] (axis 3), values [B, K, S, H] <- [B, K, T, H] (axis 2)."""
        new = new.astype(buffer.dtype)
        if self.slots.shape == (1, 1):
            # One token of one sequence (decode at batch 1): a select against the slot's one-hot
            # (slot S, "drop", matches nothing). XLA:CPU lowers the scatter below with the
            # scattered dims moved first and back, and a dynamic_update_slice here got fused
            # twice (for the attention and for the loop carry), each needing its own copy of the
            # buffer. Per layer of the bench config: 20 -> 10 us.
            hit = jnp.arange(buffer.shape[axis]) == self.slots[0, 0]
            return jnp.where(hit.reshape((-1,) + (1,) * (buffer.ndim - 1 - axis)), new, buffer)
        rows = jnp.arange(buffer.shape[0])[:, None]
        # Advanced indices (rows, slots) come first in the indexed result: [B, T, K, H].
        index = (rows,) + (slice(None),) * (axis - 1) + (self.slots,)
        return buffer.at[index].set(jnp.moveaxis(new, axis, 1), mode="drop")


class Attention(nnx.Module):
    """Self-attention block: q/k/v projections, RoPE, masked GQA, output projection."""

    def __init__(self, cfg: ModelConfig, *, layers: int | None = None, rngs: nnx.Rngs):
        self.cfg = cfg
        d, n, k, h = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q = make_param(rngs, (d, n, h), ("embed", "heads", "head_dim"), cfg, layers=layers)
        self.k = make_param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), cfg, layers=layers)
        self.v = make_param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), cfg, layers=layers)
        self.o = make_param(rngs, (n, h, d), ("heads", "head_dim", "embed"), cfg, layers=layers)

    def project(self, x: jax.Array, positions: jax.Array):
        """x [B, T, D] -> q [B, T, N, H], k [B, K, H, T] and v [B, K, T, H] (the cache layouts),
        RoPE on q and k.

        Unless heads are split across devices (tensor parallelism), one matmul against the
        concatenated [D, N + 2K, H] weight instead of three: in decode at batch 1 every
        matrix-vector product pays a fixed ~25 us (bench machine) on top of streaming its weight,
        and the k and v ones are small. Measured on the bench config, b=1: 136 -> 77 us per
        layer. XLA hoists the concatenation out of the decode loop (the weights are
        loop-invariant); in training it is a 1.5 MB copy per layer and its gradient three slices.
        With split heads the concatenation would re-shard the weights, so they stay apart.
        """
        dt = self.cfg.compute_dtype
        n, kv = self.cfg.n_heads, self.cfg.n_kv_heads
        if is_split("heads", n) or is_split("kv_heads", kv):
            q = jnp.einsum("BTD,DNH->BTNH", x, self.q[...].astype(dt))
            k = jnp.einsum("BTD,DKH->BTKH", x, self.k[...].astype(dt))
            v = jnp.einsum("BTD,DKH->BTKH", x, self.v[...].astype(dt))
            q, k = rope(q, positions, self.cfg.rope_theta), rope(k, positions, self.cfg.rope_theta)
        else:
            w = jnp.concatenate([self.q[...], self.k[...], self.v[...]], axis=1).astype(dt)
            qkv = weight_einsum("BTD,DJH->BTJH", x, w)                   # J = N + 2K heads
            qk = rope(qkv[:, :, : n + kv], positions, self.cfg.rope_theta)  # q and k heads alike
            q, k, v = qk[:, :, :n], qk[:, :, n:], qkv[:, :, n + kv:]
        q = constrain(q, ("activation_batch", "activation_length", "activation_heads", None))
        names = ("activation_batch", "activation_kv_heads", "activation_length", None)
        k = constrain(k.transpose(0, 2, 3, 1), (*names[:2], None, names[2]))
        return q, k, constrain(v.swapaxes(1, 2), names)

    def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array | None = None,
                 cache: tuple[jax.Array, jax.Array] | None = None,
                 update: CacheUpdate | None = None):
        """x [B, T, D], positions [B, T] (-1 = padding), segment_ids [B, T] or None.

        Without a cache: returns [B, T, D]. With `cache` = this layer's (k [B, K, H, S],
        v [B, K, S, H]) and its `update`: returns ([B, T, D], (k, v) with the new tokens written).
        """
        dt = self.cfg.compute_dtype
        q, k, v = self.project(x, positions)
        window = self.cfg.sliding_window
        if cache is None:
            mask = attention_mask(positions, positions, window=window,
                                  q_seg=segment_ids, kv_seg=segment_ids)
            out = blocked_attention(q, k, v, mask, window)
        else:
            stored = cache
            # Per-layer buffers of a decode loop are stored [B·K, ...] (see KVCache.per_layer).
            cache = tuple(c.reshape(x.shape[0], -1, *c.shape[1:]) if c.ndim == 3 else c
                          for c in cache)
            new_cache = (update.write(cache[0], k, axis=3), update.write(cache[1], v, axis=2))
            if x.shape[1] == 1:
                # Decode: write first, then attend to the buffer alone (no concatenation). The
                # slot overwritten held position p - S, which the window excludes anyway.
                kv_k, kv_v, kv_pos = *new_cache, update.new_pos
            else:
                # Prefill chunk: attend to the cache as it was plus the chunk itself, since the
                # chunk may overwrite slots its own earlier queries still need.
                kv_k = jnp.concatenate([cache[0], k.astype(cache[0].dtype)], axis=3)
                kv_v = jnp.concatenate([cache[1], v.astype(cache[1].dtype)], axis=2)
                kv_pos = jnp.concatenate([update.old_pos, positions], axis=1)
            mask = attention_mask(positions, kv_pos, window=window)
            out = dot_product_attention(q, kv_k.astype(dt), kv_v.astype(dt), mask)
        # One [N·H] contraction, not two: with (N, H) as separate dims XLA:CPU re-ordered them
        # in decode and transposed the whole [N, H, D] weight every layer, every token.
        b, t, n, h = out.shape
        w_o = self.o[...].astype(dt).reshape(n * h, -1)
        out = weight_einsum("BTI,ID->BTD", out.reshape(b, t, n * h), w_o)  # I = (N, H) flat
        if cache is None:
            return out
        return out, tuple(c.reshape(s.shape) for c, s in zip(new_cache, stored))
