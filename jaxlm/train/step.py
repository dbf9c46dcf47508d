"""The pure train step: (state, batch) -> (state, metrics), gradient accumulation by lax.scan,
and a guard that refuses non-finite updates."""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxlm.train.losses import token_losses

Batch = dict[str, jax.Array]  # inputs, targets, positions, segment_ids, loss_mask: [rows, T]


class TrainState(NamedTuple):
    params: Any              # pure dict of parameter arrays (the model's nnx.Param state)
    opt_state: Any
    step: jax.Array          # int32: updates applied or skipped so far
    bad_in_a_row: jax.Array  # int32: consecutive non-finite steps (reset by a good one)
    bad_total: jax.Array     # int32: all non-finite steps skipped


def init_state(params, tx: optax.GradientTransformation) -> TrainState:
    zero = lambda: jnp.zeros((), jnp.int32)  # distinct buffers: the state is donated
    return TrainState(params, tx.init(params), zero(), zero(), zero())


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, *,
                    accum_steps: int = 1, z_loss: float = 0.0, seed: int = 0) -> Callable:
    """Build train_step(state, batch) -> (state, metrics).

    The batch's rows are split into `accum_steps` micro-batches, scanned in order; gradients of the
    summed token losses are added and divided once by the total token count, so k micro-batches
    give the same update as one batch k times larger. A step whose loss or gradient norm is not
    finite leaves params and optimizer state unchanged and is counted.

    Randomness (MoE router jitter) comes from key(seed) folded with state.step and the
    micro-batch index: a function of the step, so a resumed run draws what an uninterrupted run
    would have, and each micro-batch its own.
    """

    def loss_fn(params, micro: Batch, rng: jax.Array):
        model = nnx.merge(graphdef, params)
        logits, aux = model.with_aux(micro["inputs"], micro["positions"], micro["segment_ids"],
                                     rng=rng)
        sums = token_losses(logits, micro["targets"], micro["loss_mask"], z_loss)
        # Auxiliary terms (MoE) are per-micro-batch means: weight them by the micro-batch's
        # tokens so that, after the final division, they are a token-weighted mean as well.
        aux_sum = aux.get("aux_loss", jnp.float32(0.0)) * sums["tokens"]
        sums = {**sums, **{f"aux/{k}": v * sums["tokens"] for k, v in aux.items()}}
        return sums["ce_sum"] + sums["z_sum"] + aux_sum, sums

    grad_fn = jax.grad(loss_fn, has_aux=True)

    def train_step(state: TrainState, batch: Batch):
        # Row r goes to micro-batch r % accum_steps: every micro-batch takes rows from every
        # device's contiguous block of the batch-sharded input, so no resharding is needed.
        micro = jax.tree.map(
            lambda a: a.reshape(-1, accum_steps, *a.shape[1:]).swapaxes(0, 1), batch)

        step_key = jax.random.fold_in(jax.random.key(seed), state.step)

        def accumulate(carry, xs):
            grads, sums = carry
            mb, i = xs
            g, s = grad_fn(state.params, mb, jax.random.fold_in(step_key, i))
            return (jax.tree.map(jnp.add, grads, g), jax.tree.map(jnp.add, sums, s)), None

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        sums_shape = jax.eval_shape(lambda: grad_fn(
            state.params, jax.tree.map(lambda a: a[0], micro), step_key)[1])
        zero_sums = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sums_shape)
        (grads, sums), _ = jax.lax.scan(accumulate, (zeros, zero_sums),
                                        (micro, jnp.arange(accum_steps)))
        tokens = jnp.maximum(sums["tokens"], 1.0)
        grads = jax.tree.map(lambda g: g / tokens, grads)
        loss = sums["ce_sum"] / tokens
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        updates, new_opt = tx.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        bad = (~finite).astype(jnp.int32)
        new_state = TrainState(
            params=keep(new_params, state.params), opt_state=keep(new_opt, state.opt_state),
            step=state.step + 1, bad_in_a_row=(state.bad_in_a_row + bad) * bad,
            bad_total=state.bad_total + bad)
        metrics = {"loss": loss, "z_loss": sums["z_sum"] / tokens, "grad_norm": grad_norm,
                   "tokens": sums["tokens"], "finite": finite,
                   "bad_in_a_row": new_state.bad_in_a_row,
                   # optax's count, which the schedule reads: skipped steps do not advance it
                   "optimizer_step": state.step - state.bad_total,
                   **{k: v / tokens for k, v in sums.items() if k.startswith("aux/")}}
        return new_state, metrics

    return train_step
