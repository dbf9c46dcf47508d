"""Token-level losses as pure functions of arrays. One masking helper serves pretraining, SFT,
Ghost Attention and distillation: the data decides the mask, the loss only sums under it."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def masked_sum(values: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of values where mask, number of masked-in entries), both float32 scalars."""
    mask = mask.astype(jnp.float32)
    return jnp.sum(values.astype(jnp.float32) * mask), jnp.sum(mask)


@jax.custom_vjp
def cross_entropy(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(cross-entropy, log-normaliser log Z), each float32 [B, T], of logits [B, T, V] and int
    targets [B, T].

    The gradient is written by hand: d/dlogits = softmax · (g_ce + g_lse) - onehot · g_ce
    in one pass over the [B, T, V] logits. JAX's autodiff of log-softmax materialises the
    exponentials and the log-probabilities as extra [B, T, V] arrays; on the bench config
    (4096 x 32000 logits, 0.5 GB each) that was 0.7 s of a 10.5 s train step.
    """
    return _ce_fwd(logits, targets)[0]


def _ce_fwd(logits, targets):
    x = logits.astype(jnp.float32)
    top = jnp.max(x, axis=-1, keepdims=True)
    total = jnp.sum(jnp.exp(x - top), axis=-1, keepdims=True)
    lse = (top + jnp.log(total))[..., 0]
    label = jnp.take_along_axis(x, targets[..., None], axis=-1)[..., 0]
    return (lse - label, lse), (logits, targets, top, 1.0 / total)


def _ce_bwd(res, grads):
    logits, targets, top, inv_total = res
    g_ce, g_lse = grads
    probs = jnp.exp(logits.astype(jnp.float32) - top) * inv_total
    onehot = targets[..., None] == jnp.arange(logits.shape[-1], dtype=targets.dtype)
    d_logits = probs * (g_ce + g_lse)[..., None] - jnp.where(onehot, g_ce[..., None], 0.0)
    return d_logits.astype(logits.dtype), None


cross_entropy.defvjp(_ce_fwd, _ce_bwd)


def token_losses(logits: jax.Array, targets: jax.Array, mask: jax.Array,
                 z_loss: float = 0.0) -> dict[str, jax.Array]:
    """Sums over the masked tokens of a batch (sums, not means, so micro-batches add up exactly).

    logits float32 [B, T, V], targets int [B, T], mask [B, T] (1 = train on this target).
    Returns {"ce_sum", "z_sum", "tokens"}; z is PaLM's auxiliary log(Z)^2 on the output logits,
    which keeps the softmax normaliser near 1 (bf16 stability), weighted by `z_loss`.
    """
    ce, lse = cross_entropy(logits, targets)
    ce_sum, tokens = masked_sum(ce, mask)
    z_sum = jnp.float32(0.0)
    if z_loss:
        z_sum, _ = masked_sum(z_loss * jnp.square(lse), mask)
    return {"ce_sum": ce_sum, "z_sum": z_sum, "tokens": tokens}
