"""Getting routed tokens to their experts and back (SPEC §10).

Two paths, chosen once from `MoEConfig.dispatch` (DISPATCH below):

capacity  GShard §2.2 / Switch §2.2. Each expert of a group (a sequence, or `group_size` tokens)
          takes at most C assignments; the rest are dropped: their expert output is 0, so the
          token passes through the residual. Priority is GShard's: every token's 1st choice, in
          position order, before any token's 2nd choice. One-hot dispatch / combine tensors
          [B, T, E, C] and named einsums keep every shape static (the TPU-friendly path).
dropless  MegaBlocks. All assignments sorted by expert and computed with grouped matmuls
          (`grouped_experts`: jax.lax.ragged_dot on TPU / GPU; on CPU, where ragged_dot is a
          dense masked matmul over all experts, a loop of row chunks per expert); nothing is
          dropped.

Expert parallelism. With a mesh in context the expert FFN runs inside `jax.shard_map`, its weights
[E, D, F] entering as P(expert, None, mlp axes): split over the `expert` mesh axis (and F over
`tensor`, partial sums psum'd), all-gathered over `fsdp` on entry like any FSDP weight.
- capacity: the [E, B, C, D] expert inputs are exchanged with `all_to_all` over the expert axis
  (each device sends the slots of expert e to e's owner and gets them back; GShard §3.2).
- dropless: XLA:CPU has no ragged all-to-all, so tokens are all-gathered over the expert axis,
  each device runs the grouped matmul over its own E/n experts only, and the partial outputs are
  reduce-scattered back to the tokens' owners (psum_scatter). Communication is n× that of an
  all-to-all; the compute is the same.
Where the batch is too small to be split over the expert axis (batch-1 decode) tokens stay
replicated: each device computes its experts' share and the shares are summed.

Shapes: x [B, T, D]; experts [B, T, R] int, the R = top_k chosen experts per token; gates
[B, T, R] float32 (0 for padding); valid [B, T] bool (False = padding, never dispatched).
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxlm.config import Dispatch
from jaxlm.model.grouped_experts import ExpertWeights, grouped_swiglu_rows
from jaxlm.sharding import RULES, logical_to_spec


# Capacity path ----------------------------------------------------------------------------------
def expert_capacity(tokens_per_group: int, top_k: int, n_experts: int, factor: float) -> int:
    """C = ceil(k · tokens/E · factor) (GShard §2.2, Switch §2.2), at most `tokens_per_group`:
    one expert can get each token once, so a larger C only adds empty slots."""
    return max(1, min(tokens_per_group, math.ceil(top_k * tokens_per_group / n_experts * factor)))


def capacity_slots(experts: jax.Array, valid: jax.Array, n_experts: int,
                   capacity: int) -> tuple[jax.Array, jax.Array]:
    """Each assignment's slot in its expert's buffer, and whether it fits.

    Priority (GShard §2.2, Algorithm 1): all 1st choices in position order, then all 2nd choices.
    experts [B, T, R], valid [B, T] -> slot [B, T, R] int32, kept [B, T, R] bool.
    """
    b, t, r = experts.shape
    onehot = jax.nn.one_hot(experts, n_experts, dtype=jnp.int32) * valid[..., None, None]
    queue = onehot.transpose(0, 2, 1, 3).reshape(b, r * t, n_experts)  # [B, R·T, E] by priority
    place = (jnp.cumsum(queue, axis=1) - 1).reshape(b, r, t, n_experts).transpose(0, 2, 1, 3)
    slot = jnp.sum(place * onehot, axis=-1)                             # [B, T, R]
    return slot, valid[..., None] & (slot < capacity)


def dispatch_combine(experts: jax.Array, gates: jax.Array, slot: jax.Array, kept: jax.Array,
                     n_experts: int, capacity: int, dtype) -> tuple[jax.Array, jax.Array]:
    """One-hot dispatch [B, T, E, C] (0/1) and combine [B, T, E, C] (gate weights) tensors."""
    e_hot = jax.nn.one_hot(experts, n_experts, dtype=dtype) * kept[..., None].astype(dtype)
    c_hot = jax.nn.one_hot(slot, capacity, dtype=dtype)
    dispatch = jnp.einsum("BTRE,BTRC->BTEC", e_hot, c_hot)
    combine = jnp.einsum("BTRE,BTRC,BTR->BTEC", e_hot, c_hot, gates.astype(dtype))
    return dispatch, combine


def capacity_dispatch(x: jax.Array, experts: jax.Array, gates: jax.Array, valid: jax.Array,
                      w: ExpertWeights, *, capacity_factor: float,
                      group_size: int | None) -> tuple[jax.Array, jax.Array]:
    """x [B, T, D] -> (y [B, T, D], kept [B, T, R]); over-capacity assignments contribute 0."""
    b, t, d = x.shape
    r, n_experts = experts.shape[-1], w.gate.shape[0]
    g = group_size or t
    if t % g:
        raise ValueError(f"sequence length {t} is not a multiple of MoEConfig.group_size ({g}); "
                         "change group_size or pad the sequence")
    # Routing groups: [B, T] -> [B·T/g, g] (GShard §3.2); a group never spans two sequences.
    x, experts, gates, valid = (a.reshape(b * t // g, g, *a.shape[2:])
                                for a in (x, experts, gates, valid))
    capacity = expert_capacity(g, r, n_experts, capacity_factor)
    slot, kept = capacity_slots(experts, valid, n_experts, capacity)
    dispatch, combine = dispatch_combine(experts, gates, slot, kept, n_experts, capacity, x.dtype)
    expert_in = jnp.einsum("BTD,BTEC->EBCD", x, dispatch)
    expert_out = _capacity_experts(expert_in, w)
    y = jnp.einsum("EBCD,BTEC->BTD", expert_out, combine)
    return y.reshape(b, t, d), kept.reshape(b, t, r)


def swiglu_experts(x: jax.Array, w: ExpertWeights) -> jax.Array:
    """Every expert on its own slots: x [E, B, C, D] -> [E, B, C, D]. (On a mesh this runs inside
    shard_map on local shards, so it states no sharding constraints.)"""
    gate = jnp.einsum("EBCD,EDF->EBCF", x, w.gate)
    up = jnp.einsum("EBCD,EDF->EBCF", x, w.up)
    return jnp.einsum("EBCF,EFD->EBCD", jax.nn.silu(gate) * up, w.down)


def _capacity_experts(expert_in: jax.Array, w: ExpertWeights) -> jax.Array:
    """[E, B, C, D] -> [E, B, C, D], expert-parallel over the mesh when there is one."""
    plan = _plan(expert_in.shape[1], w)
    if plan is None:
        return swiglu_experts(expert_in, w)
    ex = plan.expert_axes

    def local(xe, gate, up, down):
        w_local = ExpertWeights(gate, up, down)
        if not ex:  # no expert axis: all experts here, only F may be split
            return plan.reduce_mlp(swiglu_experts(xe, w_local))
        if plan.tokens_split:
            # [E, B/n, C, D] -> [E/n, B, C, D]: every device gets its experts' slots from all
            # devices of its expert group, computes, and sends them back (GShard §3.2).
            xe = jax.lax.all_to_all(xe, ex, split_axis=0, concat_axis=1, tiled=True)
            out = plan.reduce_mlp(swiglu_experts(xe, w_local))
            return jax.lax.all_to_all(out, ex, split_axis=1, concat_axis=0, tiled=True)
        # Tokens replicated over the expert axis: compute our experts' slots and sum the
        # zero-padded shares (a psum, unlike all_gather, types as replicated for shard_map).
        first = jax.lax.axis_index(ex) * gate.shape[0]
        xe = jax.lax.pcast(xe, ex, to="varying")  # see _plan
        mine = jax.lax.dynamic_slice_in_dim(xe, first, gate.shape[0], 0)
        out = plan.reduce_mlp(swiglu_experts(mine, w_local))
        padded = jax.lax.dynamic_update_slice_in_dim(jnp.zeros_like(xe), out, first, 0)
        return jax.lax.psum(padded, ex)

    spec = P(None, plan.batch, None, None)
    return jax.shard_map(local, mesh=plan.mesh, in_specs=(spec, *plan.weight_specs),
                         out_specs=spec)(expert_in, *w)


# Dropless path ----------------------------------------------------------------------------------
def grouped_swiglu(x: jax.Array, experts: jax.Array, gates: jax.Array,
                   w: ExpertWeights) -> jax.Array:
    """Grouped-matmul experts (MegaBlocks): x [B, T, D], experts/gates [B, T, R] -> [B, T, D].

    Expert ids outside [0, E) (E = w.gate.shape[0]) mark assignments handled elsewhere: they sort
    after every group and contribute 0.
    """
    b, t, d = x.shape
    r, n_groups = experts.shape[-1], w.gate.shape[0]
    ours = (experts >= 0) & (experts < n_groups)
    flat = jnp.where(ours, experts, n_groups).reshape(-1)      # [B·T·R]; not ours -> E (last)
    order = jnp.argsort(flat, stable=True)                      # assignments grouped by expert
    sizes = jnp.bincount(flat, length=n_groups)                 # [E]; id E is not counted
    xs = x.reshape(b * t, d)[order // r]                        # [B·T·R, D]
    ys = grouped_swiglu_rows(xs, sizes, w)                      # [B·T·R, D]
    ys = ys[jnp.argsort(order)].reshape(b, t, r, d)             # back to token order
    ys = jnp.where(ours[..., None], ys, 0)                      # rows outside every group
    return jnp.einsum("BTRD,BTR->BTD", ys, gates.astype(x.dtype))


def dropless_dispatch(x: jax.Array, experts: jax.Array, gates: jax.Array, valid: jax.Array,
                      w: ExpertWeights, *, capacity_factor: float | None = None,
                      group_size: int | None = None) -> tuple[jax.Array, jax.Array]:
    """x [B, T, D] -> (y [B, T, D], kept [B, T, R] = valid: nothing is dropped).

    capacity_factor and group_size are accepted for a uniform signature and ignored.
    """
    kept = jnp.broadcast_to(valid[..., None], experts.shape)
    plan = _plan(x.shape[0], w)
    if plan is None:
        return grouped_swiglu(x, experts, gates, w), kept
    ex = plan.expert_axes

    def local(x, experts, gates, gate, up, down):
        w_local = ExpertWeights(gate, up, down)
        if not ex:  # no expert axis: all experts here, only F may be split
            return plan.reduce_mlp(grouped_swiglu(x, experts, gates, w_local))
        first = jax.lax.axis_index(ex) * gate.shape[0]
        if plan.tokens_split:
            # No ragged all-to-all on every backend (XLA:CPU): gather the expert group's tokens,
            # run our experts on them, reduce-scatter the partial outputs to their owners.
            x, experts, gates = (jax.lax.all_gather(a, ex, axis=0, tiled=True)
                                 for a in (x, experts, gates))
        else:
            x, gates = (jax.lax.pcast(a, ex, to="varying") for a in (x, gates))  # see _plan
        out = plan.reduce_mlp(grouped_swiglu(x, experts - first, gates, w_local))
        if plan.tokens_split:
            return jax.lax.psum_scatter(out, ex, scatter_dimension=0, tiled=True)
        return jax.lax.psum(out, ex)

    tok = P(plan.batch, None, None)
    y = jax.shard_map(local, mesh=plan.mesh, in_specs=(tok, tok, tok, *plan.weight_specs),
                      out_specs=tok)(x, experts, gates, *w)
    return y, kept


# Expert parallelism plan --------------------------------------------------------------------------
class _Plan(NamedTuple):
    mesh: jax.sharding.AbstractMesh
    batch: str | tuple[str, ...] | None      # mesh axes of the token batch dimension
    expert_axes: tuple[str, ...]             # mesh axes the E dimension is split over
    mlp_axes: tuple[str, ...]                # mesh axes the F dimension is split over
    weight_specs: tuple[P, P, P]             # gate, up, down inside the shard_map
    tokens_split: bool                       # batch split over the expert axes too

    def reduce_mlp(self, y: jax.Array) -> jax.Array:
        """Sum the partial outputs of an F-split down projection (Megatron row parallelism)."""
        return jax.lax.psum(y, self.mlp_axes) if self.mlp_axes else y


def _axes(entry) -> tuple[str, ...]:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _plan(batch: int, w: ExpertWeights) -> _Plan | None:
    """How to run the experts on the mesh in context (None: no mesh, plain GSPMD code).

    When tokens are replicated over the expert axis, the shard_map bodies `pcast` them to
    varying before indexing them with per-device (expert-shard) indices: left to the implicit
    cast, the gradient of the replicated tokens came out wrong (jax 0.10.2, XLA:CPU; see
    tests/test_moe_sharding.py::test_tokens_replicated_over_the_expert_axis).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None
    shape = dict(mesh.shape)
    n_experts, _, ffn = w.gate.shape
    up_spec = logical_to_spec(("expert", None, "mlp"), w.gate.shape, shape)
    down_spec = logical_to_spec(("expert", "mlp", None), w.down.shape, shape)
    expert_axes, mlp_axes = _axes(up_spec[0]), _axes(up_spec[2])
    wanted = math.prod(shape.get(a, 1) for a in RULES["expert"])
    if wanted > 1 and not expert_axes:
        raise ValueError(f"MoEConfig.n_experts ({n_experts}) must be divisible by the mesh's "
                         f"expert axis ({wanted}) to split experts over it; change n_experts or "
                         "the mesh (MeshConfig.expert)")
    batch = logical_to_spec(("activation_batch",), (batch,), shape)[0]
    tokens_split = bool(expert_axes) and set(expert_axes) <= set(_axes(batch))
    return _Plan(mesh, batch, expert_axes, mlp_axes, (up_spec, up_spec, down_spec), tokens_split)


DISPATCH: dict[Dispatch, Callable[..., tuple[jax.Array, jax.Array]]] = {
    Dispatch.CAPACITY: capacity_dispatch,
    Dispatch.DROPLESS: dropless_dispatch,
}
