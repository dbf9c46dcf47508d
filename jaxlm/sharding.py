"""Device meshes and the one table from logical axis names to mesh axes.

Parameters and activations name their dimensions with logical axes (see `jaxlm.model`); this file
alone decides which mesh axes those names are split over. Changing the parallelism strategy is a
change to RULES or to the mesh shape, never to a layer.

Mesh axes, outermost to innermost (the innermost gets the fastest ICI links on a TPU slice):
    data    pure data parallelism: parameters replicated, batch split.
    fsdp    batch split *and* parameters/optimizer state split (ZeRO-3 / FSDP): weights are
            all-gathered layer by layer inside the scan.
    expert  experts of an MoE layer split; elsewhere a batch axis, over which the non-expert
            weights are split as over fsdp (`embed` -> fsdp, expert: an expert weight's E
            dimension takes `expert` first, so its D stays on fsdp).
    tensor  Megatron-style tensor parallelism: heads and the MLP hidden dimension split.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "expert", "tensor")

# The table. Each logical name maps to a tuple of mesh axes, tried in order; an axis is skipped
# when it has size 1, is already used by another dimension of the same array, or does not divide
# the dimension (e.g. 2 kv heads on tensor=4 are replicated rather than padded).
RULES: dict[str, tuple[str, ...]] = {
    # parameters
    "layers": (),                        # the scanned layer axis is never split
    "vocab": ("tensor",),
    "embed": ("fsdp", "expert"),         # non-expert weights: ZeRO over the expert axis too
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": (),
    "mlp": ("tensor",),
    "norm": (),
    "expert": ("expert",),
    # activations
    "activation_batch": ("data", "fsdp", "expert"),
    "activation_length": (),
    "activation_embed": (),
    "activation_heads": ("tensor",),
    "activation_kv_heads": ("tensor",),
    "activation_mlp": ("tensor",),
    "activation_vocab": ("tensor",),
}


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int],
                    mesh_shape: dict[str, int]) -> P:
    """PartitionSpec for an array of `shape` whose dimensions carry logical `names`."""
    if len(names) != len(shape):
        raise ValueError(f"logical axes {tuple(names)} do not match array rank {len(shape)}")
    used: set[str] = set()
    spec: list = [None] * len(names)
    # An `expert` dimension claims its mesh axis first, wherever it sits among the names:
    # `embed` may also use that axis, but only when the array has no expert dimension.
    order = sorted(range(len(names)), key=lambda i: names[i] != "expert")
    for i in order:
        name, dim = names[i], shape[i]
        if name is None:
            continue
        if name not in RULES:
            raise KeyError(f"logical axis {name!r} is not in jaxlm.sharding.RULES; add it there")
        chosen, size = [], 1
        for axis in RULES[name]:
            n = mesh_shape.get(axis, 1)
            if n == 1 or axis in used or dim % (size * n):
                continue
            chosen.append(axis)
            size *= n
        used.update(chosen)
        spec[i] = None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen)
    return P(*spec)


def is_split(name: str, dim: int) -> bool:
    """Whether a dimension of logical axis `name` and size `dim` is split across devices in the
    current mesh context (`jax.set_mesh`); False outside one. It judges the name alone, which
    matches a whole array's spec as long as RULES maps no two of its logical axes to one mesh axis
    (true for heads / kv_heads, its callers; not for an expert weight's embed, which loses
    `expert` to the E dimension)."""
    mesh = jax.sharding.get_abstract_mesh()
    return not mesh.empty and logical_to_spec([name], [dim], dict(mesh.shape)) != P(None)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """with_sharding_constraint by logical names; a no-op outside a mesh context (`jax.set_mesh`)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names, x.shape, dict(mesh.shape)))


