"""Import Hugging Face Llama / Mistral / Mixtral checkpoints straight from safetensors (no torch).

    from jaxlm.convert import hf
    model = hf.load("path/to/hf_dir")          # nnx Transformer; model(tokens) -> logits
    model = hf.load(path, mesh=mesh)           # parameters placed in the sharding table's layout
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from safetensors import safe_open

from jaxlm.config import ModelConfig
from jaxlm.convert.names import IGNORED_SUFFIXES, rules_for
from jaxlm.model import Transformer
from jaxlm.sharding import state_shardings

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM")


def read_hf_config(path: str | Path) -> dict[str, Any]:
    file = Path(path) / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no config.json; pass a Hugging Face model directory "
                                "(config.json + *.safetensors)")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None


def config_from_hf(hf: dict[str, Any], *, source: str = "config.json", **overrides) -> ModelConfig:
    """ModelConfig from a transformers config dict; unsupported features raise, naming the field."""
    arch = (hf.get("architectures") or ["?"])[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"{source}: architectures={arch!r} is not supported; jaxlm imports "
                         f"{list(SUPPORTED_ARCHITECTURES)}")
    for field, ok in (("hidden_act", lambda v: v in (None, "silu")),
                      ("attention_bias", lambda v: not v), ("mlp_bias", lambda v: not v)):
        if not ok(hf.get(field)):
            raise ValueError(f"{source}: {field}={hf.get(field)!r} is not supported "
                             "(jaxlm models use SwiGLU with silu and no biases)")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ValueError(f"{source}: rope scaling {rope!r} is not supported (only default RoPE)")
    # transformers >= 5 nests rope_theta in rope_parameters; older configs have it top level.
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    missing = [f for f in ("num_attention_heads", "vocab_size", "hidden_size", "num_hidden_layers",
                           "intermediate_size") if f not in hf]
    if missing:
        raise ValueError(f"{source}: required field(s) {', '.join(missing)} missing; is this "
                         "the config.json of a Llama / Mistral / Mixtral model?")
    heads = hf["num_attention_heads"]
    dtype = str(hf.get("dtype") or hf.get("torch_dtype") or "float32")
    fields = dict(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
        n_heads=heads, n_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        ffn_hidden=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 4096),
        sliding_window=hf.get("sliding_window") if arch != "LlamaForCausalLM" else None,
        rope_theta=float(theta), norm_eps=hf.get("rms_norm_eps", 1e-5),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        param_dtype=dtype if dtype in ("float32", "bfloat16") else "float32",
    )
    if arch == "MixtralForCausalLM":
        fields["moe"] = moe_from_hf(hf)
    fields.update(overrides)
    try:
        return ModelConfig(**fields)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None


def moe_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """MoEConfig fields of a Mixtral config (SPEC §10, §11): every layer MoE, dropless (exact)."""
    k = hf.get("num_experts_per_tok", 2)
    return dict(
        n_experts=hf.get("num_local_experts", 8), top_k=k, every=1, dispatch="dropless",
        # HF's load-balancing loss counts all k choices, so it is k x ours (jaxlm.model.moe):
        # the same training objective needs α = k · router_aux_loss_coef.
        load_balance_coef=k * hf.get("router_aux_loss_coef", 0.001),
        # HF jitters the whole MoE input; jaxlm only the router's (Switch §2.4). Off (0) by default.
        router_jitter=float(hf.get("router_jitter_noise") or 0.0))


class SafetensorsReader:
    """Lazy access to the tensors of a directory: model.safetensors, a sharded index, or *.safetensors."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError
            except (ValueError, KeyError, TypeError):  # truncated download, or not an index
                raise ValueError(f"{index}: not a safetensors index (valid JSON with a "
                                 "\"weight_map\" object); download it again") from None
            self.where = {name: self.path / file for name, file in weight_map.items()}
            for file in set(self.where.values()):
                if not file.is_file():
                    raise FileNotFoundError(f"{index} lists {file.name}, which is missing")
        else:
            files = sorted(self.path.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"{self.path}: no model.safetensors, index or *.safetensors "
                                        "files (convert .bin checkpoints with transformers first)")
            self.where = {}
            for file in files:
                with safe_open(file, framework="flax") as f:
                    self.where.update({name: file for name in f.keys()})
        self._handles: dict[Path, Any] = {}

    def names(self) -> set[str]:
        return set(self.where)

    def _handle(self, name: str):
        file = self.where[name]
        if file not in self._handles:
            self._handles[file] = safe_open(file, framework="flax")
        return self._handles[file]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def get(self, name: str) -> jax.Array:
        return self._handle(name).get_tensor(name)


