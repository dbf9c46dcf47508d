"""CLI: python -m jaxlm.convert import-hf --src HF_DIR --dst CKPT_DIR"""
from __future__ import annotations

import argparse
import shutil
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
                     help="replace DST if it already holds a model")
    return p


def import_hf(src: str, dst: str, param_dtype: str | None = None, overwrite: bool = False) -> Path:
    from jaxlm.checkpoint import save_model
    from jaxlm.convert import hf

    dst_path = Path(dst)
    if dst_path.exists() and any(dst_path.iterdir()) and not overwrite:
        raise FileExistsError(f"{dst}: exists and is not empty; choose another --dst or pass --overwrite")
    overrides = {"param_dtype": param_dtype} if param_dtype else {}
    start = time.perf_counter()
    model = hf.load(src, **overrides)
    if overwrite and dst_path.exists():
        shutil.rmtree(dst_path)
    out = save_model(dst_path, model)
    if (Path(src) / "tokenizer.model").is_file():  # Meta / HF Llama dirs ship the SentencePiece model
        shutil.copy(Path(src) / "tokenizer.model", out / "tokenizer.model")
    n = model.cfg.param_count()
    print(f"imported {n / 1e6:.1f}M parameters from {src} -> {out} "
          f"({time.perf_counter() - start:.1f}s)")
    return out


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "import-hf":
            import_hf(args.src, args.dst, args.param_dtype, args.overwrite)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
