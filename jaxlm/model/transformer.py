"""Decoder block, the scanned layer stack, and the language model (Llama 2 §2.2, Mistral §2)."""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.config import ModelConfig, Remat
from jaxlm.model.attention import Attention, CacheUpdate, KVCache
from jaxlm.model.layers import Embed, RMSNorm, make_param, output_head
from jaxlm.model.mlp import SwiGLU
from jaxlm.model.moe import MoE, MoEMode
from jaxlm.sharding import constrain

ACTIVATION = ("activation_batch", "activation_length", "activation_embed")

# Resolved once from the config (DESIGN: dispatch once), never compared as strings in forward code.
REMAT_POLICIES: dict[Remat, Callable | None] = {
    Remat.NONE: None,
    Remat.FULL: jax.checkpoint_policies.nothing_saveable,
    Remat.DOTS: jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def layer_stacks(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Which decoder layers (0-based) each scanned stack holds, in stack order.

    `layers` holds every `moe.every`-th layer (the MoE blocks; all layers of a dense model or of
    an all-MoE one like Mixtral); `dense_layers` the others, when there are any. jaxlm.convert
    reads this to place HF layer i.
    """
    every = cfg.moe.every if cfg.moe is not None else 1
    last = tuple(i for i in range(cfg.n_layers) if (i + 1) % every == 0)
    rest = tuple(i for i in range(cfg.n_layers) if (i + 1) % every)
    return {"layers": last, "dense_layers": rest} if rest else {"layers": last}


class Block(nnx.Module):
    """Pre-norm decoder block: x + attn(norm(x)), then h + ffn(norm(h)); the FFN is SwiGLU.

    Built with `layers=L`, every parameter has a leading L axis: the whole stack is one Block
    whose per-layer slices the scan in `Transformer` feeds to the same code.
    """

    def __init__(self, cfg: ModelConfig, *, layers: int | None = None, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg, layers=layers)
        self.attn = Attention(cfg, layers=layers, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg, layers=layers)
        self.init_ffn(cfg, layers, rngs)

    def init_ffn(self, cfg: ModelConfig, layers: int | None, rngs: nnx.Rngs) -> None:
        self.mlp = SwiGLU(cfg, layers=layers, rngs=rngs)

    def ffn(self, h, valid, mode: MoEMode, rng) -> tuple[jax.Array, dict]:
        return self.mlp(h), {}

    def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array | None = None,
                 cache: tuple[jax.Array, jax.Array] | None = None,
                 update: CacheUpdate | None = None, mode: MoEMode = MoEMode(),
                 rng: jax.Array | None = None):
        """[B, T, D] -> ([B, T, D], updated layer cache (k, v) or None, aux dict of the FFN).

        positions [B, T] (-1 = padding: never dispatched to an expert); rng: router jitter key.
        """
        attn = self.attn(self.attn_norm(x), positions, segment_ids, cache, update)
        attn, cache = attn if cache is not None else (attn, None)
        h = x + attn
        y, aux = self.ffn(self.mlp_norm(h), positions >= 0, mode, rng)
        return constrain(h + y, ACTIVATION), cache, aux


class MoEBlock(Block):
    """The same block with a sparse mixture of experts as its FFN (SPEC §10)."""

    def init_ffn(self, cfg: ModelConfig, layers: int | None, rngs: nnx.Rngs) -> None:
        self.moe = MoE(cfg, layers=layers, rngs=rngs)

    def ffn(self, h, valid, mode: MoEMode, rng) -> tuple[jax.Array, dict]:
        return self.moe(h, valid, mode, rng)


class Transformer(nnx.Module):
    """Decoder-only LM: embed -> L scanned blocks -> RMSNorm -> untied (or tied) head."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = Embed(cfg, rngs=rngs)
        stacks = layer_stacks(cfg)
        # Dispatch once: the block class decides dense or MoE FFN for the whole stack.
        block = Block if cfg.moe is None else MoEBlock
        self.layers = block(cfg, layers=len(stacks["layers"]), rngs=rngs)
        if "dense_layers" in stacks:
            self.dense_layers = Block(cfg, layers=len(stacks["dense_layers"]), rngs=rngs)
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
                 segment_ids: jax.Array | None = None, *, rng: jax.Array | None = None,
                 train: bool = True) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Training forward: (logits [B, T, V], aux) where aux holds auxiliary losses and
        statistics the layers report (empty for a dense model). aux["aux_loss"], when present, is
        the already-weighted term the trainer adds to the loss.

        MoE models report, averaged over MoE layers: aux_loss (α·load_balance + c_z·router_z),
        load_balance (Switch, 1.0 when balanced), router_z (ST-MoE), dropped_fraction (capacity
        dispatch) and expert_load [E] (fraction of assignments per expert).
        train: the capacity factor for training (else the eval factor). rng: a jax.random key for
        router jitter (MoEConfig.router_jitter); without one there is no jitter.
        """
        x, _, aux = self._stack(tokens, positions, segment_ids, None, MoEMode(train=train), rng)
        return self.logits(x), aux

    def hidden(self, tokens: jax.Array, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None, cache: KVCache | None = None,
               layer_groups: list[dict] | None = None):
        """The final hidden states [B, T, D] before norm and head, and the updated cache (or None).

        layer_groups: `self.layer_groups()` computed once outside a decode loop: the layers then
        run unrolled on those arrays instead of scanning the stacked parameters. Only then may
        `cache` be per-layer (KVCache.per_layer, [B·K, ...] buffers), as in generate's loop.
        """
        x, cache, _ = self._stack(tokens, positions, segment_ids, cache,
                                  MoEMode(cached=cache is not None), None, layer_groups)
        return x, cache

    def _group_params(self):
        """(graphdef of a stack block, graphdef of a dense block or None, {"last": [G, ...],
        "dense": [G, every-1, ...]}): the stacked layer parameters, one leading entry per group."""
        groups = len(layer_stacks(self.cfg)["layers"])
        graphdef, last = nnx.split(self.layers)
        if groups == self.cfg.n_layers:
            return graphdef, None, {"last": last}
        dense_def, dense = nnx.split(self.dense_layers)
        every = self.cfg.n_layers // groups
        dense = jax.tree.map(lambda a: a.reshape(groups, every - 1, *a.shape[1:]), dense)
        return graphdef, dense_def, {"last": last, "dense": dense}

    def layer_groups(self) -> list[dict]:
        """The layer parameters sliced per group into separate arrays, for `hidden(...,
        layer_groups=)`.

        Decode calls the model once per token inside a while_loop. There, slicing a layer out of a
        stacked [L, ...] parameter (what the scan does) makes XLA on CPU copy the slice before
        every matrix-vector product, every token; measured on the bench config, b=1, the layer
        stack ran 3-4x slower than on separate arrays. generate() slices once, before the loop.
        """
        params = self._group_params()[2]
        groups = len(layer_stacks(self.cfg)["layers"])
        return [jax.tree.map(lambda a: a[g], params) for g in range(groups)]

    def _stack(self, tokens, positions, segment_ids, cache: KVCache | None, mode: MoEMode,
               rng: jax.Array | None, layer_groups: list[dict] | None = None):
        """Embed and run the scanned layers: (hidden [B, T, D], new cache or None, aux)."""
        self._check_tokens(tokens)
        b, t = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        x = self.embed(tokens)
        update = None
        if cache is not None:
            if segment_ids is not None:
                raise ValueError("segment_ids are for packed training rows; a cached call takes "
                                 "one sequence per row (use positions = -1 for padding)")
            self._check_cache_size(cache, positions)
            update = CacheUpdate.plan(cache.pos, positions)
        # One scan step = one group of `every` consecutive layers: every-1 dense blocks, then
        # the block of `self.layers` (the MoE block of an MoE model). Stacks are [G, ...].
        groups = len(layer_stacks(self.cfg)["layers"])
        every = self.cfg.n_layers // groups
        graphdef, dense_def, params = self._group_params()

        def group(h, xs):
            """One group: every-1 dense blocks, then the stack's block. xs["k"][j] / xs["v"][j]
            are the group's layer caches; returns (h, [(k, v) per layer] or None, aux)."""
            kv, aux = [], {}
            key = None if rng is None else jax.random.fold_in(rng, xs["index"])
            for j in range(every):
                if j < every - 1:
                    block = nnx.merge(dense_def, jax.tree.map(lambda a: a[j], xs["dense"]))
                else:
                    block = nnx.merge(graphdef, xs["last"])
                layer_cache = None if cache is None else (xs["k"][j], xs["v"][j])
                h, layer_cache, aux = block(h, positions, segment_ids, layer_cache, update,
                                            mode, key)
                kv.append(layer_cache)
            return h, None if cache is None else kv, aux

        if self.cfg.remat is not Remat.NONE:
            group = jax.checkpoint(group, policy=REMAT_POLICIES[self.cfg.remat], prevent_cse=False)
        if layer_groups is None:
            if cache is not None and isinstance(cache.k, tuple):
                raise ValueError("a per-layer cache (KVCache.per_layer) needs layer_groups="
                                 "model.layer_groups(); pass the stacked KVCache otherwise")
            # lax.scan traces one group: compile time stays flat in depth.
            def body(h, xs):
                h, kv, aux = group(h, xs)
                return h, (None if kv is None else tuple(jnp.stack(c) for c in zip(*kv)), aux)

            xs = {**params, "index": jnp.arange(groups)}
            if cache is not None:  # [L, ...] in layer order -> [G, every, ...]
                xs["k"], xs["v"] = (c.reshape(groups, every, *c.shape[1:])
                                    for c in (cache.k, cache.v))
            x, (kv, aux) = jax.lax.scan(body, x, xs)
            aux = {name: jnp.mean(value, axis=0) for name, value in aux.items()}  # over MoE layers
            if cache is None:
                return x, None, aux
            k, v = kv[0].reshape(cache.k.shape), kv[1].reshape(cache.v.shape)
            return x, KVCache(k, v, update.new_pos), aux
        # Unrolled over pre-sliced weights (see layer_groups). A per-layer cache (KVCache.per_layer)
        # stays per layer: each buffer is updated in place, never sliced out of or stacked back
        # into an [L, ...] array (on the bench config, b=1, that was ~0.9 ms of every 7.6 ms token).
        new_kv, auxes = [], []
        for g, group_params in enumerate(layer_groups):
            xs_g = {**group_params, "index": jnp.int32(g)}
            if cache is not None:
                layers = range(g * every, (g + 1) * every)
                xs_g["k"], xs_g["v"] = [cache.k[i] for i in layers], [cache.v[i] for i in layers]
            x, kv, aux = group(x, xs_g)
            new_kv += kv or []
            auxes.append(aux)
        aux = {name: jnp.mean(jnp.stack([a[name] for a in auxes]), axis=0) for name in auxes[0]}
        if cache is None:
            return x, None, aux
        k, v = (tuple(c) for c in zip(*new_kv))
        if not isinstance(cache.k, tuple):
            k, v = jnp.stack(k), jnp.stack(v)
        return x, KVCache(k, v, update.new_pos), aux

    def logits(self, x: jax.Array) -> jax.Array:
        """Final norm and output head: [B, T, D] -> float32 [B, T, V]."""
        x = self.final_norm(x)
        if self.cfg.tie_embeddings:
            out = self.embed.attend(x)
        else:
            out = output_head(x, self.lm_head[...].astype(self.cfg.compute_dtype))
        return constrain(out, ("activation_batch", "activation_length", "activation_vocab"))

    def _check_cache_size(self, cache: KVCache, positions) -> None:
        """Position p lives in slot p mod S, so a cache with fewer slots than the sequence would
        overwrite the oldest keys: silently a sliding window the model does not have. Checked
        when positions are concrete (eager calls); under jit the caller must size the cache."""
        window = self.cfg.sliding_window
        if isinstance(positions, jax.core.Tracer) or (window is not None and cache.size >= window):
            return
        last = int(np.max(np.asarray(positions)))
        if last >= cache.size:
            raise ValueError(
                f"position {last} does not fit the KVCache's {cache.size} slots: older keys would "
                "be overwritten (a sliding window this model does not have); create the cache "
                f"with KVCache.create(cfg, batch, max_len=...) for the whole sequence, at least "
                f"{last + 1}")

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
