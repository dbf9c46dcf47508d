"""Data CLI: build a local TFDS dataset, show a packed batch, benchmark the pipeline.

    python -m jaxlm.data build --input 'corpus/**/*.txt' --data_dir DIR [--mode file|line|jsonl]
    python -m jaxlm.data build --input stdlib
    python -m jaxlm.data show --source stdlib --tokenizer /tmp/tok32k --seq_len 64 --batch 2
    python -m jaxlm.data bench --tokenizer /tmp/tok32k --workers 0,1,2 --seq_len 512 --batch 8
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Sequence

from jaxlm.data import documents

SHOW_CHARS = 120  # characters of each segment `show` prints, unless --full


def _tokenizer(path: str | None):
    if path in (None, "bytes"):
        from jaxlm.data.synthetic import ByteTokenizer

        return ByteTokenizer()
    from jaxlm.tokenizer import Tokenizer

    return Tokenizer(path)


def _add_source_args(p: argparse.ArgumentParser, seq_len: int, batch: int) -> None:
    p.add_argument("--source", default="stdlib", help="stdlib | local:GLOB | tfds:NAME | synthetic "
                   "(default stdlib: the embedded Python standard library corpus)")
    p.add_argument("--data_dir", default=None, help="TFDS data_dir (default: $JAXLM_DATA_DIR or "
                   "~/.cache/jaxlm/tfds for stdlib/local, TFDS's default for tfds:)")
    p.add_argument("--split", default="train", help="train | validation | any TFDS split")
    p.add_argument("--text_field", default="text", help="example field holding the text")
    p.add_argument("--mode", default="file", choices=documents.MODES, help="local: documents per")
    p.add_argument("--seq_len", type=int, default=seq_len, help=f"tokens per row (default {seq_len})")
    p.add_argument("--batch", type=int, default=batch, help=f"rows per batch (default {batch})")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed (default 0)")
    p.add_argument("--read_threads", type=int, default=2, help="reader threads (default 2)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jaxlm.data", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="build local text into a TFDS (array_record) dataset",
                       description="Build local text files (or the embedded stdlib corpus) into "
                       "a TFDS dataset `local_text/<config>` in DATA_DIR and print a summary "
                       "line. An unchanged input is reused, not rebuilt.")
    b.add_argument("--input", required=True, help="a quoted glob ('**' recurses) or 'stdlib'")
    b.add_argument("--data_dir", default=None, help="output TFDS data_dir (default: "
                   "$JAXLM_DATA_DIR or ~/.cache/jaxlm/tfds)")
    b.add_argument("--mode", default="file", choices=documents.MODES, help="one document per "
                   "file, per non-blank line, or per JSONL record (default file)")
    b.add_argument("--text_field", default="text", help="JSONL field holding the text")
    b.add_argument("--eval_fraction", type=float, default=0.01, help="fraction of documents held "
                   "out as split 'validation', by hash of the file (or file:line) key")
    b.add_argument("--max_chars", type=int, default=documents.DEFAULT_MAX_CHARS, help="documents "
                   "longer than this are split into pieces (default 1000000)")
    b.add_argument("--progress", action="store_true", help="show TFDS progress bars")

    s = sub.add_parser("show", help="print one packed batch, decoded, segment by segment",
                       description="Build/open the source, pack one batch and print each "
                       "segment: its positions, whether it starts with BOS / ends with EOS, and "
                       "its text.")
    _add_source_args(s, seq_len=128, batch=2)
    s.add_argument("--tokenizer", default=None, help="SentencePiece .model (or its folder); "
                   "default: bytes (UTF-8 byte tokens)")
    s.add_argument("--full", action="store_true", help="print whole segments")

    n = sub.add_parser("bench", help="pipeline tokens/s for several worker counts",
                       description="Median tokens/s of the pipeline (first batch not timed) "
                       "for each worker count; prints a Markdown table and a JSON line.")
    _add_source_args(n, seq_len=512, batch=8)
    n.add_argument("--tokenizer", required=True, help="SentencePiece .model (or its folder), or "
                   "'bytes'")
    n.add_argument("--workers", default="0,1,2", help="comma-separated worker counts (default 0,1,2)")
    n.add_argument("--batches", type=int, default=50, help="timed batches per run (default 50)")
    n.add_argument("--repeats", type=int, default=3, help="runs per worker count (default 3)")
    return p


def _config(args: argparse.Namespace):
    from jaxlm.data.pipeline import DataConfig

    return DataConfig(source=args.source, data_dir=args.data_dir, split=args.split,
                      text_field=args.text_field, mode=args.mode, seq_len=args.seq_len,
                      batch_size=args.batch, seed=args.seed, read_threads=args.read_threads)


def show_batch(batch: dict, tokenizer, full: bool = False) -> str:
    """Text of a packed batch: one line per segment of each row."""
    lines = []
    for r in range(batch["inputs"].shape[0]):
        seg = batch["segment_ids"][r]
        lines.append(f"row {r}: {int((seg > 0).sum())} tokens, {int(seg.max())} segments")
        for s in range(1, int(seg.max()) + 1):
            cols = (seg == s).nonzero()[0]
            ids = list(batch["inputs"][r, cols]) + [batch["targets"][r, cols[-1]]]
            head = "BOS" if ids[0] == tokenizer.bos_id else "continued"
            tail = "EOS" if ids[-1] == tokenizer.eos_id else "continues"
            text = tokenizer.decode(ids)
            text = text if full or len(text) <= SHOW_CHARS else text[:SHOW_CHARS] + "..."
            lines.append(f"  seg {s}: positions {batch['positions'][r, cols[0]]}.."
                         f"{batch['positions'][r, cols[-1]]}, {head} .. {tail}: {text!r}")
    return "\n".join(lines)


def _run(args: argparse.Namespace) -> None:
    if args.command == "build":
        from jaxlm.data import sources, tfds_text

        read = documents.ReadOptions(args.mode, args.text_field, args.eval_fraction,
                                     args.max_chars)
        result = tfds_text.build_local_text(args.input, args.data_dir or sources.default_data_dir(),
                                            read, progress=args.progress)
        print(result.summary)
        print(f"read it with: tfds.data_source({result.name!r}, data_dir={result.data_dir!r}, "
              f"split='train') or DataConfig(source='local:...' | 'stdlib')")
    elif args.command == "show":
        from jaxlm.data.pipeline import make_pretrain_iterator

        tok = _tokenizer(args.tokenizer)
        it = make_pretrain_iterator(_config(args), tok, process_index=0, process_count=1)
        print(show_batch(next(it), tok, args.full))
        it.close()
    elif args.command == "bench":
        from jaxlm.data import bench

        try:
            workers = [int(w) for w in args.workers.split(",")]
        except ValueError:
            raise ValueError(f"--workers {args.workers!r}: give comma-separated integers") from None
        cfg = _config(args)
        rows = bench.bench(cfg, _tokenizer(args.tokenizer), workers, args.batches, args.repeats)
        print(bench.bench_table(cfg, rows, args.batches))
        print(json.dumps({"config": dataclasses.asdict(cfg), "rows": rows}))


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; bad input prints one `error:` line and returns 2."""
    args = _parser().parse_args(argv)
    try:
        _run(args)
    except (ValueError, FileNotFoundError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {msg}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
