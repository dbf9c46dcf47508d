"""Synthetic documents and a byte tokenizer: the pipeline without a corpus or a trained model.

- `synthetic_documents`: a grain MapDataset of token documents [BOS, t_1..t_n, EOS], each a pure
  function of (seed, index), so any document can be produced in any process in O(1). They go
  through the same sharding, shuffling, packing and batching as real text.
  kind "pattern": t_j = first + (start + j * step) mod (V - first), start and step drawn per
  document (step in 1..7): a model that reads two tokens can predict the rest, so the loss of a
  learning model goes to ~0 (a smoke test of training).
  kind "zipf": t_j i.i.d. from a Zipf(1.2) law over the non-special ids (rank 1 = id `first`):
  a fixed, known unigram distribution, for throughput benchmarks and loss-floor checks.
- `ByteTokenizer`: UTF-8 bytes as ids (+3), unk 0 / bos 1 / eos 2 like Llama: the same interface
  as jaxlm.tokenizer.Tokenizer, exact for every text, for tests and demos.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, Sequence

import grain
import numpy as np

KINDS = ("pattern", "zipf")
FIRST_ID = 3  # ids 0, 1, 2 are unk, bos, eos (Llama-2 convention, SPEC §1)


@dataclasses.dataclass(frozen=True)
class SyntheticSpec:
    """What synthetic documents look like. Lengths count tokens without BOS/EOS."""

    kind: str = "pattern"
    num_docs: int = 10_000
    min_len: int = 8
    max_len: int = 512
    vocab_size: int = 256
    bos_id: int = 1
    eos_id: int = 2
    seed: int = 0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"synthetic kind={self.kind!r} is not one of {', '.join(KINDS)}")
        if self.num_docs < 1:
            raise ValueError(f"synthetic num_docs={self.num_docs} must be >= 1")
        if not 1 <= self.min_len <= self.max_len:
            raise ValueError(f"synthetic lengths need 1 <= min_len ({self.min_len}) <= max_len "
                             f"({self.max_len})")
        if self.vocab_size <= FIRST_ID + 1:
            raise ValueError(f"synthetic vocab_size={self.vocab_size} must be > {FIRST_ID + 1}")


class _MakeDocument(grain.transforms.Map):
    """Document index -> int32 [n + 2] tokens, from a generator seeded by (seed, index)."""

    def __init__(self, spec: SyntheticSpec):
        self.spec = spec

    def map(self, index: int) -> np.ndarray:
        s = self.spec
        rng = np.random.default_rng([s.seed, int(index)])
        n = int(rng.integers(s.min_len, s.max_len + 1))
        span = s.vocab_size - FIRST_ID
        if s.kind == "pattern":
            start, step = rng.integers(span), rng.integers(1, 8)
            body = (start + step * np.arange(n)) % span
        else:
            body = np.minimum(rng.zipf(1.2, n) - 1, span - 1)
        doc = np.empty(n + 2, np.int32)
        doc[0], doc[-1], doc[1:-1] = s.bos_id, s.eos_id, body + FIRST_ID
        return doc


def synthetic_documents(spec: SyntheticSpec) -> grain.MapDataset:
    """MapDataset of `spec.num_docs` token documents, int32 [len] each, BOS first, EOS last."""
    return grain.MapDataset.range(spec.num_docs).map(_MakeDocument(spec))


class ByteTokenizer:
    """UTF-8 bytes as tokens: id = byte + 3; unk 0, bos 1, eos 2; vocab_size 259.

    decode(encode(s)) == s for every str s. Has the parts of jaxlm.tokenizer.Tokenizer the data
    pipeline and its CLI use.
    """

    vocab_size = 256 + FIRST_ID
    unk_id, bos_id, eos_id, pad_id = 0, 1, 2, -1

    def __repr__(self) -> str:
        return "ByteTokenizer()"

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32) + FIRST_ID
        return [self.bos_id] * bos + ids.tolist() + [self.eos_id] * eos

    def encode_batch(self, texts: Sequence[str], bos: bool = False, eos: bool = False,
                     num_threads: int = -1) -> list[list[int]]:
        return [self.encode(t, bos, eos) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ids; specials and ids outside the vocabulary are dropped."""
        raw = bytes(int(i) - FIRST_ID for i in ids if FIRST_ID <= int(i) < self.vocab_size)
        return raw.decode("utf-8", errors="replace")

    def decode_batch(self, batch: Iterable[Iterable[int]]) -> list[str]:
        return [self.decode(ids) for ids in batch]
