"""Model configuration: a frozen, validated dataclass and the named presets (SPEC.md §1)."""
from __future__ import annotations

import dataclasses
import enum
import math
from typing import Any

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

    def param_count(self) -> int:
        """Closed-form parameter count (tests check it against jax.eval_shape of the model)."""
        d, h = self.d_model, self.head_dim
        attn = d * h * (2 * self.n_heads + 2 * self.n_kv_heads)
        mlp = 3 * d * self.ffn_hidden
        per_layer = attn + mlp + 2 * d
        head = 0 if self.tie_embeddings else d * self.vocab_size
        return self.vocab_size * d + self.n_layers * per_layer + d + head

    # (De)serialisation ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["remat"] = self.remat.value
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "config") -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"{source}: unknown ModelConfig field(s) {unknown}; "
                             f"valid fields are {sorted(names)}")
        return cls(**d)

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
    # CPU-sized: the demo model (~15M parameters with a 32k vocabulary).
    "tiny": ModelConfig(
        vocab_size=32000, d_model=256, n_layers=4, n_heads=8, n_kv_heads=2, head_dim=32,
        ffn_hidden=704, max_seq_len=1024),
    # Test-sized: compiles in seconds; heads/vocab divisible by every emulated mesh axis.
    "test": ModelConfig(
        vocab_size=256, d_model=64, n_layers=2, n_heads=8, n_kv_heads=4, head_dim=8,
        ffn_hidden=128, max_seq_len=128),
    "test_swa": ModelConfig(
        vocab_size=256, d_model=64, n_layers=2, n_heads=8, n_kv_heads=2, head_dim=8,
        ffn_hidden=128, max_seq_len=128, sliding_window=8),
}


def get_preset(name: str, **overrides) -> ModelConfig:
    """A preset by name, with optional field overrides (validated like any config)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]