# Mesh construction ------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh shape. `ici_*` is the shape inside one slice (or host), `dcn_*` across slices.

    One field of each group may be -1: it takes whatever devices remain. The default is pure FSDP
    over every device, the best first choice for models up to ~70B on TPU.
    """

    data: int = 1
    fsdp: int = -1
    expert: int = 1
    tensor: int = 1
    dcn_data: int = -1
    dcn_fsdp: int = 1
    dcn_expert: int = 1
    dcn_tensor: int = 1

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, int) or (v < 1 and v != -1):
                raise ValueError(f"MeshConfig.{f.name} must be a positive integer or -1, got {v!r}")
        for group in ("ici", "dcn"):
            fills = [a for a, v in zip(MESH_AXES, self._raw(group)) if v == -1]
            if len(fills) > 1:
                raise ValueError(f"MeshConfig: at most one {group} axis may be -1, got {fills}")

    def _raw(self, group: str) -> tuple[int, ...]:
        prefix = "" if group == "ici" else "dcn_"
        return tuple(getattr(self, prefix + a) for a in MESH_AXES)

    def resolve(self, n_devices: int, n_slices: int = 1) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(ici_shape, dcn_shape) with -1 filled; a clear error when the numbers don't fit."""
        if n_devices % n_slices:
            raise ValueError(f"{n_devices} devices do not split evenly into {n_slices} slices")
        dcn = _fill(self._raw("dcn"), n_slices, "dcn_", "slices")
        ici = _fill(self._raw("ici"), n_devices // n_slices, "", "devices per slice")
        return ici, dcn


def _fill(shape: tuple[int, ...], total: int, prefix: str, what: str) -> tuple[int, ...]:
    known = math.prod(v for v in shape if v != -1)
    if -1 in shape:
        if total % known:
            raise ValueError(f"MeshConfig: {what} = {total} is not divisible by the product of the "
                             f"fixed {prefix}axes ({known}); change {prefix}{{data,fsdp,expert,tensor}}")
        shape = tuple(total // known if v == -1 else v for v in shape)
    if math.prod(shape) != total:
        desc = ", ".join(f"{prefix}{a}={v}" for a, v in zip(MESH_AXES, shape))
        raise ValueError(f"MeshConfig: {desc} multiply to {math.prod(shape)} but there are "
                         f"{total} {what}; make them multiply to {total} or set one to -1")
    return shape


def make_mesh(config: MeshConfig = MeshConfig(), devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Build the 4-axis mesh (data, fsdp, expert, tensor) over `devices` (default: all).

    Multi-slice TPU pods (devices carrying `slice_index`) get a hybrid mesh: the dcn shape spans
    slices over the data-centre network, the ici shape spans chips within each slice.
    """
    devices = list(jax.devices() if devices is None else devices)
    n_slices = len({getattr(d, "slice_index", 0) for d in devices})
    ici, dcn = config.resolve(len(devices), n_slices)
    if n_slices > 1:
        grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
    else:
        shape = tuple(i * d for i, d in zip(ici, dcn))
        try:
            grid = mesh_utils.create_device_mesh(shape, devices)
        except (ValueError, NotImplementedError, AssertionError):
            # Topology-aware placement is TPU-only; elsewhere device order is as good as any.
            grid = np.asarray(devices).reshape(shape)
    # Auto axes: layers state logical constraints and XLA's partitioner propagates the rest.
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


# Parameters -------------------------------------------------------------------------------------
def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def state_partition_specs(state: nnx.State, mesh_shape: dict[str, int]) -> nnx.State:
    """A PartitionSpec for every Variable in `state`, from its `logical_axes` metadata."""

    def spec(v: nnx.Variable):
        names = v.get_metadata().get("logical_axes")
        if names is None:
            if isinstance(v, nnx.Param):
                raise ValueError(f"parameter of shape {v.shape} has no logical_axes metadata; "
                                 "create parameters with jaxlm.model.layers.make_param")
            return v.replace(P())
        return v.replace(logical_to_spec(names, v.shape, mesh_shape))

    return jax.tree.map(spec, state, is_leaf=_is_var)


def state_shardings(state: nnx.State, mesh: Mesh) -> nnx.State:
    specs = state_partition_specs(state, dict(mesh.shape))
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs)


def init_sharded(make: Callable[[], nnx.Module], mesh: Mesh | None) -> nnx.Module:
    """Build `make()` with every parameter created directly in its sharding.

    The constructor runs once abstractly (nothing allocated) to learn shapes and logical axes,
    then under jit with out_shardings, so each device materialises only its own shard: a 70B
    model never sits whole on one host.
    """
    if mesh is None:
        return make()
    graphdef, abstract = nnx.split(nnx.eval_shape(make))
    shardings = state_shardings(abstract, mesh)
    with jax.set_mesh(mesh):
        state = jax.jit(lambda: nnx.split(make())[1], out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def shard_model(model: nnx.Module, mesh: Mesh) -> nnx.Module:
    """Move an existing model's parameters into the table's shardings on `mesh`."""
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, state_shardings(state, mesh))
    return nnx.merge(graphdef, state)
