"""SentencePiece BPE tokenizer the Llama-2 way: training, loading, and a small CLI.

Llama 2 §2.2 (SPEC §2): SentencePiece BPE, 32k vocabulary, numbers split into single digits,
unknown UTF-8 decomposed into bytes (byte fallback). The remaining options below are copied from
the trainer/normaliser spec stored inside Meta's `tokenizer.model`, so a tokenizer trained here
splits text by the same rules as Meta's, and Meta's own file loads behind the same `Tokenizer`.

    python -m jaxlm.tokenizer train --input 'data/*.txt' --vocab_size 32000 --out DIR
    python -m jaxlm.tokenizer encode --model DIR/tokenizer.model --text "Hello 2026"
    python -m jaxlm.tokenizer bench --model DIR/tokenizer.model --input stdlib

The chat format (Meta's `chat_completion`) lives in `jaxlm/chat.py`.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import io
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import sentencepiece as spm
from tqdm import tqdm

from jaxlm.data import stdlib_corpus

MODEL_FILENAME = "tokenizer.model"
INFO_FILENAME = "tokenizer.json"
# `--input stdlib` means the embedded default corpus (jaxlm/data/stdlib_corpus.py), not a file.
STDLIB = "stdlib"
# 3 special pieces (unk, bos, eos) + 256 byte-fallback pieces must fit before any learned piece.
MIN_VOCAB_SIZE = 3 + 256 + 1

# What makes a tokenizer "the Llama-2 tokenizer": SPEC §2 plus the trainer_spec/normalizer_spec
# stored in Meta's tokenizer.model. Not exposed as flags on purpose.
LLAMA2_SPM_OPTIONS = dict(
    model_type="bpe",
    split_digits=True,  # "we split all numbers into individual digits" (Llama 2 §2.2)
    byte_fallback=True,  # unknown UTF-8 -> <0xNN> pieces, so no text ever becomes unk
    normalization_rule_name="identity",  # no NFKC: the text is not rewritten
    remove_extra_whitespaces=False,  # keep runs of spaces (code indentation) as they are
    add_dummy_prefix=True,  # "▁" before the text like Llama; decode removes it again
    allow_whitespace_only_pieces=True,  # pieces like "▁▁▁▁" (Meta's model has this too)
    split_by_whitespace=True,  # "▁" always starts a piece: chat.py's mask boundary relies on it
    split_by_unicode_script=True,
    split_by_number=True,
    max_sentencepiece_length=16,
    unk_id=0, bos_id=1, eos_id=2, pad_id=-1,  # SPEC §1: unk 0, bos 1, eos 2, no pad token
    hard_vocab_limit=True,  # exactly vocab_size pieces: the model's embedding is sized from it
    # Sampling is done here in Python (sample_lines), seeded, so SentencePiece gets the final
    # sentence set and must not subsample again (0 = use all).
    input_sentence_size=0,
    shuffle_input_sentence=False,
)


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """The knobs of tokenizer training that are not fixed by LLAMA2_SPM_OPTIONS.

    The learned pieces do not depend on num_threads (checked in tests: 1 vs 2 threads give the
    same vocabulary), but SentencePiece records num_threads inside the .model file, so byte-equal
    files need the same num_threads too.
    """

    vocab_size: int = 32000  # Llama 2 §2.2
    seed: int = 0  # seeds the line sampling (and SentencePiece's own generator)
    max_sentences: int = 2_000_000  # lines kept (uniform sample) when the corpus has more
    character_coverage: float = 0.99995  # Meta's value; rarer characters become byte pieces
    max_sentence_length: int = 4192  # bytes; Meta's value; longer lines are skipped
    num_threads: int = dataclasses.field(default_factory=lambda: os.cpu_count() or 1)

    def __post_init__(self):
        if self.vocab_size < MIN_VOCAB_SIZE:
            raise ValueError(f"vocab_size={self.vocab_size} is too small: byte fallback needs "
                             f"3 special + 256 byte pieces; use --vocab_size >= {MIN_VOCAB_SIZE}")
        if self.max_sentences < 1:
            raise ValueError(f"max_sentences={self.max_sentences} must be >= 1")
        if not 0.0 < self.character_coverage <= 1.0:
            raise ValueError(f"character_coverage={self.character_coverage} must be in (0, 1]")
        if self.num_threads < 1:
            raise ValueError(f"num_threads={self.num_threads} must be >= 1")

    def spm_kwargs(self) -> dict:
        """All keyword arguments for SentencePieceTrainer.train, fixed options included."""
        return dict(LLAMA2_SPM_OPTIONS, vocab_size=self.vocab_size,
                    character_coverage=self.character_coverage,
                    max_sentence_length=self.max_sentence_length, num_threads=self.num_threads)


# ----------------------------------------------------------------------------- loading


def resolve_model_path(path: str | os.PathLike) -> Path:
    """A .model file, or a directory holding tokenizer.model; FileNotFoundError otherwise."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / MODEL_FILENAME
    if not p.is_file():
        raise FileNotFoundError(f"tokenizer model {str(p)!r} not found; pass a SentencePiece .model "
                                f"file or a directory containing {MODEL_FILENAME} (train one with "
                                f"`python -m jaxlm.tokenizer train`)")
    return p


