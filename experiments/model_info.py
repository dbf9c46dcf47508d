"""Build a model preset, report its size, and (with --forward) run it on the local devices.

    python experiments/model_info.py --preset tiny --forward
    python experiments/model_info.py --preset llama2_70b            # counts only, nothing allocated
    XLA_FLAGS=--xla_force_host_platform_device_count=8 \
        python experiments/model_info.py --preset tiny --forward --mesh fsdp=2,tensor=4
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def parse_mesh(text: str):
    from jaxlm.sharding import MeshConfig

    fields = {}
    for part in filter(None, text.split(",")):
        name, _, value = part.partition("=")
        try:
            fields[name.strip()] = int(value)
        except ValueError:
            raise ValueError(f"--mesh: {part!r} is not AXIS=INT (e.g. fsdp=4,tensor=2)") from None
    try:
        return MeshConfig(**{"fsdp": 1 if fields else -1, **fields})
    except TypeError:
        raise ValueError(f"--mesh: unknown axis in {text!r}; axes are data, fsdp, expert, tensor") from None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", help="model preset (jaxlm.config.PRESETS)")
    p.add_argument("--forward", action="store_true", help="initialise on the devices and run a forward pass")
    p.add_argument("--mesh", default="", help="mesh axes, e.g. data=2,fsdp=4 (default: fsdp over all devices)")
    p.add_argument("--batch", type=int, default=2, help="batch size of the forward pass")
    p.add_argument("--seq_len", type=int, default=128, help="sequence length of the forward pass")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="compute dtype")
    args = p.parse_args(argv)
    try:
        return run(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def run(args) -> int:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from jaxlm.config import get_preset
    from jaxlm.model import Transformer
    from jaxlm.sharding import init_sharded, make_mesh, state_partition_specs

    cfg = get_preset(args.preset, **({"dtype": args.dtype} if args.dtype else {}))
    mesh = make_mesh(parse_mesh(args.mesh))
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    params = nnx.state(abstract, nnx.Param)
    n = sum(x.size for x in jax.tree.leaves(params))
    nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    print(f"preset {args.preset}: {n:,} parameters ({n / 1e6:.1f}M), {nbytes / 2**30:.2f} GiB "
          f"as {cfg.param_dtype}; {cfg.n_layers} layers, d={cfg.d_model}, heads {cfg.n_heads}/"
          f"{cfg.n_kv_heads} kv, ffn {cfg.ffn_hidden}, window {cfg.sliding_window or 'full'}")
    print(f"mesh {dict(mesh.shape)} over {jax.device_count()} {jax.default_backend()} device(s)")
    specs = nnx.to_pure_dict(state_partition_specs(params, dict(mesh.shape)))
    shapes = nnx.to_pure_dict(params)
    print(f"  {'parameter':28s} {'shape':22s} sharding")
    for path, shape in jax.tree_util.tree_flatten_with_path(shapes)[0]:
        keys = [k.key for k in path]
        spec = specs
        for k in keys:
            spec = spec[k]
        print(f"  {'.'.join(keys):28s} {str(list(shape.shape)):22s} {spec}")
    if not args.forward:
        return 0
    per_device = nbytes / math.prod(mesh.devices.shape)
    if args.preset.startswith(("llama2", "mistral")) and jax.default_backend() == "cpu":
        raise ValueError(f"--forward on {args.preset} needs {per_device / 2**30:.1f} GiB per device; "
                         "use a TPU slice or a small preset (tiny, bench, test)")
    if args.seq_len > cfg.max_seq_len:
        raise ValueError(f"--seq_len {args.seq_len} exceeds the preset's max_seq_len {cfg.max_seq_len}")
    start = time.perf_counter()
    model = init_sharded(lambda: Transformer(cfg, rngs=nnx.Rngs(0)), mesh)
    graphdef, state = nnx.split(model)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, args.seq_len)),
                         jnp.int32)

    @jax.jit
    def forward(state, tokens):
        logits = nnx.merge(graphdef, state)(tokens)
        logp = jax.nn.log_softmax(logits[:, :-1])
        return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))

    with jax.set_mesh(mesh):
        loss = float(forward(state, tokens))
        init_and_compile = time.perf_counter() - start
        start = time.perf_counter()
        loss = float(forward(state, tokens))
    step = time.perf_counter() - start
    tok_s = args.batch * args.seq_len / step
    print(f"forward pass [{args.batch}, {args.seq_len}]: loss {loss:.3f} on random tokens "
          f"(ln V = {math.log(cfg.vocab_size):.3f} expected at init); init + compile "
          f"{init_and_compile:.1f}s, step {step * 1e3:.0f} ms ({tok_s:,.0f} tokens/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
