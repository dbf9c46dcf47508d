"""CLI: python -m jaxlm.convert import-hf --src HF_DIR --dst CKPT_DIR
       python -m jaxlm.convert export-hf --src CKPT_DIR --dst HF_DIR"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jaxlm.convert",
                                description="Convert between Hugging Face and jaxlm checkpoints.")
    sub = p.add_subparsers(dest="command", required=True)
    imp = sub.add_parser(
        "import-hf", help="HF Llama/Mistral/Mixtral directory -> jaxlm model directory",
        description="Read a transformers LlamaForCausalLM / MistralForCausalLM / "
                    "MixtralForCausalLM directory (config.json + safetensors, sharded index "
                    "too) and write a jaxlm model directory: DST/config.json + DST/params (orbax).")
    imp.add_argument("--src", required=True, help="Hugging Face model directory")
    imp.add_argument("--dst", required=True, help="output jaxlm model directory")
    imp.add_argument("--param_dtype", choices=["float32", "bfloat16"], default=None,
                     help="storage dtype (default: the checkpoint's own dtype if bf16/f32)")
    imp.add_argument("--overwrite", action="store_true",
                     help="replace DST if it already holds a jaxlm model (written beside DST, then renamed into place)")
    exp = sub.add_parser(
        "export-hf", help="jaxlm model directory -> HF directory for transformers / vLLM",
        description="Write a Hugging Face directory (config.json, model.safetensors or shards + "
                    "index, generation_config.json, SentencePiece tokenizer files) from a jaxlm "
                    "model directory (WORKDIR/model from the trainer, or an import-hf output). "
                    "Dense models without a sliding window export as LlamaForCausalLM, with one "
                    "as MistralForCausalLM, MoE models as MixtralForCausalLM.")
    exp.add_argument("--src", required=True, help="jaxlm model directory (config.json + params/)")
    exp.add_argument("--dst", required=True, help="output Hugging Face directory")
    exp.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                     help="tensor dtype on disk (default: the model's param_dtype)")
    exp.add_argument("--max_shard_size", default="5GB", type=_size,
                     help="split model.safetensors into shards of at most this size, with an "
                          "index (e.g. 5GB, 500MB; default 5GB, as transformers)")
    exp.add_argument("--overwrite", action="store_true",
                     help="replace DST if it already holds a Hugging Face model "
                          "(config.json with architectures); anything else is refused")
    return p


def _size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    t = text.strip().upper()
    for unit, scale in units.items():
        if t.endswith(unit) and t[:-len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(t[:-len(unit)]) * scale)
    if t.isdigit():
        return int(t)
    raise argparse.ArgumentTypeError(f"{text!r} is not a size; write e.g. 5GB, 500MB or 2000000")


def import_hf(src: str, dst: str, param_dtype: str | None = None, overwrite: bool = False) -> Path:
    from jaxlm.checkpoint import FORMAT, is_model_directory, save_model
    from jaxlm.convert import hf
    from jaxlm.convert.staging import check_destination, staged_directory
    from jaxlm.paths import as_path

    # --dst is local or a bucket URL (gs://...); checked before the long load. The model is
    # written beside it and renamed into place, so a failure or Ctrl-C leaves --dst as it was.
    dst_path = check_destination(src, dst, overwrite=overwrite, replaceable=is_model_directory,
                                 kind=f"a jaxlm model directory (config.json with format "
                                      f"{FORMAT!r} and params/)")
    overrides = {"param_dtype": param_dtype} if param_dtype else {}
    start = time.perf_counter()
    print(f"reading {src}", file=sys.stderr, flush=True)
    model = hf.load(src, progress=True, **overrides)
    print(f"writing {dst_path}", file=sys.stderr, flush=True)
    with staged_directory(dst_path, "import") as tmp:
        save_model(tmp, model)
        if (Path(src) / "tokenizer.model").is_file():  # Meta / HF Llama dirs ship the SentencePiece model
            as_path(Path(src) / "tokenizer.model").copy(tmp / "tokenizer.model", overwrite=True)
    n = model.cfg.param_count()
    print(f"imported {n / 1e6:.1f}M parameters from {src} -> {dst_path} "
          f"({time.perf_counter() - start:.1f}s)")
    return dst_path


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "import-hf":
            import_hf(args.src, args.dst, args.param_dtype, args.overwrite)
        elif args.command == "export-hf":
            from jaxlm.convert.export import export_hf
            start = time.perf_counter()
            out = export_hf(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite,
                            max_shard_bytes=args.max_shard_size)
            print(f"exported {args.src} -> {out} ({time.perf_counter() - start:.1f}s); load with "
                  f"transformers.AutoModelForCausalLM.from_pretrained({str(out)!r}) or "
                  f"`vllm serve {out}`")
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # --dst is untouched: both commands write beside it (staging.py)
        print("\ninterrupted", file=sys.stderr)
        return 130  # 128 + SIGINT, as a shell reports it
    return 0


if __name__ == "__main__":
    sys.exit(main())
