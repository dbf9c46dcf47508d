"""SwiGLU feed-forward: down(silu(gate x) * up x) (Llama 2 §2.2, Shazeer 2020)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.config import ModelConfig
from jaxlm.model.layers import make_param
from jaxlm.sharding import constrain


class SwiGLU(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, layers: int | None = None, rngs: nnx.Rngs):
        self.cfg = cfg
        d, f = cfg.d_model, cfg.ffn_hidden
        self.gate = make_param(rngs, (d, f), ("embed", "mlp"), cfg, layers=layers)
        self.up = make_param(rngs, (d, f), ("embed", "mlp"), cfg, layers=layers)
        self.down = make_param(rngs, (f, d), ("mlp", "embed"), cfg, layers=layers)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, T, D] -> [B, T, D]."""
        dt = self.cfg.compute_dtype
        gate = jnp.einsum("BTD,DF->BTF", x, self.gate[...].astype(dt))
        up = jnp.einsum("BTD,DF->BTF", x, self.up[...].astype(dt))
        hidden = constrain(jax.nn.silu(gate) * up,
                           ("activation_batch", "activation_length", "activation_mlp"))
        return jnp.einsum("BTF,FD->BTD", hidden, self.down[...].astype(dt))
