"""The declarative, invertible map between HF `transformers` tensor names and jaxlm parameters.

Each rule names one HF tensor (with `{i}` for the layer index and `{j}` for the expert index), the
jaxlm parameter path, and a Layout that says how the two shapes relate. Every Layout has a forward
(HF -> jaxlm) and an inverse (jaxlm -> HF), and `Rule.entries()` lists each HF tensor with the
index of its slice in the (layer- and expert-stacked) jaxlm parameter, so import and export share
this one table (SPEC §11). Rules are templates (TOP / BLOCK / MLP / MOE) made concrete per config
by `rules_for`, which places HF layer i in its scanned stack (`layer_stacks`).
HF linear weights are stored [out, in]; jaxlm stores [in, ...out] with heads split out.
"""
from __future__ import annotations

import dataclasses
import enum
import math

import jax.numpy as jnp

from jaxlm.config import ModelConfig
from jaxlm.model.transformer import layer_stacks


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
    """One jaxlm parameter and the HF tensor(s) it is made of.

    hf: the HF name; "{i}" is the decoder layer index, "{j}" the expert index.
    layers: the HF layer indices stacked, in order, along our leading "layers" axis (a scanned
    stack; see jaxlm.model.transformer.layer_stacks); () for an unstacked parameter.
    experts: with "{j}", the experts 0..experts-1 stacked along the next axis ("expert").
    """

    hf: str
    ours: tuple[str, ...]      # path in the jaxlm model's nnx.State
    layout: Layout
    layers: tuple[int, ...] = ()
    experts: int = 0

    @property
    def stacked_axes(self) -> int:
        """How many leading axes of our parameter index HF tensors (layers, then experts)."""
        return bool(self.layers) + bool(self.experts)

    def entries(self) -> list[tuple[str, tuple[int, ...]]]:
        """Every HF tensor of this rule with the index of its slice in our parameter; import
        writes `ours[index] = layout.to_ours(hf)`, export reads `layout.to_hf(ours[index])`."""
        if not self.layers:
            return [(self.hf, ())]
        if not self.experts:
            return [(self.hf.format(i=i), (n,)) for n, i in enumerate(self.layers)]
        return [(self.hf.format(i=i, j=j), (n, j))
                for n, i in enumerate(self.layers) for j in range(self.experts)]


# Templates: (HF name, jaxlm path, layout, per expert). Block paths are relative to a layer stack.
_LAYER = "model.layers.{i}."
TOP_RULES: tuple[Rule, ...] = (
    Rule("model.embed_tokens.weight", ("embed", "embedding"), Layout.COPY),
    Rule("model.norm.weight", ("final_norm", "scale"), Layout.COPY),
    Rule("lm_head.weight", ("lm_head",), Layout.LINEAR),
)
BLOCK_RULES = (
    ("input_layernorm.weight", ("attn_norm", "scale"), Layout.COPY, False),
    ("self_attn.q_proj.weight", ("attn", "q"), Layout.SPLIT_OUT, False),
    ("self_attn.k_proj.weight", ("attn", "k"), Layout.SPLIT_OUT, False),
    ("self_attn.v_proj.weight", ("attn", "v"), Layout.SPLIT_OUT, False),
    ("self_attn.o_proj.weight", ("attn", "o"), Layout.SPLIT_IN, False),
    ("post_attention_layernorm.weight", ("mlp_norm", "scale"), Layout.COPY, False),
)
MLP_RULES = (
    ("mlp.gate_proj.weight", ("mlp", "gate"), Layout.LINEAR, False),
    ("mlp.up_proj.weight", ("mlp", "up"), Layout.LINEAR, False),
    ("mlp.down_proj.weight", ("mlp", "down"), Layout.LINEAR, False),
)
# Mixtral's on-disk names (transformers >= 5 fuses experts in memory but saves these, SPEC §11):
# router gate [E, D]; experts w1 = gate, w3 = up [F, D]; w2 = down [D, F].
MOE_RULES = (
    ("block_sparse_moe.gate.weight", ("moe", "router"), Layout.LINEAR, False),
    ("block_sparse_moe.experts.{j}.w1.weight", ("moe", "gate"), Layout.LINEAR, True),
    ("block_sparse_moe.experts.{j}.w3.weight", ("moe", "up"), Layout.LINEAR, True),
    ("block_sparse_moe.experts.{j}.w2.weight", ("moe", "down"), Layout.LINEAR, True),
)

# Tensors some HF checkpoints carry that hold no parameters (recomputed from the config).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def rules_for(cfg: ModelConfig) -> tuple[Rule, ...]:
    """The concrete rules of a config: every stack's blocks with their HF layer indices (MoE FFN
    rules for the MoE stack), and no lm_head for tied embeddings."""
    rules = [r for r in TOP_RULES if not (cfg.tie_embeddings and r.ours == ("lm_head",))]
    for stack, layers in layer_stacks(cfg).items():
        moe = cfg.moe is not None and stack == "layers"
        for hf, ours, layout, per_expert in BLOCK_RULES + (MOE_RULES if moe else MLP_RULES):
            experts = cfg.moe.n_experts if per_expert else 0
            rules.append(Rule(_LAYER + hf, (stack, *ours), layout, layers, experts))
    return tuple(rules)
