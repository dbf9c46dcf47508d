"""Model configuration: a frozen, validated dataclass and the named presets (SPEC.md §1)."""
from __future__ import annotations

import dataclasses
import enum
import math
from typing import Any, Mapping

import jax.numpy as jnp


class Remat(str, enum.Enum):
    """What the backward pass recomputes for each scanned layer (jax.checkpoint policy).

    none:  keep every activation (fastest, most memory).
    full:  keep only each layer's input; recompute the whole layer (least memory).
    dots:  keep matmul outputs without batch dims (weights x activations), recompute the cheap
           element-wise work and attention scores: the usual TPU trade-off.
    """

    NONE = "none"
    FULL = "full"
    DOTS = "dots"


class Dispatch(str, enum.Enum):
    """How routed tokens reach their experts (jaxlm.model.moe_dispatch).

    capacity: GShard / Switch. Each expert takes at most C = ceil(k·T/E·capacity_factor) tokens
              per group (sequence); the rest are dropped and pass through the residual. Static
              shapes: one-hot dispatch/combine einsums, the TPU-friendly path.
    dropless: MegaBlocks / Mixtral inference. Tokens sorted by expert and computed with a grouped
              matmul (jax.lax.ragged_dot); nothing is dropped.
    """

    CAPACITY = "capacity"
    DROPLESS = "dropless"


class Gate(str, enum.Enum):
    """How the gate weights of the k chosen experts are computed from the router logits.

    topk_softmax: softmax over the k selected logits (Mixtral; equal to renormalising the full
                  softmax over the chosen experts, as GShard does for top-2), SPEC §10.
    softmax:      the full-softmax probabilities of the chosen experts, not renormalised (Switch
                  §2.1 with k = 1: the output is scaled by p_i(x)).
    """

    TOPK_SOFTMAX = "topk_softmax"
    SOFTMAX = "softmax"


def _enum_field(owner: str, name: str, cls, value):
    try:
        return cls(value)
    except ValueError:
        raise ValueError(f"{owner}.{name} must be one of {[m.value for m in cls]}, "
                         f"got {value!r}") from None


