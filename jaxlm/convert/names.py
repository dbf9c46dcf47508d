"""The declarative, invertible map between HF `transformers` tensor names and jaxlm parameters.

Each rule names one HF tensor (with `{i}` for the layer index), the jaxlm parameter path, and a
Layout that says how the two shapes relate. Every Layout has a forward (HF -> jaxlm) and an
inverse (jaxlm -> HF) so import and export share this one table (SPEC §11).
HF linear weights are stored [out, in]; jaxlm stores [in, ...out] with heads split out.
"""
from __future__ import annotations

import dataclasses
import enum
import math

import jax.numpy as jnp

from jaxlm.config import ModelConfig


class Layout(enum.Enum):
    COPY = "copy"            # same shape (embeddings, norm scales)
    LINEAR = "linear"        # HF [out, in] <-> ours [in, out]
    SPLIT_OUT = "split_out"  # HF [X*H, D] <-> ours [D, X, H]   (q, k, v projections)
    SPLIT_IN = "split_in"    # HF [D, N*H] <-> ours [N, H, D]   (o projection)

    def hf_shape(self, ours: tuple[int, ...]) -> tuple[int, ...]:
        """The HF tensor shape that corresponds to a jaxlm parameter shape."""
        if self is Layout.COPY:
            return ours
        if self is Layout.LINEAR:
            return ours[::-1]
        if self is Layout.SPLIT_OUT:
            return (math.prod(ours[1:]), ours[0])
        return (ours[-1], math.prod(ours[:-1]))

    def to_ours(self, w, ours_shape: tuple[int, ...]):
        return w if self is Layout.COPY else jnp.transpose(w).reshape(ours_shape)

    def to_hf(self, w):
        if self is Layout.COPY:
            return w
        if self is Layout.LINEAR:
            return jnp.transpose(w)
        if self is Layout.SPLIT_OUT:
            return jnp.transpose(w.reshape(w.shape[0], -1))
        return jnp.transpose(w.reshape(-1, w.shape[-1]))


@dataclasses.dataclass(frozen=True)
class Rule:
    hf: str                    # HF name; "{i}" = layer index for stacked parameters
    ours: tuple[str, ...]      # path in the jaxlm model's nnx.State
    layout: Layout

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf


_LAYER = "model.layers.{i}."
LLAMA_RULES: tuple[Rule, ...] = (
    Rule("model.embed_tokens.weight", ("embed", "embedding"), Layout.COPY),
    Rule(_LAYER + "input_layernorm.weight", ("layers", "attn_norm", "scale"), Layout.COPY),
    Rule(_LAYER + "self_attn.q_proj.weight", ("layers", "attn", "q"), Layout.SPLIT_OUT),
    Rule(_LAYER + "self_attn.k_proj.weight", ("layers", "attn", "k"), Layout.SPLIT_OUT),
    Rule(_LAYER + "self_attn.v_proj.weight", ("layers", "attn", "v"), Layout.SPLIT_OUT),
    Rule(_LAYER + "self_attn.o_proj.weight", ("layers", "attn", "o"), Layout.SPLIT_IN),
    Rule(_LAYER + "post_attention_layernorm.weight", ("layers", "mlp_norm", "scale"), Layout.COPY),
    Rule(_LAYER + "mlp.gate_proj.weight", ("layers", "mlp", "gate"), Layout.LINEAR),
    Rule(_LAYER + "mlp.up_proj.weight", ("layers", "mlp", "up"), Layout.LINEAR),
    Rule(_LAYER + "mlp.down_proj.weight", ("layers", "mlp", "down"), Layout.LINEAR),
    Rule("model.norm.weight", ("final_norm", "scale"), Layout.COPY),
    Rule("lm_head.weight", ("lm_head",), Layout.LINEAR),
)

# Tensors some HF checkpoints carry that hold no parameters (recomputed from the config).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def rules_for(cfg: ModelConfig) -> tuple[Rule, ...]:
    """The rules that apply to a config (a tied model has no separate lm_head)."""
    return tuple(r for r in LLAMA_RULES if not (cfg.tie_embeddings and r.ours == ("lm_head",)))


def hf_names(rule: Rule, n_layers: int) -> list[str]:
    return [rule.hf.format(i=i) for i in range(n_layers)] if rule.per_layer else [rule.hf]
