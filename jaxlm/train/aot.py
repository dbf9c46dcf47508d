"""Ahead-of-time (AOT) compile check of the sharded train step, without the hardware.

The trainer's step (`jaxlm.train.trainer.jit_train_step`: explicit shardings, state donated) is
lowered against *abstract* inputs (`jax.ShapeDtypeStruct` with shardings; nothing allocated) and
compiled for a device list: either a real TPU slice described by libtpu
(`jax.experimental.topologies.get_topology_desc`, works on a CPU-only host when libtpu is
importable; MaxText's train_compile.py does the same) or emulated CPU devices. The compiled
program's `memory_analysis()` says how many bytes each device needs, which is checked against the
chip's HBM; `cost_analysis()` gives the FLOPs per device.

    from jaxlm.train.aot import topology_devices, compile_train_step
    devices = topology_devices("v5p-32")           # 16 compile-only TPU v5p chips
    report = compile_train_step(config, devices, hbm_bytes=TOPOLOGIES["v5p-32"].hbm_bytes)
    report.fits, report.summary()

`config` is the pretraining ConfigDict (experiments/configs/pretrain.py), read the way the
trainer reads it, except that data/tokenizer are not touched (vocab_size comes from the preset).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.config import ModelConfig, get_preset
from jaxlm.data.batching import batch_shards, plan_batches
from jaxlm.model import Transformer
from jaxlm.sharding import MeshConfig, make_mesh, state_partition_specs, state_shardings
from jaxlm.train.metrics import train_flops_per_token
from jaxlm.train.optim import OptimConfig, make_optimizer
from jaxlm.train.step import init_state
from jaxlm.train.experiment import preset_overrides
from jaxlm.train.trainer import batch_sharding_for, jit_train_step, train_state_shardings

GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Topology:
    """A TPU slice as Cloud TPU names it. v4 / v5p names count TensorCores (2 per chip, fused
    into one 'megacore' JAX device); v5e names count chips (1 core each)."""

    name: str                 # "v5p-64"
    topology_name: str        # libtpu's name: "v5:2x4x4"
    chips: int                # JAX devices
    hbm_bytes: int            # per chip
    peak_flops: float         # dense bf16 FLOP/s per chip (datasheet)
    chip_config: str = "megacore"
    chips_per_host_bounds: tuple[int, int, int] = (2, 2, 1)


def _topologies() -> dict[str, Topology]:
    out = {}
    # v4: 32 GiB HBM, 275 TFLOP/s bf16; v5p: 95 GiB, 459 TFLOP/s; v5e: 16 GiB, 197 TFLOP/s.
    v4v5p = {8: "2x2x1", 16: "2x2x2", 32: "2x2x4", 64: "2x4x4", 128: "4x4x4", 256: "4x4x8",
             512: "4x8x8", 1024: "8x8x8"}
    for cores, shape in v4v5p.items():
        out[f"v4-{cores}"] = Topology(f"v4-{cores}", f"v4:{shape}", cores // 2, 32 * GiB, 275e12)
        out[f"v5p-{cores}"] = Topology(f"v5p-{cores}", f"v5:{shape}", cores // 2, 95 * GiB, 459e12)
    for chips, shape in {8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
                         256: "16x16"}.items():
        out[f"v5e-{chips}"] = Topology(f"v5e-{chips}", f"v5e:{shape}", chips, 16 * GiB, 197e12,
                                       chip_config="default")
    return out


TOPOLOGIES: dict[str, Topology] = _topologies()


def get_topology(name: str) -> Topology:
    if name not in TOPOLOGIES:
        raise ValueError(f"unknown TPU topology {name!r}; choose one of "
                         f"{', '.join(TOPOLOGIES)}")
    return TOPOLOGIES[name]


def topology_devices(name: str, num_slices: int = 1) -> list:
    """Compile-only devices of a TPU slice (or `num_slices` of them), from libtpu on any host."""
    from jax.experimental.topologies import get_topology_desc

    t = get_topology(name)
    try:
        return list(get_topology_desc(
            platform="tpu", topology_name=t.topology_name, chip_config_name=t.chip_config,
            chips_per_host_bounds=t.chips_per_host_bounds, num_slices=num_slices).devices)
    except Exception as e:  # libtpu missing or too old for this JAX: say so, don't trace back
        raise RuntimeError(
            f"could not describe TPU topology {name} ({t.topology_name}): {str(e).splitlines()[0]}."
            " AOT compilation for TPU needs libtpu importable (for jax 0.10.2: "
            "pip install --target /tmp/libtpu_pkg libtpu==0.0.42.1, then PYTHONPATH=/tmp/libtpu_pkg)"
            "; or compile on emulated CPU devices instead") from None


# The compile check ------------------------------------------------------------------------------
@dataclasses.dataclass
class AotReport:
    preset: str
    devices: int
    device_kind: str
    mesh: dict[str, int]
    params: int
    active_params: int
    seq_len: int
    plan: dict[str, int]
    hbm_bytes: int | None
    compiled: bool = False
    compile_s: float = 0.0
    memory: dict[str, int] = dataclasses.field(default_factory=dict)
    bytes_per_device: int | None = None   # argument + output - alias + temp (+ code)
    fits: bool | None = None
    # XLA's cost analysis of the compiled step: while-loop bodies (the layer scan, gradient
    # accumulation) are counted once, so it is not the step's FLOPs; model_flops_per_step is.
    flops_per_device: float | None = None
    model_flops_per_step: float = 0.0      # 6·N·tokens + attention (jaxlm.train.metrics)
    sharding_mismatches: list[str] = dataclasses.field(default_factory=list)
    message: str = ""
    error: str | None = None
    error_detail: str | None = None

    def check_budget(self, hbm_bytes: int | None, advice: str = "") -> bool | None:
        """Set `fits` and `message` for a per-device budget (None: report the need only)."""
        self.hbm_bytes = hbm_bytes
        if not self.compiled:
            return self.fits
        need = self.bytes_per_device / GiB
        if hbm_bytes is None:
            self.fits, self.message = None, f"compiles; needs {need:.2f} GiB per device"
            return None
        have = hbm_bytes / GiB
        self.fits = self.bytes_per_device <= hbm_bytes
        self.message = (f"fits: {need:.2f} GiB of {have:.2f} GiB per device ({need / have:.0%})"
                        if self.fits else
                        f"does not fit: needs {need:.2f} GiB per device but the budget is "
                        f"{have:.2f} GiB. {advice}".rstrip())
        return self.fits

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        gib = lambda b: f"{b / GiB:.2f} GiB"
        lines = [f"{self.preset}: {self.params / 1e9:.2f}B parameters "
                 f"({self.active_params / 1e9:.2f}B active) on {self.devices} x {self.device_kind}, "
                 f"mesh {self.mesh}, seq {self.seq_len}, global batch {self.plan['global_batch']} "
                 f"rows = {self.plan['grad_accum_steps']} x {self.plan['micro_global_batch']}"]
        if self.compiled:
            m = self.memory
            lines.append(f"  compiled in {self.compile_s:.1f} s; per device: arguments "
                         f"{gib(m['argument'])}, outputs {gib(m['output'])} (aliased "
                         f"{gib(m['alias'])}), temporaries {gib(m['temp'])}, total "
                         f"{gib(self.bytes_per_device)}")
            if self.flops_per_device:
                lines.append(f"  model FLOPs per device per step {self.model_flops_per_step / self.devices:.3e}"
                             f" (XLA cost analysis, loop bodies counted once: {self.flops_per_device:.3e})")
        lines.append(f"  {self.message}")
        return "\n".join(lines)


def model_config(config) -> ModelConfig:
    """The ModelConfig the trainer would build (vocab_size from the preset: no tokenizer here)."""
    c = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return get_preset(c["model"]["preset"], **preset_overrides(c, c["train"]["seq_len"]))


def abstract_inputs(config, mesh, num_processes: int = 1):
    """(graphdef, tx, abstract state with shardings, abstract batch with shardings, plan, cfg).

    Mirrors the trainer: the model's state from nnx.split, the optimizer from make_optimizer, the
    state's shardings from `train_state_shardings`, the batch sharded by `batch_sharding_for`.
    Nothing the size of the model is allocated.
    """
    c = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    cfg = model_config(c)
    t = c["train"]
    plan = plan_batches(t["global_batch_tokens"], t["seq_len"], batch_shards(mesh.shape),
                        num_processes, t["micro_batch_per_device"])
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    tx = make_optimizer(OptimConfig(total_steps=t["steps"], **c["optim"]), abstract)
    shard = nnx.to_pure_dict(state_shardings(abstract, mesh))
    params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          nnx.to_pure_dict(abstract), shard)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                         jax.eval_shape(lambda p: init_state(p, tx), params),
                         train_state_shardings(params, tx, mesh))
    rows, seq = plan.global_batch, t["seq_len"]
    bsh = batch_sharding_for(mesh, rows, seq)
    batch = {k: jax.ShapeDtypeStruct((rows, seq), jnp.int32, sharding=bsh)
             for k in ("inputs", "targets", "positions", "segment_ids")}
    # The trainer feeds loss_mask as float32 (so the non-finite guard can be exercised).
    batch["loss_mask"] = jax.ShapeDtypeStruct((rows, seq), jnp.float32, sharding=bsh)
    return graphdef, tx, state, batch, plan, cfg, abstract


def compile_train_step(config, devices: Sequence, *, hbm_bytes: int | None = None,
                       num_processes: int = 1, return_compiled: bool = False,
                       progress=lambda msg: None):
    """Lower and compile the preset's sharded train step for `devices`; an AotReport.

    hbm_bytes: per-device memory budget; None skips the fit verdict. A compile that fails with
    RESOURCE_EXHAUSTED (the TPU compiler's out-of-memory) is reported as not fitting, not raised.
    With return_compiled, returns (report, compiled executable or None).
    """
    c = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    mesh = make_mesh(MeshConfig(**c["mesh"]), devices=devices)
    progress(f"mesh {dict(mesh.shape)}; abstract train state and its shardings")
    graphdef, tx, state, batch, plan, cfg, abstract = abstract_inputs(c, mesh, num_processes)
    seq = c["train"]["seq_len"]
    report = AotReport(
        preset=c["model"]["preset"], devices=len(devices),
        device_kind=getattr(devices[0], "device_kind", devices[0].platform),
        mesh={k: int(v) for k, v in mesh.shape.items()}, params=cfg.param_count(),
        active_params=cfg.active_param_count(), seq_len=seq,
        plan={k: v for k, v in dataclasses.asdict(plan).items() if isinstance(v, int)},
        hbm_bytes=hbm_bytes,
        model_flops_per_step=train_flops_per_token(cfg, seq) * plan.global_batch * seq)
    step = jit_train_step(graphdef, tx, jax.tree.map(lambda a: a.sharding, state),
                          batch["inputs"].sharding, accum_steps=plan.grad_accum_steps,
                          z_loss=c["train"]["z_loss"])
    progress(f"lowering and compiling the train step ({plan.grad_accum_steps} micro-batches of "
             f"{plan.micro_global_batch} x {seq} tokens)")
    start = time.perf_counter()
    compiled = None
    try:
        with jax.set_mesh(mesh):  # the trainer traces its step inside the mesh context too
            compiled = step.lower(state, batch).compile()
    except Exception as e:  # noqa: BLE001 - an XLA error of any type is the check's answer
        msg = str(e)
        report.compile_s = time.perf_counter() - start
        report.error = msg.splitlines()[0] if msg else type(e).__name__
        report.error_detail = msg[:8000]  # XLA's OOM message lists the largest allocations
        if "RESOURCE_EXHAUSTED" in msg or "out of memory" in msg.lower():
            report.fits = False
            report.message = (f"does not fit: the compiler ran out of device memory "
                              f"({report.error[:300]}). {_advice(c)}")
        else:
            report.message = f"compile failed: {report.error[:500]}"
        return (report, None) if return_compiled else report
    report.compile_s = time.perf_counter() - start
    report.compiled = True
    m = compiled.memory_analysis()
    report.memory = {"argument": m.argument_size_in_bytes, "output": m.output_size_in_bytes,
                     "alias": m.alias_size_in_bytes, "temp": m.temp_size_in_bytes,
                     "code": m.generated_code_size_in_bytes}
    report.bytes_per_device = (m.argument_size_in_bytes + m.output_size_in_bytes
                               - m.alias_size_in_bytes + m.temp_size_in_bytes
                               + m.generated_code_size_in_bytes)
    report.sharding_mismatches = sharding_mismatches(compiled, abstract, mesh)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
    if cost and cost.get("flops"):
        report.flops_per_device = float(cost["flops"])
    report.check_budget(hbm_bytes, _advice(c))
    return (report, compiled) if return_compiled else report


def _advice(c: dict) -> str:
    return ("Lower train.micro_batch_per_device (now "
            f"{c['train']['micro_batch_per_device']}), split parameters over more devices "
            "(fsdp / tensor / expert, or a bigger slice), or use model.overrides.remat=full")


def expected_partition_specs(abstract_params: nnx.State, mesh) -> dict:
    """The sharding table's PartitionSpec for every parameter, as a pure dict (for checks)."""
    return nnx.to_pure_dict(state_partition_specs(abstract_params, dict(mesh.shape)))


def sharding_mismatches(compiled, abstract_params: nnx.State, mesh) -> list[str]:
    """Parameters whose sharding in the compiled step differs from the table's; [] when all match."""
    state_in = compiled.input_shardings[0][0]
    expected = expected_partition_specs(abstract_params, mesh)
    bad = []
    for (path, spec), actual in zip(jax.tree_util.tree_leaves_with_path(expected),
                                    jax.tree.leaves(state_in.params)):
        want = jax.sharding.NamedSharding(mesh, spec)
        ndim = len(spec)
        if not actual.is_equivalent_to(want, ndim):
            bad.append(f"{jax.tree_util.keystr(path)}: compiled {actual} vs table {spec}")
    return bad


def mfu(model_flops_per_step: float, step_s: float, devices: int, peak_flops: float) -> float:
    """Model FLOPs utilisation: model FLOPs per step / (step time x peak x devices)."""
    return model_flops_per_step / (step_s * peak_flops * devices)


def step_time_at_mfu(model_flops_per_step: float, devices: int, peak_flops: float,
                     target_mfu: float) -> float:
    """Seconds per step a run would take at `target_mfu` (an expectation, not a measurement)."""
    return model_flops_per_step / (target_mfu * peak_flops * devices)


__all__ = ["TOPOLOGIES", "Topology", "get_topology", "topology_devices", "AotReport",
           "model_config", "abstract_inputs", "compile_train_step", "expected_partition_specs",
           "mfu", "step_time_at_mfu", "GiB"]