def _check_int(owner: str, name: str, value, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{owner}.{name} must be an integer >= {minimum}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """Sparse mixture of experts replacing the SwiGLU MLP of every `every`-th layer (SPEC §10).

    Layer i (0-based) is an MoE layer iff (i + 1) % every == 0: every=1 is Mixtral (all layers),
    every=2 is GShard / Switch (every other layer). Experts are SwiGLU MLPs of width
    ModelConfig.ffn_hidden.

    n_experts:            E.
    top_k:                k experts per token (Switch 1; GShard / Mixtral 2).
    capacity_factor:      C = ceil(k·tokens_per_group/E · factor) in training (ST-MoE §2: 1.25)
    eval_capacity_factor: ... and in evaluation (ST-MoE: 2.0). Only the capacity dispatch uses them.
    group_size:           tokens per routing group for the capacity path; None = one sequence.
                          Smaller groups bound the [tokens, E, C] dispatch tensor (GShard §3.2).
    router_jitter:        ε of the multiplicative U(1-ε, 1+ε) jitter on the router input in
                          training (Switch §2.4 / HF router_jitter_noise); 0 = off.
    load_balance_coef:    α of the Switch load-balancing loss α·E·Σ f_i·P_i (Switch §2.2: 0.01).
    router_z_coef:        c_z of the ST-MoE router z-loss (ST-MoE §3.1: 0.001).
    """

    n_experts: int
    top_k: int = 2
    every: int = 1
    capacity_factor: float = 1.25
    eval_capacity_factor: float = 2.0
    group_size: int | None = None
    dispatch: Dispatch = Dispatch.DROPLESS
    gate: Gate = Gate.TOPK_SOFTMAX
    router_jitter: float = 0.0
    load_balance_coef: float = 0.01
    router_z_coef: float = 0.001

    def __post_init__(self):
        _check_int("MoEConfig", "n_experts", self.n_experts)
        _check_int("MoEConfig", "top_k", self.top_k)
        _check_int("MoEConfig", "every", self.every)
        if self.top_k > self.n_experts:
            raise ValueError(f"MoEConfig.top_k ({self.top_k}) must be <= n_experts "
                             f"({self.n_experts})")
        if self.group_size is not None:
            _check_int("MoEConfig", "group_size", self.group_size)
        for name in ("capacity_factor", "eval_capacity_factor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"MoEConfig.{name} must be a number > 0, got {value!r}")
        if not isinstance(self.router_jitter, (int, float)) or not 0 <= self.router_jitter < 1:
            raise ValueError(f"MoEConfig.router_jitter must be in [0, 1) (0 = off), "
                             f"got {self.router_jitter!r}")
        for name in ("load_balance_coef", "router_z_coef"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"MoEConfig.{name} must be a number >= 0, got {value!r}")
        object.__setattr__(self, "dispatch", _enum_field("MoEConfig", "dispatch", Dispatch,
                                                         self.dispatch))
        object.__setattr__(self, "gate", _enum_field("MoEConfig", "gate", Gate, self.gate))

    def is_moe_layer(self, i: int) -> bool:
        return (i + 1) % self.every == 0

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["dispatch"], out["gate"] = self.dispatch.value, self.gate.value
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "config") -> "MoEConfig":
        return _from_dict(cls, d, source)


def _from_dict(cls, d: dict[str, Any], source: str):
    """cls(**d), with one clear error naming any field the dataclass does not have."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"{source}: unknown {cls.__name__} field(s) {unknown}; "
                         f"valid fields are {sorted(names)}")
    return cls(**d)


_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def llama_ffn_hidden(d_model: int, multiple_of: int, ffn_dim_multiplier: float | None = None) -> int:
    """Meta's reference FFN width rule: h = int(2*4d/3), optionally scaled, rounded up (SPEC §1)."""
    hidden = int(2 * 4 * d_model / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * math.ceil(hidden / multiple_of)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A Llama-2 / Mistral decoder. Every field is checked in __post_init__.

    sliding_window: None for full causal attention; W for Mistral's window, where query i sees
    keys j with i - W < j <= i (W keys, the HF / xformers convention, SPEC §1).
    dtype is the compute dtype; param_dtype the storage dtype. Norms, softmax, RoPE and the
    logits are computed in float32 regardless (numerical range).
    moe: None for a dense model, or a MoEConfig (a nested dict in to_dict / from_dict) that puts
    a sparse mixture of experts in place of the MLP of every `moe.every`-th layer.
    """

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_hidden: int
    max_seq_len: int = 4096
    sliding_window: int | None = None
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: Remat = Remat.NONE
    moe: MoEConfig | None = None

    def __post_init__(self):
        positive = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                    "ffn_hidden", "max_seq_len")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"ModelConfig.n_kv_heads ({self.n_kv_heads}) must divide n_heads ({self.n_heads}):"
                " each kv head serves n_heads/n_kv_heads query heads (GQA)")
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim must be even for RoPE (rotates pairs of "
                             f"dimensions), got {self.head_dim}")
        if self.sliding_window is not None and (
                not isinstance(self.sliding_window, int) or self.sliding_window < 1):
            raise ValueError(f"ModelConfig.sliding_window must be None (full attention) or an "
                             f"integer >= 1, got {self.sliding_window!r}")
        if not self.rope_theta > 0:
            raise ValueError(f"ModelConfig.rope_theta must be > 0, got {self.rope_theta}")
        if not 0 < self.norm_eps < 1:
            raise ValueError(f"ModelConfig.norm_eps must be in (0, 1), got {self.norm_eps}")
        if not self.init_std > 0:
            raise ValueError(f"ModelConfig.init_std must be > 0, got {self.init_std}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ValueError(f"ModelConfig.{name} must be one of {sorted(_DTYPES)}, "
                                 f"got {getattr(self, name)!r}")
        try:
            object.__setattr__(self, "remat", Remat(self.remat))
        except ValueError:
            raise ValueError(f"ModelConfig.remat must be one of "
                             f"{[r.value for r in Remat]}, got {self.remat!r}") from None
        if self.moe is not None and not isinstance(self.moe, MoEConfig):
            # From JSON or an ml_collections ConfigDict: a nested mapping.
            moe = self.moe.to_dict() if hasattr(self.moe, "to_dict") else self.moe
            if not isinstance(moe, Mapping):
                raise ValueError(f"ModelConfig.moe must be None (dense), a MoEConfig or a dict of "
                                 f"its fields, got {type(self.moe).__name__}")
            object.__setattr__(self, "moe", MoEConfig.from_dict(dict(moe), source="ModelConfig.moe"))
        if self.moe is not None:
            if self.n_layers % self.moe.every:
                raise ValueError(f"ModelConfig.moe.every ({self.moe.every}) must divide n_layers "
                                 f"({self.n_layers}): layers are scanned in groups of `every` "
                                 "blocks, the last of each group being the MoE block")

    # Derived quantities -------------------------------------------------------------------------
    @property
    def group_size(self) -> int:
        """G: query heads per kv head."""
        return self.n_heads // self.n_kv_heads

    @property
    def compute_dtype(self):
        return _DTYPES[self.dtype]

    @property
    def weight_dtype(self):
        return _DTYPES[self.param_dtype]

    @property
    def n_moe_layers(self) -> int:
        return 0 if self.moe is None else self.n_layers // self.moe.every

    def param_count(self, *, active: bool = False) -> int:
        """Closed-form parameter count (tests check it against jax.eval_shape of the model).

        active=True counts what one token uses: k of the E experts of each MoE layer (the
        router counts in full). Equal to the total for a dense model.
        """
        d, h = self.d_model, self.head_dim
        attn = d * h * (2 * self.n_heads + 2 * self.n_kv_heads)
        mlp = 3 * d * self.ffn_hidden
        per_layer = attn + mlp + 2 * d
        head = 0 if self.tie_embeddings else d * self.vocab_size
        total = self.vocab_size * d + self.n_layers * per_layer + d + head
        if self.moe is not None:  # an MoE layer has E (k active) expert MLPs and a router [D, E]
            experts = self.moe.top_k if active else self.moe.n_experts
            total += self.n_moe_layers * ((experts - 1) * mlp + d * self.moe.n_experts)
        return total

    def active_param_count(self) -> int:
        """Parameters used per token (Mixtral 8x7B: 12.9B of 46.7B, SPEC §10)."""
        return self.param_count(active=True)

    # (De)serialisation ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["remat"] = self.remat.value
        out["moe"] = None if self.moe is None else self.moe.to_dict()
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "config") -> "ModelConfig":
        return _from_dict(cls, d, source)

    def replace(self, **changes) -> "ModelConfig":
        return ModelConfig.from_dict({**self.to_dict(), **changes}, source="replace()")


# Presets ----------------------------------------------------------------------------------------
# The four big presets are SPEC.md §1 (Llama 2 paper Table 1 / Meta reference code, Mistral §2).
PRESETS: dict[str, ModelConfig] = {
    "llama2_7b": ModelConfig(
        vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, head_dim=128,
        ffn_hidden=llama_ffn_hidden(4096, 256), max_seq_len=4096),
    "llama2_13b": ModelConfig(
        vocab_size=32000, d_model=5120, n_layers=40, n_heads=40, n_kv_heads=40, head_dim=128,
        ffn_hidden=llama_ffn_hidden(5120, 256), max_seq_len=4096),
    "llama2_70b": ModelConfig(
        vocab_size=32000, d_model=8192, n_layers=80, n_heads=64, n_kv_heads=8, head_dim=128,
        ffn_hidden=llama_ffn_hidden(8192, 4096, 1.3), max_seq_len=4096),
    "mistral_7b": ModelConfig(
        vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128,
        ffn_hidden=14336, max_seq_len=8192, sliding_window=4096),
    # The shared benchmark model (../shared/bench/config.json): 55M parameters, GQA 8/2, SWA 256.
    "bench": ModelConfig(
        vocab_size=32000, d_model=512, n_layers=8, n_heads=8, n_kv_heads=2, head_dim=64,
        ffn_hidden=1408, max_seq_len=2048, sliding_window=256),
    # CPU-sized: the demo model (10.5M parameters with an 8k vocabulary), GQA 4/2.
    "tiny": ModelConfig(
        vocab_size=8192, d_model=256, n_layers=8, n_heads=4, n_kv_heads=2, head_dim=64,
        ffn_hidden=768, max_seq_len=1024),
    # Test-sized: compiles in seconds; heads/vocab divisible by every emulated mesh axis.
    "test": ModelConfig(
        vocab_size=256, d_model=64, n_layers=2, n_heads=8, n_kv_heads=4, head_dim=8,
        ffn_hidden=128, max_seq_len=128),
    "test_swa": ModelConfig(
        vocab_size=256, d_model=64, n_layers=2, n_heads=8, n_kv_heads=2, head_dim=8,
        ffn_hidden=128, max_seq_len=128, sliding_window=8),
}

# Sparse MoE presets (SPEC §10). Mixtral 8x7B: Mistral-7B shapes with 8 experts, top-2 in every
# layer, rope θ 1e6, no sliding window; 46.7B parameters, 12.9B active (Mixtral paper §2).
PRESETS["mixtral_8x7b"] = ModelConfig(
    vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128,
    ffn_hidden=14336, max_seq_len=32768, rope_theta=1e6,
    moe=MoEConfig(n_experts=8, top_k=2, every=1, dispatch=Dispatch.DROPLESS))
# Gemini-style (Gemini 1.5 report §2 says only "sparse MoE Transformer with learned routing"; the
# shapes are ours): top-2 routing in every other layer (GShard §2.1), capacity dispatch for TPU
# pods with ST-MoE's factors, groups of 1024 tokens to bound the dispatch tensor (GShard §3.2).
# Fixed active size (~10.1B) while E grows: 8e ≈ 27B, 16e ≈ 50B, 32e ≈ 95B parameters in total.
for _e in (8, 16, 32):
    PRESETS[f"gemini_moe_{_e}e"] = ModelConfig(
        vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128,
        ffn_hidden=14336, max_seq_len=8192, rope_theta=1e4,
        moe=MoEConfig(n_experts=_e, top_k=2, every=2, dispatch=Dispatch.CAPACITY,
                      group_size=1024))
# CPU demo: the `tiny` preset with 8 half-width experts, top-2 in every layer, so the active size
# per token equals `tiny` (2 half-width experts = one full MLP, plus the router) with 4x its MLP
# parameters in total.
PRESETS["tiny_moe"] = PRESETS["tiny"].replace(
    ffn_hidden=PRESETS["tiny"].ffn_hidden // 2,
    moe=dict(n_experts=8, top_k=2, every=1, dispatch="capacity"))
# Test-sized: E = 8 so every emulated expert mesh axis (2, 4, 8) divides it.
PRESETS["test_moe"] = PRESETS["test"].replace(
    ffn_hidden=64, moe=dict(n_experts=8, top_k=2, every=1, dispatch="dropless"))


def get_preset(name: str, **overrides) -> ModelConfig:
    """A preset by name, with optional field overrides (validated like any config)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]
