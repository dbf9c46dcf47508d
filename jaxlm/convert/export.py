"""Export a jaxlm model directory to a Hugging Face directory that transformers and vLLM load as is.

    python -m jaxlm.convert export-hf --src CKPT_DIR --dst HF_DIR

Writes config.json (LlamaForCausalLM; MistralForCausalLM with `sliding_window`; MixtralForCausalLM
for MoE models), model.safetensors (or model-0000k-of-0000n.safetensors + an index above
`max_shard_bytes`), generation_config.json, and the SentencePiece tokenizer files. Tensor names and
layouts come from the same rule table as import (jaxlm.convert.names), inverted.

Memory: the parameters once (restored from orbax) plus one shard of converted tensors; a shard is
converted, written and dropped before the next one starts. Everything is written to a temporary
sibling directory that is renamed into place at the end (jaxlm.convert.staging), so a failure
writes nothing.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import jax
from flax import nnx
from safetensors.flax import save_file

from jaxlm.config import Gate, ModelConfig
from jaxlm.convert.names import Rule, rules_for
from jaxlm.tokenizer import Tokenizer

DEFAULT_MAX_SHARD_BYTES = 5 * 2**30      # transformers' default max_shard_size ("5GB")
_DTYPES = ("float32", "bfloat16")


def hf_config(cfg: ModelConfig, dtype: str, bos_id: int = 1, eos_id: int = 2) -> dict[str, Any]:
    """The transformers config.json of `cfg` (the inverse of jaxlm.convert.hf.config_from_hf)."""
    if cfg.moe is not None:
        arch, model_type = "MixtralForCausalLM", "mixtral"
    elif cfg.sliding_window is not None:
        arch, model_type = "MistralForCausalLM", "mistral"
    else:
        arch, model_type = "LlamaForCausalLM", "llama"
    out = {
        "architectures": [arch], "model_type": model_type,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_hidden, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        # transformers >= 5 reads rope_parameters; vLLM and older transformers read rope_theta.
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False, "mlp_bias": False,
        "bos_token_id": bos_id, "eos_token_id": eos_id, "dtype": dtype, "torch_dtype": dtype,
        "use_cache": True,
    }
    if arch != "LlamaForCausalLM":
        out["sliding_window"] = cfg.sliding_window
    if cfg.moe is not None:
        moe = cfg.moe
        if moe.every != 1:
            raise ValueError(f"moe.every={moe.every}: Mixtral has an MoE FFN in every layer, so only "
                             "moe.every=1 models can be exported to transformers")
        if moe.gate is not Gate.TOPK_SOFTMAX:
            raise ValueError(f"moe.gate={moe.gate.value!r}: Mixtral renormalises the softmax over "
                             "the selected experts; only gate='topk_softmax' exports exactly")
        # HF's load-balancing loss is top_k x ours (see config_from_hf): divide to keep α.
        out.update(num_local_experts=moe.n_experts, num_experts_per_tok=moe.top_k,
                   router_aux_loss_coef=moe.load_balance_coef / moe.top_k,
                   output_router_logits=False, router_jitter_noise=0.0)
    return out


def hf_tensor_sizes(cfg: ModelConfig, params: dict, itemsize: int) -> list[tuple[str, Rule, tuple, int]]:
    """Every HF tensor (name, rule, slice index, bytes) in file order, from the shapes of `params`."""
    out = []
    for rule in rules_for(cfg):
        shape = _get(params, rule.ours).shape[rule.stacked_axes:]
        nbytes = math.prod(rule.layout.hf_shape(shape)) * itemsize
        out += [(name, rule, index, nbytes) for name, index in rule.entries()]
    return out


def plan_shards(sizes: list[int], max_bytes: int) -> list[list[int]]:
    """Greedy contiguous grouping of tensor indices into shards of at most max_bytes each
    (a single tensor larger than max_bytes gets a shard of its own, as in transformers)."""
    shards: list[list[int]] = [[]]
    used = 0
    for i, n in enumerate(sizes):
        if shards[-1] and used + n > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(i)
        used += n
    return shards


def is_hf_model_directory(directory: str | Path) -> bool:
    """True if `directory` holds a transformers model: a config.json naming its architectures."""
    from jaxlm.checkpoint import config_json

    return bool(config_json(directory).get("architectures"))


def export_hf(src: str | Path, dst: str | Path, *, dtype: str | None = None,
              overwrite: bool = False, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
              progress: bool = True) -> Path:
    """Write the HF directory `dst` from the jaxlm model directory `src` (see module docstring)."""
    from jaxlm.checkpoint import load_model, read_model_config
    from jaxlm.convert.staging import check_destination, staged_directory
    from jaxlm.paths import is_remote

    for flag, path in (("--src", src), ("--dst", dst)):
        if is_remote(path):  # the tokenizer is read and the export renamed into place locally
            raise ValueError(f"{flag} {path}: export-hf reads and writes local directories only; "
                             f"copy the model down first (gcloud storage cp -r SRC .) and the "
                             f"export up after (gcloud storage cp -r DST gs://...)")
    check_destination(src, dst, overwrite=overwrite, replaceable=is_hf_model_directory,
                      kind="a Hugging Face model directory (config.json with architectures)")
    src, dst = Path(src), Path(dst)
    if dtype is not None and dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r}: choose one of {_DTYPES}")
    cfg = read_model_config(src)
    dtype = dtype or cfg.param_dtype
    tok = _tokenizer_ids(src)
    config = hf_config(cfg, dtype, *tok[1:])  # validates MoE exportability before any I/O
    model = load_model(src)                   # checks saved shapes against config.json first
    params = jax.device_get(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    del model

    tensors = hf_tensor_sizes(cfg, params, jax.numpy.dtype(dtype).itemsize)
    shards = plan_shards([t[3] for t in tensors], max_shard_bytes)
    with staged_directory(dst, "export") as staged:
        tmp = Path(staged)
        files = (["model.safetensors"] if len(shards) == 1 else
                 [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))])
        weight_map = {}
        done, total = 0, sum(t[3] for t in tensors)
        for file, shard in zip(files, shards):
            out = {}
            for i in shard:
                name, rule, index, nbytes = tensors[i]
                out[name] = _hf_tensor(params, rule, index, dtype)
                weight_map[name] = file
                done += nbytes
            save_file(out, tmp / file, metadata={"format": "pt"})
            del out
            if progress:
                print(f"  wrote {file} ({done / 2**20:.1f} / {total / 2**20:.1f} MiB)", flush=True)
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        generation = {"bos_token_id": tok[1], "eos_token_id": tok[2], "do_sample": True,
                      "temperature": 0.6, "top_p": 0.9}  # Meta's chat defaults (SPEC §2)
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        if tok[0] is not None:
            write_tokenizer_files(tok[0], tmp, cfg.max_seq_len)
        elif progress:
            print(f"  note: {src} has no tokenizer.model; the export has no tokenizer files")
    return dst


def _get(tree: dict, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def _tokenizer_ids(src: Path) -> tuple[Path | None, int, int]:
    """(tokenizer.model or None, bos id, eos id); SPEC §2 ids when there is no tokenizer."""
    file = src / "tokenizer.model"
    if not file.is_file():
        return None, 1, 2
    tokenizer = Tokenizer(file)
    return file, tokenizer.bos_id, tokenizer.eos_id


def write_tokenizer_files(model_file: Path, dst: Path, max_len: int) -> None:
    """tokenizer.model + tokenizer_config.json / special_tokens_map.json: what transformers'
    LlamaTokenizer (and vLLM through it) needs to load a SentencePiece model from `dst`."""
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    shutil.copy(model_file, dst / "tokenizer.model")
    special = {"bos_token": sp.id_to_piece(sp.bos_id()), "eos_token": sp.id_to_piece(sp.eos_id()),
               "unk_token": sp.id_to_piece(sp.unk_id())}
    config = {"tokenizer_class": "LlamaTokenizer", **special, "add_bos_token": True,
              "add_eos_token": False, "model_max_length": max_len, "legacy": False,
              "clean_up_tokenization_spaces": False}
    (dst / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (dst / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def _hf_tensor(params: dict, rule: Rule, index: tuple, dtype: str) -> jax.Array:
    """One HF tensor: the slice `index` (layer, expert) of our parameter, in HF's layout."""
    w = _get(params, rule.ours)
    return rule.layout.to_hf(jax.numpy.asarray(w[index] if index else w, dtype))
