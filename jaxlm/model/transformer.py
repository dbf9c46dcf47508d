"""Decoder block, the scanned layer stack, and the language model (Llama 2 §2.2, Mistral §2)."""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.config import ModelConfig, Remat
from jaxlm.model.attention import Attention, CacheUpdate, KVCache
from jaxlm.model.layers import Embed, RMSNorm, make_param
from jaxlm.model.mlp import SwiGLU
from jaxlm.sharding import constrain

ACTIVATION = ("activation_batch", "activation_length", "activation_embed")

# Resolved once from the config (DESIGN: dispatch once), never compared as strings in forward code.
REMAT_POLICIES: dict[Remat, Callable | None] = {
    Remat.NONE: None,
    Remat.FULL: jax.checkpoint_policies.nothing_saveable,
    Remat.DOTS: jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Block(nnx.Module):
    """Pre-norm decoder block: x + attn(norm(x)), then h + mlp(norm(h)).

    Built with `layers=L`, every parameter has a leading L axis: the whole stack is one Block
    whose per-layer slices the scan in `Transformer` feeds to the same code.
    """

    def __init__(self, cfg: ModelConfig, *, layers: int | None = None, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg, layers=layers)
        self.attn = Attention(cfg, layers=layers, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg, layers=layers)
        self.mlp = SwiGLU(cfg, layers=layers, rngs=rngs)

    def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array | None = None,
                 cache: tuple[jax.Array, jax.Array] | None = None,
                 update: CacheUpdate | None = None):
        """[B, T, D] -> [B, T, D]; with a layer cache (k, v): -> ([B, T, D], updated (k, v))."""
        attn = self.attn(self.attn_norm(x), positions, segment_ids, cache, update)
        attn, cache = attn if cache is not None else (attn, None)
        h = x + attn
        out = constrain(h + self.mlp(self.mlp_norm(h)), ACTIVATION)
        return out if cache is None else (out, cache)


class Transformer(nnx.Module):
    """Decoder-only LM: embed -> L scanned blocks -> RMSNorm -> untied (or tied) head."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = Embed(cfg, rngs=rngs)
        self.layers = Block(cfg, layers=cfg.n_layers, rngs=rngs)
        self.final_norm = RMSNorm(cfg)
        if not cfg.tie_embeddings:
            self.lm_head = make_param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg)

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None, cache: KVCache | None = None):
        """tokens int [B, T] -> logits float32 [B, T, V] (and the updated cache, if given one).

        positions [B, T] default to arange(T) per row; -1 marks padding. segment_ids [B, T]
        (packed documents; 0 may mark padding) keep documents from attending to each other.
        cache: a KVCache (jaxlm.model.attention) for prefill / decode; returns (logits, cache).
        """
        x, new_cache = self.hidden(tokens, positions, segment_ids, cache)
        logits = self.logits(x)
        return logits if cache is None else (logits, new_cache)

    def with_aux(self, tokens: jax.Array, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Training forward: (logits [B, T, V], aux) where aux holds scalar auxiliary losses and
        statistics the layers report (empty for a dense model). aux["aux_loss"], when present, is
        the already-weighted term the trainer adds to the loss."""
        return self(tokens, positions, segment_ids), {}

    def hidden(self, tokens: jax.Array, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None, cache: KVCache | None = None):
        """The final hidden states [B, T, D] before norm and head, and the updated cache (or None)."""
        self._check_tokens(tokens)
        b, t = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        x = self.embed(tokens)
        graphdef, stacked = nnx.split(self.layers)
        if cache is None:
            def body(h, layer_state):
                return nnx.merge(graphdef, layer_state)(h, positions, segment_ids), None
            xs = stacked
        else:
            if segment_ids is not None:
                raise ValueError("segment_ids are for packed training rows; a cached call takes "
                                 "one sequence per row (use positions = -1 for padding)")
            update = CacheUpdate.plan(cache.pos, positions)

            def body(h, layer):
                layer_state, k, v = layer
                return nnx.merge(graphdef, layer_state)(h, positions, None, (k, v), update)
            xs = (stacked, cache.k, cache.v)
        if self.cfg.remat is not Remat.NONE:
            body = jax.checkpoint(body, policy=REMAT_POLICIES[self.cfg.remat], prevent_cse=False)
        # lax.scan traces one layer: compile time stays flat in depth.
        x, kv = jax.lax.scan(body, x, xs)
        if cache is None:
            return x, None
        return x, KVCache(kv[0], kv[1], update.new_pos)

    def logits(self, x: jax.Array) -> jax.Array:
        """Final norm and output head: [B, T, D] -> float32 [B, T, V]."""
        x = self.final_norm(x)
        if self.cfg.tie_embeddings:
            out = self.embed.attend(x)
        else:
            w = self.lm_head[...].astype(self.cfg.compute_dtype)
            out = jnp.einsum("BTD,DV->BTV", x, w, preferred_element_type=jnp.float32)
        return constrain(out, ("activation_batch", "activation_length", "activation_vocab"))

    def _check_tokens(self, tokens) -> None:
        """Clear errors for bad token input, raised before any compilation when tokens are concrete."""
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, length], got shape {tuple(tokens.shape)}")
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"tokens must be integers, got dtype {tokens.dtype}")
        if isinstance(tokens, jax.core.Tracer):
            return
        arr = np.asarray(tokens)
        if arr.size and (arr.min() < 0 or arr.max() >= self.cfg.vocab_size):
            raise ValueError(f"token ids must be in [0, {self.cfg.vocab_size}) (ModelConfig.vocab_size);"
                             f" got min {arr.min()}, max {arr.max()}")
