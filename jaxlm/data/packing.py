"""Packing token documents into fixed [batch, seq_len] rows for segment-aware attention.

Policy ("no token lost", concat-then-split):
- A document is [BOS, t_1, ..., t_n, EOS]; it contributes its next-token pairs
  (d[i] -> d[i+1]) for i < len(d) - 1: inputs d[:-1], targets d[1:]. Targets therefore never
  cross a document boundary by construction: EOS is a target (the model learns to end a
  document), BOS is only an input.
- Rows are filled with pairs in document order; a document that does not fit in what is left of
  a row continues at the start of the next row (and over as many rows as it needs). Every pair
  of every document appears in exactly one row, once: no truncation, no duplication, and no
  padding except in the very last batch of a finite stream.
- Within a row, documents (or the part of one that fits) are segments numbered 1, 2, 3, ... in
  order; segment_ids 0 is padding. positions count 0, 1, 2, ... within each segment, also for a
  document continued from the previous row (it starts again at 0, without a BOS): the row cannot
  attend to the earlier part anyway, RoPE only sees relative positions, so this is the same
  attention, and positions stay < seq_len (the model's causal mask is computed from positions).
- Padding: inputs/targets 0, segment_ids 0, positions -1 (the model's "empty" position),
  loss_mask 0.

Batch (numpy, every array int32 [batch, seq_len]):
  inputs, targets, segment_ids, positions, loss_mask (1 = train on this target).

Resume: the packer's place in the stream is (doc, offset): the next pair to emit is pair
`offset` of document number `doc` of the input stream. That is all the state there is, so a
restore needs only the input stream restarted at document `doc`.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

FIELDS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


def empty_batch(batch_size: int, seq_len: int) -> dict[str, np.ndarray]:
    """An all-padding batch: int32 [batch_size, seq_len] per field."""
    b = {k: np.zeros((batch_size, seq_len), np.int32) for k in FIELDS}
    b["positions"][:] = -1
    return b


class Packer:
    """Packs an iterator of documents (int arrays, BOS ... EOS) into batches.

    Args:
      docs: the input stream; its first element is document number `doc` (for resuming).
      seq_len, batch_size: the shape of each batch.
      doc, offset: where the stream stands: the next pair is pair `offset` of document `doc`.
    """

    def __init__(self, docs: Iterator[np.ndarray], seq_len: int, batch_size: int, *,
                 doc: int = 0, offset: int = 0):
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len={seq_len} and batch_size={batch_size} must be >= 1")
        self._docs, self.seq_len, self.batch_size = docs, seq_len, batch_size
        self.doc, self.offset = doc, offset  # the resume position (see module docstring)
        self._cur: np.ndarray | None = None  # document number self.doc once fetched
        self._done = False
        self._arange = np.arange(seq_len, dtype=np.int32)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        """The next batch; the last one of a finite stream is padded with empty rows."""
        if self._done:
            raise StopIteration
        batch = empty_batch(self.batch_size, self.seq_len)
        for r in range(self.batch_size):
            filled = self._fill_row(batch, r)
            if filled < self.seq_len:  # the stream ended inside this row
                self._done = True
                if r == 0 and filled == 0:
                    raise StopIteration
                break
        return batch

    def _fill_row(self, batch: dict[str, np.ndarray], r: int) -> int:
        """Fills row r with pairs from the stream; returns how many slots were filled."""
        col, seg = 0, 0
        while col < self.seq_len:
            doc = self._current()
            if doc is None:
                break
            k = min(len(doc) - 1 - self.offset, self.seq_len - col)  # pairs that fit
            o = self.offset
            seg += 1
            batch["inputs"][r, col:col + k] = doc[o:o + k]
            batch["targets"][r, col:col + k] = doc[o + 1:o + k + 1]
            batch["segment_ids"][r, col:col + k] = seg
            batch["positions"][r, col:col + k] = self._arange[:k]
            batch["loss_mask"][r, col:col + k] = 1
            col += k
            self.offset += k
            if self.offset == len(doc) - 1:  # document finished: move to the next one
                self._cur, self.doc, self.offset = None, self.doc + 1, 0
        return col

    def _current(self) -> np.ndarray | None:
        """Document number self.doc (fetched on first use), or None at the end of the stream."""
        while self._cur is None:
            try:
                doc = np.asarray(next(self._docs))
            except StopIteration:
                return None
            if len(doc) < 2:  # no pair to learn from (a tokenizer without BOS/EOS, empty text)
                self.doc += 1
                continue
            if not 0 <= self.offset < len(doc) - 1:
                raise ValueError(f"resume state points at pair {self.offset} of document "
                                 f"{self.doc}, which has only {len(doc) - 1} pairs: the state "
                                 f"belongs to different data (source, tokenizer or seed)")
            self._cur = doc
        return self._cur
