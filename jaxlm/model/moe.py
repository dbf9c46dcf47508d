"""Sparse mixture of experts: learned router, top-k gates, auxiliary losses (SPEC §10).

An MoE layer replaces the SwiGLU MLP of a decoder block with E SwiGLU experts and a linear
router; each token is processed by its top-k experts, weighted by its gates. How tokens reach the
experts (capacity or dropless, expert-parallel on a mesh) lives in `moe_dispatch`.

Router jitter needs randomness: `MoE.__call__` takes an explicit `rng` (a jax.random key) that
`Transformer.with_aux(..., rng=key)` folds per layer. No key (eval, decode, `model(tokens)`), or
router_jitter = 0 (the default), means no jitter.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.config import Gate, ModelConfig
from jaxlm.model.layers import make_param
from jaxlm.model.moe_dispatch import DISPATCH, ExpertWeights, dropless_dispatch


class MoEMode(NamedTuple):
    """Static per-call choices, set by the Transformer entry point."""

    train: bool = False   # capacity_factor (else eval_capacity_factor); jitter if given a key
    cached: bool = False  # prefill / decode with a KV cache: always dropless (exact, no drops)


# Router ------------------------------------------------------------------------------------------
def _topk_softmax(logits, top_logits, experts):
    """Mixtral: softmax over the k chosen logits (= full softmax renormalised over them)."""
    return jax.nn.softmax(top_logits, axis=-1)


def _softmax(logits, top_logits, experts):
    """Switch §2.1: the full-softmax probability of each chosen expert, not renormalised."""
    return jnp.take_along_axis(jax.nn.softmax(logits, axis=-1), experts, axis=-1)


GATES = {Gate.TOPK_SOFTMAX: _topk_softmax, Gate.SOFTMAX: _softmax}


def route(logits: jax.Array, top_k: int, gate: Gate) -> tuple[jax.Array, jax.Array]:
    """Top-k routing: logits float32 [B, T, E] -> experts int32 [B, T, R], gates float32 [B, T, R].

    Experts are ordered by logit (R = 0 is the 1st choice), which sets the capacity priority.
    """
    top_logits, experts = jax.lax.top_k(logits, top_k)
    return experts.astype(jnp.int32), GATES[gate](logits, top_logits, experts)


# Auxiliary losses --------------------------------------------------------------------------------
def load_balance_loss(probs: jax.Array, experts: jax.Array, valid: jax.Array,
                      ) -> tuple[jax.Array, jax.Array]:
    """Switch §2.2 eq. 4-6: E · Σ_i f_i · P_i (unweighted; 1.0 under uniform routing).

    f_i: fraction of the k·tokens assignments that go to expert i (for k = 1 exactly Switch's
    "fraction of tokens dispatched to i"; for k > 1 each choice counts 1/k, DeepSeekMoE eq. 12).
    HF Mixtral counts the k choices without the 1/k, so its per-layer value is k times this one.
    P_i: mean router probability of expert i. Padding (valid = False) is left out of both means.
    probs [B, T, E], experts [B, T, R], valid [B, T] -> (loss, f [E]).
    """
    n_experts, k = probs.shape[-1], experts.shape[-1]
    weight = valid.astype(jnp.float32)
    n = jnp.maximum(weight.sum(), 1.0)
    counts = jnp.einsum("BTRE,BT->E", jax.nn.one_hot(experts, n_experts, dtype=jnp.float32), weight)
    f = counts / (k * n)
    p = jnp.einsum("BTE,BT->E", probs, weight) / n
    return n_experts * jnp.sum(f * p), f


def router_z_loss(logits: jax.Array, valid: jax.Array) -> jax.Array:
    """ST-MoE §3.1 eq. 5: mean over tokens of logsumexp(logits)² (unweighted)."""
    weight = valid.astype(jnp.float32)
    z = jax.nn.logsumexp(logits, axis=-1)
    return jnp.sum(z * z * weight) / jnp.maximum(weight.sum(), 1.0)


# The layer ---------------------------------------------------------------------------------------
class MoE(nnx.Module):
    """Router [D, E] + E SwiGLU experts gate/up [E, D, F], down [E, F, D].

    Expert weights carry logical axes ("expert", "embed", "mlp"): split over the `expert` mesh axis
    (expert parallelism), F over `tensor`, D over `fsdp` (jaxlm.sharding.RULES). The router's E
    dimension is not split (every token needs every logit); its D is, like any non-expert
    weight's, over `fsdp` and `expert`.
    """

    def __init__(self, cfg: ModelConfig, *, layers: int | None = None, rngs: nnx.Rngs):
        if cfg.moe is None:
            raise ValueError("MoE layer built from a ModelConfig without `moe`; set "
                             "ModelConfig.moe to a MoEConfig")
        self.cfg = cfg
        d, f, e = cfg.d_model, cfg.ffn_hidden, cfg.moe.n_experts
        self.router = make_param(rngs, (d, e), ("embed", None), cfg, layers=layers)
        self.gate = make_param(rngs, (e, d, f), ("expert", "embed", "mlp"), cfg, layers=layers)
        self.up = make_param(rngs, (e, d, f), ("expert", "embed", "mlp"), cfg, layers=layers)
        self.down = make_param(rngs, (e, f, d), ("expert", "mlp", "embed"), cfg, layers=layers)
        self.dispatch = DISPATCH[cfg.moe.dispatch]   # dispatch once (DESIGN)

    def router_logits(self, x: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        """x [B, T, D] -> float32 logits [B, T, E]. Float32 for a stable softmax / top-k (Switch
        §2.4 "selective precision"). With `rng`, the router input is multiplied by U(1-ε, 1+ε)
        (Switch §2.4 jitter; only the router sees it, the experts get x unchanged)."""
        x32 = x.astype(jnp.float32)
        eps = self.cfg.moe.router_jitter
        if rng is not None and eps > 0:
            x32 = x32 * jax.random.uniform(rng, x32.shape, jnp.float32, 1.0 - eps, 1.0 + eps)
        return jnp.einsum("BTD,DE->BTE", x32, self.router[...].astype(jnp.float32))

    def __call__(self, x: jax.Array, valid: jax.Array, mode: MoEMode = MoEMode(),
                 rng: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
        """x [B, T, D], valid [B, T] bool (False = padding) -> (y [B, T, D], aux).

        aux (unweighted, per layer): load_balance, router_z, dropped_fraction (of the valid
        k·tokens assignments), expert_load [E] (f_i, sums to 1), and aux_loss, the weighted sum
        α·load_balance + c_z·router_z the trainer adds to its loss.
        """
        m = self.cfg.moe
        logits = self.router_logits(x, rng if mode.train else None)
        experts, gates = route(logits, m.top_k, m.gate)
        gates = gates * valid[..., None]
        dt = self.cfg.compute_dtype
        w = ExpertWeights(*(p[...].astype(dt) for p in (self.gate, self.up, self.down)))
        dispatch = dropless_dispatch if mode.cached else self.dispatch
        factor = m.capacity_factor if mode.train else m.eval_capacity_factor
        y, kept = dispatch(x, experts, gates, valid, w, capacity_factor=factor,
                           group_size=m.group_size)
        balance, load = load_balance_loss(jax.nn.softmax(logits, axis=-1), experts, valid)
        z = router_z_loss(logits, valid)
        n_assigned = jnp.maximum(valid.sum() * m.top_k, 1)
        aux = {"aux_loss": m.load_balance_coef * balance + m.router_z_coef * z,
               "load_balance": balance, "router_z": z,
               "dropped_fraction": 1.0 - kept.sum() / n_assigned, "expert_load": load}
        return y.astype(x.dtype), aux
