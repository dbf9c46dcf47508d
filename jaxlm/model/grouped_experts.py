"""SwiGLU experts over rows sorted by expert: the grouped matmul of dropless MoE (MegaBlocks).

Input: xs [M, D], the M token-expert assignments sorted by expert; sizes [E], rows per expert (rows
after sum(sizes) belong to no expert and give 0); the E experts' weights. Output: [M, D].

TPU / GPU: three `jax.lax.ragged_dot` calls (those backends lower them to grouped kernels).

CPU: XLA:CPU lowers ragged_dot to a dense masked matmul over every expert (E x the FLOPs), so here
each expert's rows run through a loop of row chunks against that expert's weights, with a
hand-written gradient (`chunked_swiglu`). Chunks are 512 rows while they fit, then one each of
256/128/64/32 for the rest (the binary ladder of the remainder rounded up to 32 rows), so an
expert wastes under 32 rows of compute and most of its rows run as large, efficient GEMMs. Rows a
chunk reads past its expert's end are the next experts' rows, rows past sum(sizes) (tokens of
other devices' experts under expert parallelism) or zero padding: their outputs are overwritten
when the later experts run (experts go in order) or masked at the end, and the backward masks
them to 0 so they add nothing to the weight gradients. Sizes that add up past M are cut to the
rows there are. Reverse mode only (a custom_vjp: no jax.jvp / jacfwd through the CPU form).

Measured on the bench MoE layer (E=8, top-2, 2048 tokens = 4096 assignments, D=512, F=1408;
forward + backward with weight and input gradients; `python experiments/bench.py moe`): the
previous CPU form, a batched matmul over 128-row blocks that gathered each block's expert weights
(`[blocks, D, F]`) and scatter-added their gradients, took 2.0-2.2x the time of the dense SwiGLU of
the same active FLOPs; 128-row blocks in this loop ~1.35x; this chunk ladder with gate and up
fused into one matmul 1.11-1.22x (E=4: 1.05x, E=16: 1.29x).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

CHUNKS = (512, 256, 128, 64, 32)   # row-chunk sizes, largest first; each twice the next
PAD = CHUNKS[-1]                   # rows a chunk may read past the last expert's end


class ExpertWeights(NamedTuple):
    """One layer's E SwiGLU experts: gate, up [E, D, F]; down [E, F, D] (compute dtype)."""

    gate: jax.Array
    up: jax.Array
    down: jax.Array


