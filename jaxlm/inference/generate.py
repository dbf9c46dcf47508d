"""Batched generation: chunked prefill into a KV cache, then a compiled decode loop.

    result = generate(model, [[1, 15043], [1, 306, 626]], max_new_tokens=32,
                      sampling=SamplingConfig(temperature=0.6, top_p=0.9), eos_id=2)
    result.tokens   # generated ids per prompt, up to (excluding) eos

Prompts of different lengths are right-padded; padding gets position -1, which the attention mask
treats as "not a key" and the cache never stores, so each row decodes as if it were alone. Both
prefill (a scan over chunks) and decode (a while_loop, stopping when every row has hit eos) run in
one jitted program: no Python per token.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.inference.sampling import SamplingConfig, sample
from jaxlm.model import Transformer
from jaxlm.model.attention import KVCache


@dataclasses.dataclass
class GenerationResult:
    tokens: list[list[int]]          # generated ids per prompt, eos (if hit) excluded
    finished: list[bool]             # True where the row stopped at eos
    logits: np.ndarray | None = None  # [B, max_new_tokens, V] float32, if return_logits


def default_chunk(model: Transformer, longest_prompt: int) -> int:
    """Chunk size for prefill: the window W for sliding-window models (Mistral §2), else one chunk."""
    w = model.cfg.sliding_window
    return w if w is not None and w < longest_prompt else longest_prompt


def generate(model: Transformer, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             sampling: SamplingConfig = SamplingConfig(), seed: int = 0, eos_id: int | None = None,
             prefill_chunk: int | None = None, return_logits: bool = False) -> GenerationResult:
    """Continue each prompt by up to `max_new_tokens` tokens.

    prefill_chunk: prompt tokens processed per step (default: W for sliding-window models,
    otherwise the whole prompt); attention memory in prefill grows with C·(C + cache size).
    """
    cfg = model.cfg
    if any(np.ndim(p) != 1 for p in prompts):  # lists, NumPy or jax arrays of ids; not ints
        raise ValueError(f"prompts is a list of prompts, each a list of token ids (e.g. [[1, 2, 3]] "
                         f"for one prompt); got {str(list(prompts))[:60]}")
    if len(prompts) == 0 or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (e.g. BOS); got an empty prompt")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    lengths = np.array([len(p) for p in prompts], np.int32)
    longest = int(lengths.max())
    if cfg.sliding_window is None and longest + max_new_tokens > cfg.max_seq_len:
        raise ValueError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                         f"the model's context max_seq_len={cfg.max_seq_len}; shorten the prompt "
                         "or lower max_new_tokens")
    if prefill_chunk is not None and prefill_chunk < 1:  # 0 is an error, not "the default"
        raise ValueError(f"prefill_chunk must be >= 1 (or None for the default), got {prefill_chunk}")
    chunk = default_chunk(model, longest) if prefill_chunk is None else prefill_chunk
    padded = chunk * math.ceil(longest / chunk)
    tokens = np.zeros((len(prompts), padded), np.int32)
    for row, p in enumerate(prompts):
        tokens[row, :len(p)] = p
    model._check_tokens(tokens)

    graphdef, state = nnx.split(model)
    out, steps_done, logits = _generate(
        graphdef, state, jnp.asarray(tokens), jnp.asarray(lengths), jax.random.key(seed),
        chunk=chunk, max_new=max_new_tokens, sampling=sampling, eos_id=eos_id,
        return_logits=return_logits)
    out = np.asarray(out)
    result, finished = [], []
    for row in out:
        stop = np.flatnonzero(row == eos_id) if eos_id is not None else []
        finished.append(len(stop) > 0)
        result.append(row[: stop[0] if len(stop) else len(row)].tolist())
    return GenerationResult(result, finished, None if logits is None else np.asarray(logits))


@functools.partial(jax.jit, static_argnames=("graphdef", "chunk", "max_new", "sampling", "eos_id",
                                             "return_logits"))
def _generate(graphdef, state, tokens, lengths, rng, *, chunk, max_new, sampling, eos_id,
              return_logits):
    model = nnx.merge(graphdef, state)
    b, padded = tokens.shape
    cache = KVCache.create(model.cfg, b, padded + max_new)
    last_hidden, cache = _prefill(model, tokens, lengths, cache, chunk)
    first_logits = model.logits(last_hidden[:, None])[:, 0]            # [B, V]

    rng, key = jax.random.split(rng)
    first = sample(first_logits, key, sampling)
    out = jnp.zeros((b, max_new), jnp.int32).at[:, 0].set(first)
    logits_buf = None
    if return_logits:
        logits_buf = jnp.zeros((b, max_new, first_logits.shape[-1]), jnp.float32)
        logits_buf = logits_buf.at[:, 0].set(first_logits)
    done = first == eos_id if eos_id is not None else jnp.zeros((b,), bool)
    fill = eos_id if eos_id is not None else 0

    def cond(carry):
        step, _, _, _, done, _, _ = carry
        return (step < max_new) & ~jnp.all(done)

    groups = model.layer_groups()  # sliced once, outside the loop (see Transformer.layer_groups)

    def body(carry):
        step, cache, token, out, done, rng, logits_buf = carry
        positions = (lengths + step - 1)[:, None]                         # of `token`
        hidden, cache = model.hidden(token[:, None], positions, cache=cache, layer_groups=groups)
        logits = model.logits(hidden)
        rng, key = jax.random.split(rng)
        nxt = jnp.where(done, fill, sample(logits[:, 0], key, sampling))
        out = out.at[:, step].set(nxt)
        if logits_buf is not None:
            logits_buf = logits_buf.at[:, step].set(logits[:, 0])
        done = done | (nxt == eos_id) if eos_id is not None else done
        return step + 1, cache, nxt, out, done, rng, logits_buf

    carry = (jnp.int32(1), cache.per_layer(), first, out, done, rng, logits_buf)
    step, _, _, out, _, _, logits_buf = jax.lax.while_loop(cond, body, carry)
    # Rows stopped by the loop's early exit keep zeros after `step`; mark them as padding.
    out = jnp.where(jnp.arange(max_new) < step, out, fill)
    return out, step, logits_buf


def _prefill(model: Transformer, tokens, lengths, cache: KVCache, chunk: int):
    """Run the prompt through the model chunk by chunk; returns each row's last hidden state."""
    b, padded = tokens.shape
    index = jnp.arange(padded)
    positions = jnp.where(index < lengths[:, None], index, -1)              # -1 = padding
    as_chunks = lambda a: a.reshape(b, padded // chunk, chunk).transpose(1, 0, 2)

    def step(carry, xs):
        cache, last = carry
        tok, pos = xs
        hidden, cache = model.hidden(tok, pos, cache=cache)                  # [B, C, D]
        is_last = pos == (lengths - 1)[:, None]                              # [B, C]
        found = jnp.einsum("BCD,BC->BD", hidden, is_last.astype(hidden.dtype))
        return (cache, jnp.where(is_last.any(axis=1)[:, None], found, last)), None

    init = (cache, jnp.zeros((b, model.cfg.d_model), model.cfg.compute_dtype))
    (cache, last), _ = jax.lax.scan(step, init, (as_chunks(tokens), as_chunks(positions)))
    return last, cache
