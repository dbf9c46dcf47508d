"""Local text → documents: one per file, per line, or per JSONL record, and what counts as bad input.

The TFDS builder (`tfds_text.py`) is a thin shell around this file: everything that decides what
a document is, which split it belongs to and which inputs are skipped lives here, testable
without TFDS.

Bad-input policy (never crash, never drop a good document because of a bad one):
- binary: a file containing a NUL byte, or whose text after UTF-8 decoding with replacement is
  more than BINARY_REPLACEMENT_RATIO U+FFFD characters, is skipped (counted "binary");
- invalid UTF-8 otherwise: decoded with errors="replace" (counted "decoded with replacement");
- empty: a file (file mode) or record with no non-whitespace text is skipped (counted "empty");
  blank lines in line/JSONL mode are separators, not counted;
- JSONL records that are not JSON objects, or lack a string `text_field`, are skipped (counted);
- long: a document over `max_chars` characters is split into pieces of at most max_chars
  (cut after the last newline in the second half of a window, else a hard cut). Every piece is
  its own document (it gets its own BOS/EOS when tokenised); no character is lost.

Split: a document is in the eval split "validation" when the hash of its key (the file key in
file mode, "file:line" in line/JSONL mode) falls below `eval_fraction`; the pieces of a split
document follow their parent. Small corpora: if no key falls below, the one with the smallest
hash is held out anyway (when there are at least two), and the train split always keeps one, so
both splits exist (TFDS cannot write an empty split). eval_fraction=0 means no validation split.
Deciding this needs every key first, so a build reads the input twice: `scan` (keys and counts),
then `iter_split` once per split.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from jaxlm.data import stdlib_corpus

MODES = ("file", "line", "jsonl")
STDLIB = "stdlib"
TRAIN, VALIDATION = "train", "validation"
DEFAULT_MAX_CHARS = 1_000_000  # ~250k tokens: a document this long is split into pieces
BINARY_REPLACEMENT_RATIO = 0.3  # more U+FFFD than this fraction of characters -> binary
# (Latin-1 or CP-1252 prose read as UTF-8 gives a few percent; random bytes give over half.)


@dataclasses.dataclass(frozen=True)
class Item:
    """One input unit before reading: a file, or an in-memory text (pydoc topics)."""

    key: str  # stable id, independent of the machine: relative path or "pydoc/<topic>"
    path: Path | None = None
    text: str | None = None


@dataclasses.dataclass
class BuildStats:
    """Counts of one build, by split; summary() is the line the CLI prints."""

    files: int = 0  # inputs read: files, or pydoc topics for stdlib
    documents: dict = dataclasses.field(default_factory=lambda: {TRAIN: 0, VALIDATION: 0})
    empty: int = 0
    binary: int = 0
    replaced: int = 0  # files (or records) decoded with replacement characters
    split_long: int = 0  # documents over max_chars
    pieces: int = 0  # documents those were split into
    bad_json: int = 0
    missing_field: int = 0

    def summary(self, name: str, verb: str = "built") -> str:
        d = self.documents
        parts = [f"{verb} {name}: {d[TRAIN] + d[VALIDATION]} documents ({d[TRAIN]} train, "
                 f"{d[VALIDATION]} validation) from {self.files} inputs",
                 f"{self.empty} empty skipped", f"{self.binary} binary skipped",
                 f"{self.replaced} decoded with replacement"]
        if self.split_long:
            parts.append(f"{self.split_long} over max_chars split into {self.pieces} pieces")
        if self.bad_json or self.missing_field:
            parts.append(f"{self.bad_json} invalid JSON lines, {self.missing_field} records "
                         f"without the text field skipped")
        return ", ".join(parts)


# ----------------------------------------------------------------------------- inputs


def list_items(input_spec: str) -> list[Item]:
    """The inputs of a build: `stdlib` (the embedded corpus) or a glob of files (`**` recurses).

    Keys are paths relative to the deepest folder holding all matched files, so the same tree
    gives the same keys (and the same split) on every machine.
    """
    if input_spec == STDLIB:
        root = stdlib_corpus.stdlib_root()
        from pydoc_data.topics import topics  # same documents, same order as stdlib_corpus

        return ([Item(p.relative_to(root).as_posix(), path=p)
                 for p in stdlib_corpus.stdlib_files()] +
                [Item(f"pydoc/{name}", text=topics[name]) for name in sorted(topics)])
    from jaxlm.tokenizer import match_files  # FileNotFoundError with a fix when nothing matches

    files = match_files(input_spec)
    root = Path(os.path.commonpath([f.resolve().parent for f in files]))
    return [Item(f.resolve().relative_to(root).as_posix(), path=f) for f in files]


def fingerprint(items: Sequence[Item]) -> str:
    """A hash of the inputs' keys, sizes and modification times (a changed file -> new build)."""
    h = hashlib.sha256()
    for it in items:
        st = it.path.stat() if it.path else None
        meta = f"{st.st_size}:{st.st_mtime_ns}" if st else str(len(it.text or ""))
        h.update(f"{it.key}\0{meta}\n".encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------- splits


def key_hash(key: str) -> float:
    """A uniform number in [0, 1) from a key (sha256: the same on every machine and Python)."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2.0 ** 64


def validation_keys(keys: Iterable[str], eval_fraction: float) -> set[str]:
    """The held-out keys: those hashing below eval_fraction, adjusted so that, with two or more
    keys and eval_fraction > 0, both the held-out and the training set are non-empty."""
    held, n, lowest = set(), 0, None
    for k in keys:
        n, h = n + 1, key_hash(k)
        if h < eval_fraction:
            held.add(k)
        if lowest is None or h < lowest[0]:
            lowest = (h, k)
    if n < 2 or eval_fraction <= 0:
        return set()
    if not held:
        held = {lowest[1]}
    if len(held) == n:
        held.discard(max(held, key=key_hash))
    return held


# ----------------------------------------------------------------------------- decoding


def decode(data: bytes, stats: BuildStats) -> str | None:
    """UTF-8 text of a file's bytes, or None (counted) when it is binary or empty."""
    if b"\x00" in data:  # memchr: fast even on 100 MB
        stats.binary += 1
        return None
    replaced = False
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("utf-8", errors="replace")
        if text.count("\ufffd") > BINARY_REPLACEMENT_RATIO * len(text):
            stats.binary += 1
            return None
        replaced = True
    if not text or text.isspace():
        stats.empty += 1
        return None
    stats.replaced += replaced
    return text


def split_long(text: str, max_chars: int) -> list[str]:
    """Pieces of at most max_chars characters whose concatenation is `text`.

    A cut goes after the last newline in the second half of the window, so code and prose are
    cut between lines where possible; a single long line is cut hard at max_chars.
    """
    pieces, start = [], 0
    while len(text) - start > max_chars:
        end = start + max_chars
        nl = text.rfind("\n", start + max_chars // 2, end)
        end = nl + 1 if nl >= 0 else end
        pieces.append(text[start:end])
        start = end
    pieces.append(text[start:])
    return pieces


# ----------------------------------------------------------------------------- documents


@dataclasses.dataclass(frozen=True)
class ReadOptions:
    """How local text becomes documents (part of the dataset's fingerprint)."""

    mode: str = "file"
    text_field: str = "text"  # JSONL mode: the record field holding the text
    eval_fraction: float = 0.01
    max_chars: int = DEFAULT_MAX_CHARS

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r} is not one of {', '.join(MODES)}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction={self.eval_fraction} must be in [0, 1)")
        if self.max_chars < 1:
            raise ValueError(f"max_chars={self.max_chars} must be >= 1")

    def for_input(self, input_spec: str) -> ReadOptions:
        """Only the options that change the documents of this input, so equal data is built
        once: stdlib is always one document per file; text_field only matters for JSONL."""
        if input_spec == STDLIB:
            return ReadOptions("file", eval_fraction=self.eval_fraction, max_chars=self.max_chars)
        return self if self.mode == "jsonl" else dataclasses.replace(self, text_field="text")


def iter_documents(items: Sequence[Item], opts: ReadOptions, stats: BuildStats,
                   want: Callable[[str], bool] = lambda key: True
                   ) -> Iterator[tuple[str, str, str]]:
    """(split key, document key, text) of every document whose split key `want` accepts.

    The split key is the file key (file mode) or "file:line"; a piece of a long document has
    document key "<split key>#<i>". In file mode a file `want` rejects is not even read.
    """
    for it in items:
        if opts.mode == "file" and not want(it.key):
            continue
        stats.files += 1
        text = it.text if it.path is None else decode(it.path.read_bytes(), stats)
        if text is None:
            continue
        records = [(it.key, text)] if opts.mode == "file" else _records(it.key, text, opts, stats)
        for key, record in records:
            if want(key):
                yield from ((key, k, t) for k, t in _pieces(key, record, opts, stats))


def scan(items: Sequence[Item], opts: ReadOptions) -> tuple[set[str], BuildStats]:
    """First pass of a build: (held-out split keys, counts of the whole build)."""
    stats, per_key = BuildStats(), {}
    for key, _, _ in iter_documents(items, opts, stats):
        per_key[key] = per_key.get(key, 0) + 1  # keys only: the text is dropped here
    if not per_key:
        raise ValueError(f"no documents: {stats.summary('input', 'read')}; point --input at UTF-8 "
                         f"text files (and --mode / --text_field at how they hold documents)")
    held = validation_keys(per_key, opts.eval_fraction)
    stats.documents[VALIDATION] = sum(per_key[k] for k in held)
    stats.documents[TRAIN] = sum(per_key.values()) - stats.documents[VALIDATION]
    return held, stats


def iter_split(items: Sequence[Item], split: str, opts: ReadOptions,
               held: set[str]) -> Iterator[tuple[str, str]]:
    """Second pass, once per split: (document key, text) of every document of `split`."""
    def want(key: str) -> bool:
        return (key in held) == (split == VALIDATION)

    for _, key, text in iter_documents(items, opts, BuildStats(), want):  # counted in scan
        yield key, text


def _records(key: str, text: str, opts: ReadOptions,
             stats: BuildStats) -> Iterator[tuple[str, str]]:
    """Line/JSONL mode: the ("file:line", text) of each record of one file."""
    # StringIO(newline=None): universal newlines like reading a text file; str.splitlines
    # would also split on \x0b, \x1c, U+2028 ..., which are not line ends in JSONL.
    for lineno, line in enumerate(io.StringIO(text, newline=None), start=1):
        line = line.rstrip("\n")
        if not line or line.isspace():
            continue
        if opts.mode == "jsonl":
            line = _json_text(line, opts.text_field, stats)
            if line is None:
                continue
            if not line or line.isspace():
                stats.empty += 1
                continue
        yield f"{key}:{lineno}", line


def _json_text(line: str, field: str, stats: BuildStats) -> str | None:
    try:
        record = json.loads(line)
    except ValueError:
        stats.bad_json += 1
        return None
    if not isinstance(record, dict) or not isinstance(record.get(field), str):
        stats.missing_field += 1
        return None
    return record[field]


def _pieces(key: str, text: str, opts: ReadOptions,
            stats: BuildStats) -> Iterator[tuple[str, str]]:
    """One document, or its pieces when it is longer than max_chars."""
    if len(text) <= opts.max_chars:
        yield key, text
        return
    pieces = split_long(text, opts.max_chars)
    stats.split_long += 1
    stats.pieces += len(pieces)
    for i, piece in enumerate(pieces):
        yield f"{key}#{i}", piece