def load_params(path: str | Path, cfg: ModelConfig, abstract: nnx.State, *,
                progress: bool = False) -> dict:
    """Read every parameter of `cfg` from `path` into a pure dict matching `abstract` (host arrays).

    Stacked parameters are assembled one layer tensor at a time, but every converted parameter
    stays in the dict: peak host memory is about the whole model plus one stacked parameter's
    slices. progress: one line per parameter on stderr (a 7B import takes minutes).
    """
    reader = SafetensorsReader(path)
    pure = nnx.to_pure_dict(abstract)
    used: set[str] = set()
    rules = rules_for(cfg)
    for k, rule in enumerate(rules):
        if progress:
            print(f"  reading {'.'.join(rule.ours)} ({k + 1}/{len(rules)})", file=sys.stderr,
                  flush=True)
        node = pure
        for key in rule.ours[:-1]:
            node = node[key]
        target = node[rule.ours[-1]]
        ours_shape = tuple(target.shape[rule.stacked_axes:])
        expected = rule.layout.hf_shape(ours_shape)
        tensors = {}
        for name, index in rule.entries():
            if name not in reader.where:
                raise ValueError(f"{path}: tensor {name!r} is missing (needed for "
                                 f"{'.'.join(rule.ours)}); the checkpoint does not match config.json")
            got = reader.shape(name)
            if got != expected:
                raise ValueError(f"{path}: tensor {name!r} has shape {list(got)}, expected "
                                 f"{list(expected)} from config.json")
            tensors[index] = rule.layout.to_ours(reader.get(name), ours_shape).astype(target.dtype)
            used.add(name)
        node[rule.ours[-1]] = _assemble(tensors, target.shape[:rule.stacked_axes])
    extra = sorted(n for n in reader.names() - used if not n.endswith(IGNORED_SUFFIXES))
    if extra:
        raise ValueError(f"{path}: unexpected tensor(s) {extra[:5]}{' ...' if len(extra) > 5 else ''}"
                         " that a Llama/Mistral/Mixtral model does not have; is this another "
                         "architecture?")
    return pure


def _assemble(tensors: dict[tuple[int, ...], jax.Array], stacked: tuple[int, ...]) -> jax.Array:
    """Stack slices keyed by their index (layer, expert) into one [*stacked, ...] array."""
    if not stacked:
        return tensors[()]
    return jnp.stack([_assemble({k[1:]: v for k, v in tensors.items() if k[0] == n}, stacked[1:])
                      for n in range(stacked[0])])


def load(path: str | Path, *, mesh: jax.sharding.Mesh | None = None, progress: bool = False,
         **overrides) -> Transformer:
    """An nnx Transformer with the weights of the HF directory `path`.

    overrides: ModelConfig fields to change (e.g. dtype="bfloat16", remat="full").
    With `mesh`, each parameter is placed in its sharding from jaxlm.sharding.RULES.
    progress: a line per parameter read, on stderr.
    """
    cfg = config_from_hf(read_hf_config(path), source=str(Path(path) / "config.json"), **overrides)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    pure = load_params(path, cfg, abstract, progress=progress)
    nnx.replace_by_pure_dict(abstract, pure)
    if mesh is not None:
        abstract = jax.device_put(abstract, state_shardings(abstract, mesh))
    return nnx.merge(graphdef, abstract)
