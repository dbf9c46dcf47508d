"""Token-level losses as pure functions of arrays. One masking helper serves pretraining, SFT,
Ghost Attention and distillation: the data decides the mask, the loss only sums under it."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def masked_sum(values: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of values where mask, number of masked-in entries), both float32 scalars."""
    mask = mask.astype(jnp.float32)
    return jnp.sum(values.astype(jnp.float32) * mask), jnp.sum(mask)


def token_losses(logits: jax.Array, targets: jax.Array, mask: jax.Array,
                 z_loss: float = 0.0) -> dict[str, jax.Array]:
    """Sums over the masked tokens of a batch (sums, not means, so micro-batches add up exactly).

    logits float32 [B, T, V], targets int [B, T], mask [B, T] (1 = train on this target).
    Returns {"ce_sum", "z_sum", "tokens"}; z is PaLM's auxiliary log(Z)^2 on the output logits,
    which keeps the softmax normaliser near 1 (bf16 stability), weighted by `z_loss`.
    """
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    ce_sum, tokens = masked_sum(ce, mask)
    z_sum = jnp.float32(0.0)
    if z_loss:
        z_sum, _ = masked_sum(z_loss * jnp.square(jax.nn.logsumexp(logits, axis=-1)), mask)
    return {"ce_sum": ce_sum, "z_sum": z_sum, "tokens": tokens}
