"""MoE layer throughput: capacity vs dropless dispatch vs a dense SwiGLU of the same active FLOPs,
and tokens/s as the expert count grows at fixed active parameters (should stay near flat).

    python experiments/moe_bench.py                       # CPU-sized defaults
    python experiments/moe_bench.py --d_model 1024 --ffn 2048 --batch 16 --seq_len 2048 --json out.json

Each row times one training step of one layer (forward + backward through a jitted value_and_grad,
median of --repeats after a warm-up). Each MoE row is timed alternating with the dense layer, call
by call, and `vs_dense` is the median of those pairs' time ratios (MoE / dense): the number the
"dropless <= 1.3x dense" target is about, fair on a machine whose speed drifts. MFU = 6 · active layer parameters · tokens / time / peak,
the peak being a large f32 matmul measured in this process on CPU (the device table on TPU/GPU;
printed first). The dispatch einsums / sorts are overhead, not model FLOPs, so they lower MFU
but not the FLOP count. Rows print as they are measured.
`bench_moe(...)` returns the rows (dicts with benchmark, tokens_per_s, mfu, ...) for bench.py.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))


def _layer_step(layer, x, valid):
    """A jitted training step of one FFN layer: loss = mean(y²) + aux_loss, gradients of the
    weights and of the input x (inside a model every layer's backward computes dx for the layer
    below; without it XLA would drop the dense layer's dx matmuls, 2 of its 9, but not the MoE's,
    whose backward computes dx inside a loop)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxlm.model.moe import MoE, MoEMode

    graphdef, state = nnx.split(layer)
    is_moe = isinstance(layer, MoE)

    def loss(state, x):
        module = nnx.merge(graphdef, state)
        y, aux = module(x, valid, MoEMode(train=True)) if is_moe else (module(x), {})
        return jnp.mean(jnp.square(y.astype(jnp.float32))) + aux.get("aux_loss", 0.0)

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    return lambda: jax.block_until_ready(step(state, x))


def bench_moe(*, d_model: int = 256, ffn: int = 512, top_k: int = 2, n_experts: int | None = None,
              expert_counts=(4, 8, 16, 32), batch: int = 8, seq_len: int = 256,
              capacity_factor: float = 1.25, dtype: str = "float32", repeats: int = 3,
              peak_flops: float | None = None, progress=None) -> list[dict]:
    """Rows of {benchmark, tokens_per_s, mfu, n_experts, dispatch, step_ms, vs_dense} for one
    MoE layer (vs_dense: time / the dense layer's time, median of alternating pairs; 1 for dense).

    n_experts: an expert count always in the sweep (bench.py's headline one); progress: called
    with each row as it is measured."""
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from bench import _trace, measured_peak_flops, median_time, race
    from jaxlm.config import ModelConfig
    from jaxlm.model.mlp import SwiGLU
    from jaxlm.model.moe import MoE

    peak = peak_flops or measured_peak_flops()[0]
    tokens = batch * seq_len
    base = ModelConfig(vocab_size=256, d_model=d_model, n_layers=1, n_heads=1, n_kv_heads=1,
                       head_dim=2, ffn_hidden=ffn, dtype=dtype)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(batch, seq_len, d_model)), base.compute_dtype)
    valid = jnp.ones((batch, seq_len), bool)

    def row(name, step, active_params, **extra):
        if extra["dispatch"] == "dense":
            t, vs_dense = median_time(step, repeats), 1.0
        else:
            _, t, vs_dense = race(dense_step, step, repeats)  # ratio: MoE time / dense time
        if extra["dispatch"] == "dropless":
            _trace(step, f"moe_dropless_E{extra['n_experts']}")
        flops = 6 * active_params * tokens
        out = {"benchmark": name, "tokens_per_s": tokens / t, "mfu": flops / t / peak,
               "step_ms": 1e3 * t, "vs_dense": vs_dense, **extra}
        if progress:
            progress(out)
        return out

    def moe(e, dispatch):
        cfg = base.replace(moe=dict(n_experts=e, top_k=top_k, dispatch=dispatch,
                                    capacity_factor=capacity_factor))
        return MoE(cfg, rngs=nnx.Rngs(0))

    active = top_k * 3 * d_model * ffn                                    # k experts per token
    # timed alone, then raced by every MoE row
    dense_step = _layer_step(SwiGLU(base.replace(ffn_hidden=top_k * ffn), rngs=nnx.Rngs(0)), x, valid)
    rows = [row(f"dense swiglu F={top_k * ffn}", dense_step, active, n_experts=0, dispatch="dense")]
    for e in sorted({*expert_counts, *([n_experts] if n_experts else [])}):
        for dispatch in ("capacity", "dropless"):
            rows.append(row(f"moe {dispatch} E={e} k={top_k}", _layer_step(moe(e, dispatch), x, valid),
                            active + d_model * e, n_experts=e, dispatch=dispatch))
    return rows


def main(argv=None) -> int:
    from bench import positive_int, positive_ints

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d_model", type=positive_int, default=256)
    p.add_argument("--ffn", type=positive_int, default=512, help="hidden width of each expert")
    p.add_argument("--top_k", type=positive_int, default=2)
    p.add_argument("--experts", type=positive_ints, default=(4, 8, 16, 32),
                   help="expert counts to sweep, e.g. 4,8,16,32")
    p.add_argument("--batch", type=positive_int, default=8)
    p.add_argument("--seq_len", type=positive_int, default=256)
    p.add_argument("--capacity_factor", type=float, default=1.25)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--repeats", type=positive_int, default=3)
    p.add_argument("--json", default=None, help="write the rows to this JSON file")
    args = p.parse_args(argv)
    if min(args.experts) < args.top_k:
        p.error(f"--experts: every expert count must be >= --top_k ({args.top_k}), got {min(args.experts)}")
    if args.capacity_factor <= 0:
        p.error(f"--capacity_factor: must be > 0, got {args.capacity_factor}")
    from jaxlm.hostmem import keep_freed_memory_for_cli

    import bench

    # Before JAX starts: see jaxlm.hostmem; bench.median_time then also waits out heap growth.
    bench.HOST["memory_kept"] = keep_freed_memory_for_cli(by_default=True)
    peak, peak_source = bench.measured_peak_flops()
    print(f"peak: {peak / 1e9:,.0f} GFLOP/s ({peak_source})")
    header = f"{'benchmark':28s} {'tokens/s':>10s} {'step ms':>9s} {'MFU':>7s} {'vs dense':>9s}"
    print(header, flush=True)
    line = lambda r: print(f"{r['benchmark']:28s} {r['tokens_per_s']:10,.0f} {r['step_ms']:9.1f} "
                           f"{r['mfu']:7.1%} {r['vs_dense']:8.2f}x", flush=True)
    rows = bench_moe(d_model=args.d_model, ffn=args.ffn, top_k=args.top_k,
                     expert_counts=args.experts, batch=args.batch, seq_len=args.seq_len,
                     capacity_factor=args.capacity_factor, dtype=args.dtype,
                     repeats=args.repeats, peak_flops=peak, progress=line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