class Tokenizer:
    """Any SentencePiece model (ours or Meta's Llama-2 tokenizer.model) behind a small interface.

    Round trip: with the options above, decode(encode(s)) == s exactly for every str s that does
    not contain U+2581 "▁" (checked on random Unicode in tests). add_dummy_prefix puts a "▁"
    before the text and decode removes exactly that one, so leading spaces survive; byte fallback
    covers any character outside the vocabulary, so no id is unk. "▁" itself is SentencePiece's
    space symbol and decodes to " " (Meta's model does the same); nothing in the options fixes it.

    Ids outside [0, vocab_size) are dropped by decode/decode_batch: they are the padding rows of an
    embedding padded to `padded_vocab_size()` (a model may sample them) and the pad id -1.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = resolve_model_path(path)
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{str(self.path)!r} is not a SentencePiece model: {e}") from None

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"

    @property
    def vocab_size(self) -> int:
        return self.sp.vocab_size()

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    @property
    def unk_id(self) -> int:
        return self.sp.unk_id()

    @property
    def pad_id(self) -> int:
        """-1 for Llama-2 (no pad token): pad with a real id and mask instead."""
        return self.sp.pad_id()

    def padded_vocab_size(self, multiple: int = 128) -> int:
        """vocab_size rounded up to a multiple (128: TPU lane width). Set the model's V from this."""
        return -(-self.vocab_size // multiple) * multiple

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of `text`, optionally wrapped in bos/eos (as Meta's Tokenizer.encode)."""
        if not isinstance(text, str):  # SentencePiece would silently batch-encode a list
            raise TypeError(f"encode takes a str, got {type(text).__name__}; use encode_batch")
        return self._wrap(self.sp.encode(text), bos, eos)

    def encode_batch(self, texts: Sequence[str], bos: bool = False, eos: bool = False,
                     num_threads: int = -1) -> list[list[int]]:
        """encode() of many texts with SentencePiece's multi-threaded batch encoder.

        num_threads=-1 uses every core.
        """
        if isinstance(texts, str):  # list("abc") would encode characters one by one
            raise TypeError("encode_batch takes a list of str; use encode for one text")
        num_threads = _threads(num_threads)
        return [self._wrap(ids, bos, eos)
                for ids in self.sp.encode(list(texts), num_threads=num_threads)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; bos/eos decode to nothing, ids outside the vocab are dropped."""
        return self.sp.decode(self._in_vocab(ids))

    def decode_batch(self, batch: Iterable[Iterable[int]]) -> list[str]:
        """decode() of each id sequence."""
        batch = [self._in_vocab(ids) for ids in batch]
        return self.sp.decode(batch) if batch else []  # SentencePiece decodes [] as one text

    def pieces(self, ids: Iterable[int]) -> list[str]:
        """The piece strings of `ids` (debugging and tests), e.g. ["▁", "2", "0", "2", "6"]."""
        return [self.sp.id_to_piece(i) for i in self._in_vocab(ids)]

    def _wrap(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def _in_vocab(self, ids: Iterable[int]) -> list[int]:
        # int() accepts NumPy / JAX scalars; SentencePiece raises IndexError on out-of-range ids.
        n = self.vocab_size
        return [i for i in map(int, ids) if 0 <= i < n]


def _threads(num_threads: int) -> int:
    """-1 means every core."""
    return (os.cpu_count() or 1) if num_threads == -1 else num_threads


def check_model_vocab(tokenizer: Tokenizer, model_vocab_size: int) -> None:
    """Raises ValueError if a model's embedding has fewer rows than the tokenizer has ids."""
    if model_vocab_size < tokenizer.vocab_size:
        raise ValueError(
            f"model vocab_size={model_vocab_size} is smaller than the tokenizer's "
            f"{tokenizer.vocab_size} pieces ({tokenizer.path}); ids >= {model_vocab_size} would "
            f"index past the embedding. Set the model config's vocab_size to "
            f"tokenizer.padded_vocab_size() = {tokenizer.padded_vocab_size()}")


# ----------------------------------------------------------------------------- corpus


def match_files(input_glob: str) -> list[Path]:
    """Files matched by a glob (`**` recurses), sorted; FileNotFoundError when none match."""
    files = sorted(Path(p) for p in glob.glob(os.path.expanduser(input_glob), recursive=True)
                   if os.path.isfile(p))
    if not files:
        raise FileNotFoundError(f"no files match --input {input_glob!r}; check the path (quote the "
                                f"glob so the shell passes it unexpanded) or use --input {STDLIB} "
                                f"for the embedded corpus")
    return files


def iter_corpus(input_glob: str) -> tuple[int, Iterator[str]]:
    """(number of documents, documents) for a glob or the special value `stdlib`.

    A document is one file's text (UTF-8, errors="replace"), read one at a time.
    """
    if input_glob == STDLIB:
        return stdlib_corpus.num_documents(), stdlib_corpus.iter_documents()
    files = match_files(input_glob)
    return len(files), (f.read_bytes().decode("utf-8", errors="replace") for f in files)


@dataclasses.dataclass
class CorpusStats:
    """What training read: documents (files), lines, UTF-8 bytes, and what it kept."""

    files: int = 0
    lines: int = 0  # all lines, blank ones included
    bytes: int = 0
    too_long_lines: int = 0  # over max_sentence_length bytes; SentencePiece would skip them
    sentences: int = 0  # non-empty lines eligible for training
    sampled: int = 0  # lines given to SentencePiece (<= max_sentences)


def corpus_lines(input_glob: str, max_bytes: int, stats: CorpusStats,
                 progress: bool = True) -> Iterator[str]:
    """Non-empty lines of the corpus (without line ends), updating `stats` as it reads."""
    total, docs = iter_corpus(input_glob)
    for doc in tqdm(docs, total=total, desc="reading corpus", unit="file", disable=not progress):
        stats.files += 1
        # StringIO(newline=None) = universal newlines, like reading a text file: \r\n, \r -> \n.
        for line in io.StringIO(doc, newline=None):
            stats.lines += 1
            n = len(line.encode("utf-8", errors="replace"))
            stats.bytes += n
            if line.endswith("\n"):
                line, n = line[:-1], n - 1
            if not line:
                continue
            if n > max_bytes:
                stats.too_long_lines += 1
                continue
            stats.sentences += 1
            yield line


def sample_lines(lines: Iterable[str], k: int, seed: int) -> list[str]:
    """A uniform random sample of k lines (all if fewer), kept in corpus order.

    Reservoir sampling (Algorithm R) with a seeded Python RNG: one pass, memory O(k), and the
    same sample for the same corpus and seed on every machine. SentencePiece's own sampler
    (input_sentence_size) is seeded from the clock unless told otherwise and is not used.
    """
    rng = random.Random(seed)
    reservoir: list[tuple[int, str]] = []
    for i, line in enumerate(lines):
        if i < k:
            reservoir.append((i, line))
        else:
            j = rng.randrange(i + 1)
            if j < k:
                reservoir[j] = (i, line)
    reservoir.sort()
    return [line for _, line in reservoir]


# ----------------------------------------------------------------------------- training


def train_tokenizer(input_glob: str, out_dir: str | os.PathLike, vocab_size: int = 32000,
                    seed: int = 0, max_sentences: int = 2_000_000, *,
                    character_coverage: float = 0.99995, num_threads: int | None = None,
                    progress: bool = True, verbose: bool = False) -> Path:
    """Trains a Llama-2-style SentencePiece BPE model and returns the path of its .model file.

    Writes `out_dir/tokenizer.model` and `out_dir/tokenizer.json` (settings, input, counts).
    Args:
      input_glob: files to read (`**` recurses), or "stdlib" for the embedded default corpus.
      max_sentences: lines (= SentencePiece sentences) kept, sampled uniformly with `seed`.
      progress: tqdm bar while reading; verbose: SentencePiece's own log on stderr.
    Raises:
      FileNotFoundError if the glob matches nothing; ValueError for an empty corpus or a
      vocab_size the corpus cannot support.
    """
    kw = {} if num_threads is None else {"num_threads": num_threads}
    settings = TrainSettings(vocab_size=vocab_size, seed=seed, max_sentences=max_sentences,
                             character_coverage=character_coverage, **kw)
    stats = CorpusStats()
    start = time.perf_counter()
    lines = sample_lines(corpus_lines(input_glob, settings.max_sentence_length, stats, progress),
                         settings.max_sentences, settings.seed)
    stats.sampled = len(lines)
    if not lines:
        raise ValueError(f"corpus {input_glob!r} has no text: {stats.files} file(s) read, all "
                         f"empty or only line breaks; point --input at text files")
    model = _run_sentencepiece(lines, settings, input_glob, verbose)
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    (out / MODEL_FILENAME).write_bytes(model)
    info = dict(input=input_glob, **dataclasses.asdict(stats),
                seed=settings.seed, settings=dataclasses.asdict(settings),
                sentencepiece_options=LLAMA2_SPM_OPTIONS, sentencepiece_version=spm.__version__,
                seconds=round(time.perf_counter() - start, 2))
    (out / INFO_FILENAME).write_text(json.dumps(info, indent=2) + "\n")
    return out / MODEL_FILENAME


def _run_sentencepiece(lines: list[str], settings: TrainSettings, input_glob: str,
                       verbose: bool) -> bytes:
    """SentencePiece training on in-memory lines; its size errors become one clear ValueError."""
    # BPE training draws no random numbers today; seeding costs nothing and guards the future.
    spm.set_random_generator_seed(settings.seed)
    writer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=writer,
                                       minloglevel=0 if verbose else 2, **settings.spm_kwargs())
    except RuntimeError as e:
        raise _vocab_error(str(e), settings, input_glob) from None
    return writer.getvalue()


def _vocab_error(message: str, settings: TrainSettings, input_glob: str) -> Exception:
    """Turns SentencePiece's vocabulary-size failures into a ValueError saying what to change."""
    v = settings.vocab_size
    if "Vocabulary size too high" in message:
        limit = message.rsplit("<=", 1)[-1].strip(" .")
        return ValueError(f"corpus {input_glob!r} is too small for vocab_size={v}: SentencePiece "
                          f"can build at most {limit} pieces from it; pass a smaller --vocab_size "
                          f"(<= {limit}) or more text")
    if "smaller than required_chars" in message:
        need = message.rsplit("vs", 1)[-1].split(".")[0].strip()
        return ValueError(f"vocab_size={v} is smaller than the {need} pieces corpus {input_glob!r} "
                          f"needs (specials, 256 bytes, its characters); pass --vocab_size >= "
                          f"{need} or a lower --character_coverage")
    return RuntimeError(f"SentencePiece training on {input_glob!r} failed: {message}")


# ----------------------------------------------------------------------------- benchmark


def bench(model: str | os.PathLike, input_glob: str = STDLIB, repeats: int = 3,
          num_threads: int = -1) -> dict:
    """Encode throughput on a corpus: batched multi-threaded vs a one-at-a-time Python loop.

    Each document is encoded whole; MB/s = UTF-8 megabytes / median seconds over `repeats`.
    """
    tok = Tokenizer(model)
    _, docs_iter = iter_corpus(input_glob)
    docs = list(docs_iter)
    mb = sum(len(d.encode("utf-8")) for d in docs) / 1e6
    threads = _threads(num_threads)

    def median_seconds(fn):
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t)
        return statistics.median(times), out

    batch_s, batch_ids = median_seconds(lambda: tok.encode_batch(docs, num_threads=threads))
    loop_s, loop_ids = median_seconds(lambda: [tok.encode(d) for d in docs])
    if batch_ids != loop_ids:  # both paths must tokenise identically, or the timing means nothing
        raise RuntimeError("encode_batch and encode disagree; please report this")
    tokens = sum(map(len, batch_ids))
    return dict(model=str(tok.path), vocab_size=tok.vocab_size, input=input_glob,
                documents=len(docs), megabytes=round(mb, 3), tokens=tokens,
                bytes_per_token=round(mb * 1e6 / max(tokens, 1), 3), repeats=repeats,
                threads=threads, batch_seconds=round(batch_s, 4), loop_seconds=round(loop_s, 4),
                batch_mb_per_s=round(mb / batch_s, 2), loop_mb_per_s=round(mb / loop_s, 2),
                speedup=round(loop_s / batch_s, 2))


def bench_table(r: dict) -> str:
    """A small Markdown table of a bench() result."""
    return "\n".join([
        f"{r['documents']} documents, {r['megabytes']} MB, {r['tokens']} tokens "
        f"({r['bytes_per_token']} bytes/token), vocab {r['vocab_size']}, median of {r['repeats']}",
        "",
        "| encode | threads | seconds | MB/s |",
        "|---|---:|---:|---:|",
        f"| `encode_batch` (SentencePiece, batched) | {r['threads']} | {r['batch_seconds']} "
        f"| {r['batch_mb_per_s']} |",
        f"| `encode` in a Python loop | 1 | {r['loop_seconds']} | {r['loop_mb_per_s']} |",
    ])


# ----------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jaxlm.tokenizer", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    input_help = (f"a quoted glob of UTF-8 text files ('**' recurses), or the special value "
                  f"'{STDLIB}': the Python standard library of this interpreter (its .py sources "
                  f"minus site-packages and test folders, plus the pydoc topics); write ./{STDLIB} "
                  f"for a file of that name")

    t = sub.add_parser("train", help="train a Llama-2-style SentencePiece BPE tokenizer",
                       description="Train SentencePiece BPE as Llama 2 did (digits split, byte "
                       "fallback, identity normalisation, unk 0 / bos 1 / eos 2, no pad). Writes "
                       "DIR/tokenizer.model and DIR/tokenizer.json.")
    t.add_argument("--input", required=True, help=input_help)
    t.add_argument("--out", required=True, help="output directory (created if missing)")
    t.add_argument("--vocab_size", type=int, default=32000, help="pieces in the vocabulary, "
                   "exactly (default 32000, Llama 2)")
    t.add_argument("--seed", type=int, default=0, help="seed of the line sampling (default 0)")
    t.add_argument("--max_sentences", type=int, default=2_000_000, help="when the corpus has more "
                   "non-empty lines than this, train on a uniform seeded sample of this many "
                   "(default 2000000)")
    t.add_argument("--character_coverage", type=float, default=0.99995, help="fraction of "
                   "characters given their own piece; the rest become byte pieces (default 0.99995)")
    t.add_argument("--num_threads", type=int, default=None, help="SentencePiece training threads "
                   "(default: all cores; the vocabulary does not depend on it)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--verbose", action="store_true", help="show SentencePiece's own training log")

    e = sub.add_parser("encode", help="print the token ids of a text",
                       description="Print the token ids of --text, space separated.")
    e.add_argument("--model", required=True, help="a .model file or a directory holding one")
    e.add_argument("--text", required=True, help="the text to encode")
    e.add_argument("--bos", action="store_true", help="prepend the bos id")
    e.add_argument("--eos", action="store_true", help="append the eos id")
    e.add_argument("--pieces", action="store_true", help="also print the pieces on a second line")

    b = sub.add_parser("bench", help="encode throughput: batched vs a Python loop",
                       description="Encode a corpus with encode_batch (multi-threaded) and with "
                       "encode in a Python loop; print a Markdown table and a JSON line.")
    b.add_argument("--model", required=True, help="a .model file or a directory holding one")
    b.add_argument("--input", default=STDLIB, help=input_help + f" (default {STDLIB})")
    b.add_argument("--repeats", type=int, default=3, help="timed repeats; the median is reported (default 3)")
    b.add_argument("--num_threads", type=int, default=-1, help="threads of encode_batch "
                   "(default -1: all cores)")
    return p


def _run(args: argparse.Namespace) -> None:
    if args.command == "train":
        path = train_tokenizer(args.input, args.out, args.vocab_size, args.seed,
                               args.max_sentences, character_coverage=args.character_coverage,
                               num_threads=args.num_threads, progress=not args.quiet,
                               verbose=args.verbose)
        i = json.loads((path.parent / INFO_FILENAME).read_text())
        print(f"trained BPE vocab {args.vocab_size} on {i['sampled']:,} of {i['sentences']:,} "
              f"lines ({i['files']:,} files, {i['bytes'] / 1e6:.1f} MB, seed {i['seed']}) in "
              f"{i['seconds']:.1f} s -> {path}")
    elif args.command == "encode":
        tok = Tokenizer(args.model)
        ids = tok.encode(args.text, bos=args.bos, eos=args.eos)
        print(" ".join(map(str, ids)))
        if args.pieces:
            print(" ".join(tok.pieces(ids)))
    elif args.command == "bench":
        result = bench(args.model, args.input, args.repeats, args.num_threads)
        print(bench_table(result))
        print(json.dumps(result))


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; bad input prints one `error:` line and returns 2 (argparse's usage code)."""
    args = _parser().parse_args(argv)
    try:
        _run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
