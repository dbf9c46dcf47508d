"""SwiGLU feed-forward: down(silu(gate x) * up x) (Llama 2 §2.2, Shazeer 2020)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.config import ModelConfig
from jaxlm.kernels.matvec import weight_einsum
from jaxlm.model.layers import make_param
from jaxlm.sharding import constrain

HIDDEN = ("activation_batch", "activation_length", "activation_mlp")


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
        return swiglu(x, self.gate[...].astype(dt), self.up[...].astype(dt),
                      self.down[...].astype(dt))


@jax.custom_vjp
def swiglu(x: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array) -> jax.Array:
    """x [B, T, D]; gate, up [D, F]; down [F, D] -> [B, T, D].

    The gradient is written by hand. JAX's own keeps four [B, T, F] residuals for silu and, in
    the weight gradients, lets XLA:CPU transpose the [B, T, F] activations fused with the silu
    backward (a slow strided loop: 110 ms per layer on the bench config). Here the backward keeps
    only the gate and up pre-activations and contracts over the tokens with the small [B, T, D]
    operand in the transposed role. Measured on the bench config (8 layers, 8x512 tokens):
    forward + backward 2.8 s -> 2.4 s.
    """
    return _swiglu_fwd(x, gate, up, down)[0]


def _swiglu_fwd(x, gate, up, down):
    g = weight_einsum("BTD,DF->BTF", x, gate)
    u = weight_einsum("BTD,DF->BTF", x, up)
    hidden = constrain(jax.nn.silu(g) * u, HIDDEN)
    return weight_einsum("BTF,FD->BTD", hidden, down), (x, gate, up, down, g, u)


def _swiglu_bwd(res, dy):
    x, gate, up, down, g, u = res
    g32, u32 = g.astype(jnp.float32), u.astype(jnp.float32)
    sig = jax.nn.sigmoid(g32)
    act = g32 * sig                                         # silu(g)
    hidden = (act * u32).astype(x.dtype)
    d_hidden = jnp.einsum("BTD,FD->BTF", dy, down, preferred_element_type=jnp.float32)
    d_up = (d_hidden * act).astype(x.dtype)
    d_gate = (d_hidden * u32 * sig * (1.0 + g32 * (1.0 - sig))).astype(x.dtype)  # silu'(g)
    d_up, d_gate = constrain(d_up, HIDDEN), constrain(d_gate, HIDDEN)
    dx = jnp.einsum("BTF,DF->BTD", d_gate, gate) + jnp.einsum("BTF,DF->BTD", d_up, up)
    return (dx,
            jnp.einsum("BTD,BTF->DF", x, d_gate),
            jnp.einsum("BTD,BTF->DF", x, d_up),
            # Contract with the small dy as the transposed operand, then transpose the [D, F]
            # result: hidden^T dy would make XLA:CPU transpose the [B, T, F] activations.
            jnp.einsum("BTD,BTF->DF", dy, hidden).T)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)