def row_chunks(start: jax.Array, n_rows: jax.Array, body: Callable, carry, *, limit: int):
    """Run `carry = body(rows, first, valid, carry)` over rows [start, start + n_rows) in chunks.

    `rows` is a static chunk size from CHUNKS, `first` the chunk's first row, `valid` how many of
    its rows are inside the range (the last chunk is padded up to a multiple of CHUNKS[-1], so it
    may read up to CHUNKS[-1] - 1 rows past the range). `limit` (static) bounds n_rows rounded
    up: larger chunk sizes can never be taken and are left out of the program.
    """
    usable = [c for c in CHUNKS if c <= limit] or [CHUNKS[-1]]
    big, small = usable[0], usable[-1]
    rounded = -(-n_rows // small) * small
    n_big = rounded // big
    carry = jax.lax.fori_loop(
        0, n_big, lambda i, c: body(big, start + i * big, jnp.minimum(n_rows - i * big, big), c),
        carry)
    done = n_big * big
    rest = rounded - done                            # < big, a multiple of small
    for rows in usable[1:]:                          # binary ladder: each size at most once
        take = (rest & rows) != 0
        first, left = start + done, n_rows - done
        carry = jax.lax.cond(
            take, lambda c, rows=rows, first=first, left=left:
            body(rows, first, jnp.minimum(left, rows), c), lambda c: c, carry)
        done = done + jnp.where(take, rows, 0)
    return carry


def _rows(a: jax.Array, first: jax.Array, rows: int) -> jax.Array:
    return jax.lax.dynamic_slice_in_dim(a, first, rows)


def _put(a: jax.Array, value: jax.Array, first: jax.Array) -> jax.Array:
    return jax.lax.dynamic_update_slice_in_dim(a, value.astype(a.dtype), first, 0)


def _rows_there_are(sizes: jax.Array, m: int) -> jax.Array:
    """sizes cut so that they add up to at most m (as ragged_dot treats them): a chunk reading
    past the array would have its start clamped by dynamic_slice and overwrite earlier rows."""
    starts = jnp.cumsum(sizes) - sizes
    return jnp.clip(sizes, 0, jnp.maximum(m - starts, 0))


def _varying_like(arrays, *inputs):
    """Inside shard_map a loop carry must vary over the mesh axes its updates vary over: adding a
    zero scalar made from every input (`zeros_like` keeps an input's varying axes, `+` takes their
    union) types the zero-initialised carries accordingly. Outside shard_map XLA folds the `+ 0`."""
    leaves = jax.tree.leaves(inputs)
    return jax.tree.map(
        lambda a: a + sum(jnp.zeros_like(x, dtype=a.dtype, shape=()) for x in leaves), arrays)


def _rows_past_experts_zeroed(a: jax.Array, sizes: jax.Array) -> jax.Array:
    """a [M + PAD, D] -> [M, D] with the rows after sum(sizes) (no expert's) set to 0."""
    m = a.shape[0] - PAD
    return jnp.where((jnp.arange(m) < jnp.sum(sizes))[:, None], a[:m], 0)


def _gate_up(w: ExpertWeights, e: jax.Array) -> jax.Array:
    """Expert e's gate and up as one [D, 2F] matrix: one larger GEMM per chunk instead of two."""
    return jnp.concatenate([w.gate[e], w.up[e]], axis=1)


def _each_expert(sizes: jax.Array, body: Callable, carry):
    """carry = body(e, first_row, carry) for every expert with rows, in expert order."""
    starts = jnp.cumsum(sizes) - sizes
    return jax.lax.fori_loop(0, sizes.shape[0], lambda e, c: jax.lax.cond(
        sizes[e] > 0, lambda c: body(e, starts[e], c), lambda c: c, c), carry)


def _forward(xs, sizes, w: ExpertWeights, save: bool):
    """-> (y [M, D], (xs padded [M + PAD, D], gate|up pre-activations [M + PAD, 2F]) if save)."""
    m, d = xs.shape
    f = w.gate.shape[-1]
    sizes = _rows_there_are(sizes, m)
    xp = jnp.concatenate([xs, jnp.zeros((PAD, d), xs.dtype)])

    def expert(e, first, carry):
        gate_up, down = _gate_up(w, e), w.down[e]

        def chunk(rows, start, valid, carry):
            y, saved = carry
            gu = jnp.einsum("MD,DF->MF", _rows(xp, start, rows), gate_up)  # F here is 2F wide
            hidden = _silu(gu[:, :f]) * gu[:, f:]
            y = _put(y, jnp.einsum("MF,FD->MD", hidden.astype(xs.dtype), down), start)
            return y, (_put(saved, gu, start) if save else saved)

        return row_chunks(first, sizes[e], chunk, carry, limit=m + PAD)

    saved = jnp.zeros((m + PAD, 2 * f), xs.dtype) if save else None
    init = _varying_like((jnp.zeros((m + PAD, d), xs.dtype), saved), xs, sizes, w)
    y, saved = _each_expert(sizes, expert, init)
    return _rows_past_experts_zeroed(y, sizes), ((xp, saved) if save else None)


def _silu(g):
    g32 = g.astype(jnp.float32)
    return g32 * jax.nn.sigmoid(g32)


@jax.custom_vjp
def chunked_swiglu(xs: jax.Array, sizes: jax.Array, w: ExpertWeights) -> jax.Array:
    """xs [M, D] sorted by expert, sizes [E] -> [M, D]: every row through its expert's SwiGLU.

    Forward saves the gate and up pre-activations ([M + PAD, 2F]); the backward recomputes silu
    and runs the same chunk loop: dX, and per expert the weight gradients accumulated in float32
    over its chunks (contracting over rows with the small [rows, D] operand in the transposed
    role, as in `jaxlm.model.mlp.swiglu`).
    """
    return _forward(xs, sizes, w, save=False)[0]


def _chunked_fwd(xs, sizes, w):
    y, (xp, saved) = _forward(xs, sizes, w, save=True)
    return y, (xp, sizes, w, saved)


def _chunked_bwd(res, dy):
    xp, sizes, w, saved = res             # xp: the rows padded by PAD zero rows, as the forward
    m, d = dy.shape
    f = w.gate.shape[-1]
    sizes = _rows_there_are(sizes, m)
    dyp = jnp.concatenate([dy, jnp.zeros((PAD, d), dy.dtype)])
    f32 = jnp.float32

    def expert(e, first, carry):
        dx, d_gate, d_up, d_down = carry
        gate_up, down = _gate_up(w, e), w.down[e]

        def chunk(rows, start, valid, acc):
            dx, a_gu, a_down = acc
            inside = (jnp.arange(rows) < valid)[:, None]
            # Rows past the expert's end: 0 in every operand, so that 0 * inf can't reach dW.
            dyb = jnp.where(inside, _rows(dyp, start, rows), 0)
            xb = jnp.where(inside, _rows(xp, start, rows), 0)
            gu = jnp.where(inside, _rows(saved, start, rows).astype(f32), 0)
            g, u = gu[:, :f], gu[:, f:]
            sig = jax.nn.sigmoid(g)
            act = g * sig                                                # silu(g)
            d_hidden = jnp.einsum("MD,FD->MF", dyb, down, preferred_element_type=f32)
            a_down = a_down + jnp.einsum("MD,MF->DF", dyb, (act * u).astype(xp.dtype),
                                         preferred_element_type=f32)
            d_gu = jnp.concatenate([d_hidden * u * sig * (1.0 + g * (1.0 - sig)),   # silu'(g)
                                    d_hidden * act], axis=1).astype(xp.dtype)       # [M, 2F]
            a_gu = a_gu + jnp.einsum("MD,MF->DF", xb, d_gu,
                                     preferred_element_type=f32)
            dx = _put(dx, jnp.einsum("MF,DF->MD", d_gu, gate_up), start)
            return dx, a_gu, a_down

        zeros = _varying_like((jnp.zeros((d, 2 * f), f32), jnp.zeros((d, f), f32)), res, dy)
        dx, a_gu, a_down = row_chunks(first, sizes[e], chunk, (dx, *zeros), limit=m + PAD)
        put = lambda a, v: jax.lax.dynamic_update_index_in_dim(a, v.astype(a.dtype), e, 0)
        return (dx, put(d_gate, a_gu[:, :f]), put(d_up, a_gu[:, f:]),
                put(d_down, a_down.T))   # [D, F] accumulated, stored [F, D]

    init = (jnp.zeros((m + PAD, d), dy.dtype), *map(jnp.zeros_like, w))
    dx, d_gate, d_up, d_down = _each_expert(sizes, expert, _varying_like(init, res, dy))
    return _rows_past_experts_zeroed(dx, sizes), None, ExpertWeights(d_gate, d_up, d_down)


chunked_swiglu.defvjp(_chunked_fwd, _chunked_bwd)


def ragged_swiglu(xs: jax.Array, sizes: jax.Array, w: ExpertWeights) -> jax.Array:
    """The same with `jax.lax.ragged_dot` (TPU / GPU grouped kernels; autodiff gradient)."""
    gate = jax.lax.ragged_dot(xs, w.gate, sizes)
    hidden = jax.nn.silu(gate) * jax.lax.ragged_dot(xs, w.up, sizes)
    return jax.lax.ragged_dot(hidden, w.down, sizes)


def target_platform() -> str:
    """The platform the program is traced for: the devices of the mesh in context, else the
    default backend. They differ when a CPU host compiles for TPU devices (AOT, experiments/
    aot_check.py), which must get the TPU form."""
    device = jax.sharding.get_abstract_mesh().abstract_device
    return device.platform if device is not None else jax.default_backend()


def grouped_swiglu_rows(xs: jax.Array, sizes: jax.Array, w: ExpertWeights) -> jax.Array:
    """xs [M, D] sorted by expert, sizes [E] -> [M, D]; the target platform's fastest exact form."""
    w = ExpertWeights(*map(jnp.asarray, w))   # NumPy weights can't be indexed by a traced expert
    if target_platform() == "cpu":
        # In shard_map, rows and weights vary over different mesh axes (batch vs expert / F
        # splits). Cast both to the union before the custom gradient, whose cotangents must have
        # its inputs' types; autodiff turns the casts into the psums the gradients need.
        xs, w = _varying_like((xs, w), xs, sizes, w)
        return chunked_swiglu(xs, sizes, w)
    return ragged_swiglu(xs, sizes, w)
