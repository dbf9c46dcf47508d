"""Parameters with logical axes, token embedding, RMSNorm and rotary position embeddings."""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.config import ModelConfig
from jaxlm.kernels.matvec import weight_einsum
from jaxlm.sharding import constrain


def make_param(rngs: nnx.Rngs | None, shape: Sequence[int], names: Sequence[str], cfg: ModelConfig,
               *, layers: int | None = None, init: str = "normal") -> nnx.Param:
    """An nnx.Param carrying its logical axis names (read by jaxlm.sharding).

    With `layers=L` the parameter is created for a whole scanned stack: shape [L, *shape] and a
    leading "layers" axis. `init` is "normal" (N(0, init_std), as HF's initializer_range) or
    "ones" (norm scales).
    """
    if layers is not None:
        shape, names = (layers, *shape), ("layers", *names)
    if init == "ones":
        value = jnp.ones(shape, cfg.weight_dtype)
    else:
        value = cfg.init_std * jax.random.normal(rngs.params(), shape, cfg.weight_dtype)
    return nnx.Param(value, logical_axes=tuple(names))


class Embed(nnx.Module):
    """Token embedding table [V, D]; also the output projection when embeddings are tied."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embedding = make_param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """tokens [B, T] int -> [B, T, D] in the compute dtype."""
        x = jnp.take(self.embedding[...], tokens, axis=0).astype(self.cfg.compute_dtype)
        return constrain(x, ("activation_batch", "activation_length", "activation_embed"))

    def attend(self, x: jax.Array) -> jax.Array:
        """Tied output head: x [B, T, D] -> logits [B, T, V]."""
        return output_head(x, self.embedding[...].astype(self.cfg.compute_dtype).T, True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def output_head(x: jax.Array, w: jax.Array, transposed: bool = False) -> jax.Array:
    """Logits of the output head: x [B, T, D] @ w [D, V] -> float32 [B, T, V].

    The gradient is written by hand so that the weight gradient contracts over the tokens with
    the small x [B, T, D] as the transposed operand. Left to autodiff, XLA:CPU wrote the
    [B, T, V] logit gradient out transposed (0.8 s of a 9 s step on the bench config).

    transposed: w is a transposed view of the [V, D] embedding (tied head). Then XLA's own dot
    reads it in place, where the batch-1 CPU kernel (`weight_einsum`) would need a copy of the
    whole embedding every token (bench config with a tied head: 164 -> 67 tokens/s).
    """
    if transposed:
        return jnp.einsum("BTD,DV->BTV", x, w, preferred_element_type=jnp.float32)
    return weight_einsum("BTD,DV->BTV", x, w, preferred_element_type=jnp.float32)


def _head_fwd(x, w, transposed):
    return output_head(x, w, transposed), (x, w)


def _head_bwd(transposed, res, d_logits):
    x, w = res
    d_logits = d_logits.astype(x.dtype)
    return (jnp.einsum("BTV,DV->BTD", d_logits, w),
            jnp.einsum("BTD,BTV->DV", x, d_logits).astype(w.dtype))


output_head.defvjp(_head_fwd, _head_bwd)


class RMSNorm(nnx.Module):
    """x / rms(x) * scale, with the statistics in float32 whatever the compute dtype."""

    def __init__(self, cfg: ModelConfig, *, layers: int | None = None, rngs: nnx.Rngs | None = None):
        self.eps = cfg.norm_eps
        self.scale = make_param(rngs, (cfg.d_model,), ("norm",), cfg, layers=layers, init="ones")

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        # HF multiplies in the input dtype after normalising in f32; same here.
        return self.scale[...].astype(x.dtype) * x32.astype(x.dtype)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding, HF rotate-half convention (dim i pairs with i + H/2), SPEC §1.

    x [B, T, N, H]; positions [B, T] absolute token positions. Computed in float32.
    """
    h = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))  # [H/2]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq               # [B, T, H/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]          # [B, T, 1, H]
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x32 * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)
