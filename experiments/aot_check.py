"""Does a preset's sharded train step compile, and fit in memory, on a TPU slice? Ask without one.

Lowers and compiles the trainer's own step (jaxlm.train.trainer.jit_train_step) against abstract
inputs (nothing allocated) and checks XLA's per-device memory analysis against the chip's HBM:

    # real TPU compiler on a CPU-only host (libtpu importable; see docs/tpu_scaling.md)
    pip install --target /tmp/libtpu_pkg libtpu==0.0.42.1
    python experiments/aot_check.py --preset llama2_7b --topology v5p-32 --libtpu_dir /tmp/libtpu_pkg
    python experiments/aot_check.py --preset mixtral_8x7b --topology v5p-64 --mesh expert=8,fsdp=-1
    # no libtpu: the same program for N emulated CPU devices (XLA:CPU memory numbers, a rougher guide)
    python experiments/aot_check.py --preset llama2_7b --topology v5p-32 --emulate

Presets: the pretraining presets of experiments/configs/pretrain.py (tiny, tiny_moe, test,
test_moe, llama2_7b, llama2_70b, mistral_7b) and any other model preset of jaxlm/config.py
(mixtral_8x7b, gemini_moe_8e/16e/32e, llama2_13b, ...), which runs with the llama2_7b recipe
(bf16 compute, f32 parameters and Adam state, dots remat, 4M-token batches of 4096 tokens) and,
for MoE models, expert=8 parallelism. Exit status: 0 compiles (and fits), 1 does not fit or does
not compile, 2 bad input.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MESH_AXES = ("data", "fsdp", "expert", "tensor", "dcn_data", "dcn_fsdp", "dcn_expert", "dcn_tensor")


class BadInput(ValueError):
    pass


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="AOT-compile a preset's sharded train step for a TPU slice (or emulated CPU "
                    "devices) and check that it fits in device memory.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--preset", required=True, help="pretrain or model preset (see below)")
    p.add_argument("--topology", help="TPU slice, Cloud TPU naming: v4-32, v5p-64, v5e-16, ... "
                   "(v4/v5p names count TensorCores: v5p-64 = 32 chips)")
    p.add_argument("--emulate", type=int, nargs="?", const=0, default=None, metavar="N",
                   help="compile for N emulated CPU devices instead of the TPU compiler "
                        "(N defaults to the topology's chip count)")
    p.add_argument("--num_slices", type=int, default=1, help="multi-slice: slices over DCN")
    p.add_argument("--mesh", default="", help="mesh overrides, e.g. fsdp=-1,tensor=8,expert=1 "
                   f"(axes {', '.join(MESH_AXES)}; -1 takes the remaining devices)")
    p.add_argument("--micro_batch", type=int, help="rows per device per forward/backward pass")
    p.add_argument("--seq_len", type=int, help="tokens per row")
    p.add_argument("--global_batch_tokens", type=int, help="tokens per optimizer step")
    p.add_argument("--remat", choices=("none", "dots", "full"), help="override the remat policy")
    p.add_argument("--hbm_gib", type=float, help="per-device budget (default: the chip's HBM)")
    p.add_argument("--libtpu_dir", default=os.environ.get("JAXLM_LIBTPU_DIR", ""),
                   help="directory holding the libtpu package (pip install --target DIR "
                        "libtpu==0.0.42.1); default $JAXLM_LIBTPU_DIR")
    p.add_argument("--json", help="write the report as JSON here")
    return p.parse_args(argv)


def parse_mesh(text: str) -> dict[str, int]:
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key not in MESH_AXES:
            raise BadInput(f"--mesh: {item!r} is not AXIS=SIZE with AXIS one of {', '.join(MESH_AXES)}")
        try:
            out[key] = int(value)
        except ValueError:
            raise BadInput(f"--mesh: size of {key} must be an integer, got {value!r}") from None
    return out


def load_pretrain_configs():
    spec = importlib.util.spec_from_file_location(
        "pretrain_configs", ROOT / "experiments" / "configs" / "pretrain.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PRETRAIN = ("tiny", "tiny_moe", "test", "test_moe", "llama2_7b", "llama2_70b", "mistral_7b")


def build_config(args):
    """The experiment ConfigDict: a pretrain preset, or a model preset on the llama2_7b recipe."""
    from jaxlm.config import PRESETS

    configs = load_pretrain_configs()
    if args.preset in PRETRAIN:
        c = configs.get_config(args.preset)
    elif args.preset in PRESETS:
        model = PRESETS[args.preset]
        big = model.param_count() > 1e9
        c = configs.get_config("llama2_7b" if big else "test")
        c.model.preset = args.preset
        if model.moe is not None and big:
            c.mesh.update(expert=math.gcd(model.moe.n_experts, 8), fsdp=-1)
    else:
        raise BadInput(f"--preset: unknown preset {args.preset!r}; choose one of "
                       f"{', '.join(sorted(set(PRETRAIN) | set(PRESETS)))}")
    c.mesh.update(parse_mesh(args.mesh))
    for field, value in (("micro_batch_per_device", args.micro_batch), ("seq_len", args.seq_len),
                         ("global_batch_tokens", args.global_batch_tokens)):
        if value is not None:
            if value < 1:
                raise BadInput(f"--{field}: must be a positive integer, got {value}")
            c.train[field] = value
    if args.remat:
        c.model.overrides["remat"] = args.remat
    return c


def _setup_env(args) -> None:
    if args.emulate is not None:
        os.environ["XLA_FLAGS"] = " ".join(
            [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
            + [f"--xla_force_host_platform_device_count={args.emulate}"])
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # TPU AOT needs only libtpu's compiler
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.libtpu_dir:
        sys.path.insert(0, args.libtpu_dir)


def run(argv=None) -> int:
    args = parse_args(argv)
    say = lambda msg: print(f"[aot_check] {msg}", file=sys.stderr, flush=True)
    try:
        if args.topology is None and args.emulate is None:
            raise BadInput("give --topology (a TPU slice such as v5p-32) and/or --emulate N")
        if args.num_slices < 1:
            raise BadInput(f"--num_slices: must be >= 1, got {args.num_slices}")
        if args.emulate is not None and args.emulate < 0:
            raise BadInput(f"--emulate: device count must be positive, got {args.emulate}")
        if args.emulate == 0 and args.topology is None:
            raise BadInput("--emulate without N needs --topology to take the chip count from")
        if args.hbm_gib is not None and args.hbm_gib <= 0:
            raise BadInput(f"--hbm_gib: must be > 0, got {args.hbm_gib}")
        # The emulated device count must be in XLA_FLAGS, and libtpu on sys.path, before JAX
        # starts a backend: settle both before importing anything that imports JAX.
        if args.emulate == 0:
            args.emulate = _chips_from_name(args.topology) * args.num_slices
        _setup_env(args)

        from jaxlm.data.batching import batch_shards, plan_batches
        from jaxlm import sharding
        from jaxlm.sharding import MeshConfig
        from jaxlm.train import aot

        topo = aot.get_topology(args.topology) if args.topology else None
        config = build_config(args)
        n = args.emulate if args.emulate is not None else topo.chips * args.num_slices
        try:
            ici, dcn = MeshConfig(**config.mesh.to_dict()).resolve(n, args.num_slices)
        except ValueError as e:
            raise BadInput(f"--mesh: {e}") from None
        t = config.train
        try:  # the batch arithmetic, checked here rather than inside the compile
            plan_batches(t.global_batch_tokens, t.seq_len, batch_shards(
                {a: i * d for a, i, d in zip(sharding.MESH_AXES, ici, dcn)}), 1, t.micro_batch_per_device)
        except ValueError as e:
            raise BadInput(f"--global_batch_tokens / --seq_len / --micro_batch: {e}") from None
        hbm = (int(args.hbm_gib * aot.GiB) if args.hbm_gib is not None
               else topo.hbm_bytes if topo else None)
    except (BadInput, ValueError) as e:
        print(f"aot_check: error: {e}", file=sys.stderr)
        return 2

    import jax

    if args.emulate is not None:
        devices = jax.devices("cpu")
        if len(devices) != args.emulate:
            print(f"aot_check: error: asked for {args.emulate} emulated devices but JAX has "
                  f"{len(devices)} (was JAX imported before XLA_FLAGS was set?)", file=sys.stderr)
            return 2
        where = f"{args.emulate} emulated CPU devices" + (f" (shape of {topo.name})" if topo else "")
    else:
        say(f"describing {topo.name} ({topo.topology_name}, {topo.chips} chips"
            f"{f' x {args.num_slices} slices' if args.num_slices > 1 else ''}) with libtpu")
        try:
            devices = aot.topology_devices(topo.name, args.num_slices)
        except RuntimeError as e:
            print(f"aot_check: error: {e}", file=sys.stderr)
            return 1
        where = f"{topo.name} ({len(devices)} x {devices[0].device_kind}, TPU compiler)"
    say(f"preset {args.preset} on {where}")
    start = time.perf_counter()
    report = aot.compile_train_step(config, devices, hbm_bytes=hbm,
                                    num_processes=1, progress=say)
    out = report.to_dict()
    out.update(topology=topo.name if topo else None, emulated=args.emulate is not None,
               total_s=time.perf_counter() - start, jax_version=jax.__version__,
               config={"mesh": config.mesh.to_dict(), "train": {
                   k: config.train[k] for k in ("seq_len", "global_batch_tokens",
                                                "micro_batch_per_device")},
                   "model_overrides": config.model.overrides.to_dict()})  # set ones only
    if topo:
        per_dev = report.model_flops_per_step / report.devices
        out["peak_flops_per_chip"] = topo.peak_flops
        out["model_flops_per_device"] = per_dev
        out["step_s_at_mfu"] = {str(m): aot.step_time_at_mfu(report.model_flops_per_step,
                                                              report.devices, topo.peak_flops, m)
                                for m in (0.4, 0.5, 0.6)}
    print(report.summary())
    if topo:
        s = out["step_s_at_mfu"]
        tokens = report.plan["global_batch"] * report.seq_len
        print(f"  at 50% MFU on {topo.name}: {s['0.5']:.2f} s per step, "
              f"{tokens / s['0.5'] / report.devices:,.0f} tokens/s per chip (an expectation)")
    if report.sharding_mismatches:
        print("  parameter shardings differ from the table:\n    "
              + "\n    ".join(report.sharding_mismatches[:10]))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
        say(f"wrote {args.json}")
    ok = report.compiled and report.fits is not False and not report.sharding_mismatches
    return 0 if ok else 1


def _chips_from_name(name: str) -> int:
    """Chips in a Cloud TPU slice name, without importing JAX: v4/v5p count TensorCores (2 per
    chip), v5e counts chips. The full table (and its error for unknown names) is jaxlm.train.aot."""
    gen, _, count = name.partition("-")
    if gen not in ("v4", "v5p", "v5e") or not count.isdigit() or int(count) < 1:
        raise BadInput(f"--topology: {name!r} is not a TPU slice name like v4-32, v5p-64 or v5e-16")
    return int(count) // (1 if gen == "v5e" else 2)


if __name__ == "__main__":
    sys.exit(run())
