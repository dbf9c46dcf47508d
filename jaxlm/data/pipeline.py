"""The pretraining input pipeline: source → host shard → shuffle → tokenise → pack → batch.

    cfg = DataConfig(source="stdlib", seq_len=512, batch_size=8)
    it = make_pretrain_iterator(cfg, tokenizer)            # process index/count from JAX
    batch = next(it)   # numpy int32 [8, 512]: inputs, targets, segment_ids, positions, loss_mask
    state = it.get_state()      # small JSON-serialisable dict; store it with the checkpoint
    it.set_state(state)         # the next batch is the one an uninterrupted run would see

Stages (grain):
1. documents: a random-access MapDataset (TFDS data source, or synthetic);
2. host shard: documents i with i % process_count == process_index (disjoint, covering);
3. shuffle(seed) then repeat(num_epochs): a new permutation each epoch (grain folds the epoch
   into the seed), the same on every run;
4. tokenise [BOS, ..., EOS] (MapDataset.map: runs in reader threads or worker processes);
5. packing + batching in this process (packing.py: "no token lost" policy, shapes there).

Worker processes (worker_count > 0, grain mp_prefetch) read and tokenise; documents come back in
exactly the order of worker_count = 0 (grain interleaves workers round robin over a strided
slice), and packing stays here, so the batches do not depend on worker_count and a state saved
with 2 workers restores with 0. Tokenising is the costly step (SentencePiece, ~1 MB/s/core).

State: {"doc": d, "offset": o, "check": {...}}: the next pair is pair o of this host's document
number d (counted over all epochs). set_state restarts the document stream at d, which a
MapDataset can do in O(1); "check" holds the settings the state is only valid for.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import grain
import numpy as np

from jaxlm.data import documents, sources, synthetic
from jaxlm.data.packing import Packer

STATE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Everything the pretraining pipeline needs; validated on construction.

    source: "stdlib" | "local:GLOB" | "tfds:NAME" | "synthetic".
    data_dir: TFDS data_dir (gs:// works); None = $JAXLM_DATA_DIR or ~/.cache/jaxlm/tfds for
      stdlib/local builds, TFDS's default for tfds:.
    split: "train" or "validation" (stdlib/local: the hash-held-out eval split), or any split
      of a TFDS dataset (e.g. "train[:1%]").
    text_field: tfds: the example field holding the text; local with mode="jsonl": the record
      field. (Built local datasets store it as "text".)
    batch_size: rows per host per step (see batching.BatchPlan.per_host_batch).
    num_epochs: None repeats forever; finite streams end with a padded batch.
    worker_count: grain worker processes for reading + tokenising (0 = in this process).
    read_threads: reader/tokeniser threads in each process (grain ReadOptions.num_threads).
    mode, eval_fraction, max_chars: how local/stdlib text is built (documents.py).
    synthetic_*: the synthetic source (synthetic.py); its vocabulary is the tokenizer's if one
      is given, else synthetic_vocab.
    """

    source: str = "stdlib"
    data_dir: str | None = None
    split: str = "train"
    text_field: str = "text"
    seq_len: int = 2048
    batch_size: int = 8
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None
    worker_count: int = 0
    worker_buffer_size: int = 16  # documents each worker keeps ready
    read_threads: int = 2
    mode: str = "file"
    eval_fraction: float = 0.01
    max_chars: int = documents.DEFAULT_MAX_CHARS
    synthetic_kind: str = "pattern"
    synthetic_docs: int = 10_000
    synthetic_min_len: int = 8
    synthetic_max_len: int = 512
    synthetic_vocab: int = 256

    def __post_init__(self):
        if not (self.source in ("stdlib", "synthetic") or
                self.source.startswith(("local:", "tfds:")) and len(self.source) > 5):
            raise ValueError(f"data source={self.source!r}: use 'stdlib', 'local:GLOB', "
                             f"'tfds:NAME' or 'synthetic'")
        for name in ("seq_len", "batch_size", "worker_buffer_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"data {name}={getattr(self, name)} must be >= 1")
        for name in ("worker_count", "read_threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"data {name}={getattr(self, name)} must be >= 0")
        if self.num_epochs is not None and self.num_epochs < 1:
            raise ValueError(f"data num_epochs={self.num_epochs} must be >= 1, or None (forever)")
        if not 0 <= self.seed < 2 ** 32:
            raise ValueError(f"data seed={self.seed} must be in [0, 2**32) (grain's shuffle)")
        self.read_options()  # validates mode / eval_fraction / max_chars
        if self.source == "synthetic":
            self.synthetic_spec(None)

    def read_options(self) -> documents.ReadOptions:
        return documents.ReadOptions(self.mode, self.text_field, self.eval_fraction,
                                     self.max_chars)

    def synthetic_spec(self, tokenizer: Any) -> synthetic.SyntheticSpec:
        vocab, bos, eos = ((tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id)
                           if tokenizer is not None else (self.synthetic_vocab, 1, 2))
        # The split changes the seed, so "validation" is not a copy of "train".
        seed = (self.seed + (self.split != "train") * 7919) % 2 ** 32
        return synthetic.SyntheticSpec(self.synthetic_kind, self.synthetic_docs,
                                       self.synthetic_min_len, self.synthetic_max_len, vocab,
                                       bos, eos, seed)


def document_dataset(cfg: DataConfig, tokenizer: Any, process_index: int,
                     process_count: int) -> tuple[grain.MapDataset, str]:
    """(this host's document stream, source name): MapDataset of int32 [n] token arrays.

    Stages 1-4 of the module docstring; length = shard size x num_epochs (or sys.maxsize).
    """
    if cfg.source == "synthetic":
        ds, name, tokenize = synthetic.synthetic_documents(cfg.synthetic_spec(tokenizer)), \
            "synthetic", None
    else:
        if tokenizer is None:
            raise ValueError(f"data source {cfg.source!r} needs a tokenizer")
        ds, name, field = sources.text_dataset(cfg.source, cfg.data_dir, cfg.split,
                                               cfg.read_options())
        tokenize = sources.Tokenize(tokenizer, field)
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, process_count="
                         f"{process_count})")
    if len(ds) < process_count:
        raise ValueError(f"{name} split {cfg.split!r} has {len(ds)} documents, fewer than the "
                         f"{process_count} processes: every host needs at least one")
    ds = ds[process_index::process_count]  # before the shuffle: a fixed, disjoint shard per host
    if cfg.shuffle:
        ds = ds.shuffle(seed=cfg.seed)
    ds = ds.repeat(cfg.num_epochs)  # after shuffle: each epoch gets its own permutation
    return (ds.map(tokenize) if tokenize else ds), name


class PretrainIterator(grain.DatasetIterator):
    """Packed numpy batches with an exact, JSON-serialisable resume state.

    A grain DatasetIterator, so grain's orbax handler (grain.checkpoint.CheckpointSave /
    CheckpointRestore) can store it; get_state/set_state work without orbax too.
    """

    def __init__(self, docs: grain.MapDataset, cfg: DataConfig, check: dict):
        super().__init__()
        self._docs, self._cfg, self._check = docs, cfg, check
        self._doc, self._offset = 0, 0
        self._packer: Packer | None = None  # started lazily: set_state before next() is free
        self._upstream = None

    def __next__(self) -> dict[str, np.ndarray]:
        self._assert_not_closed()
        if self._packer is None:
            self._start()
        return next(self._packer)

    def _start(self) -> None:
        """Starts reading at document self._doc (threads / worker processes start here)."""
        cfg = self._cfg
        ds = self._docs[self._doc:].to_iter_dataset(grain.ReadOptions(
            num_threads=cfg.read_threads, prefetch_buffer_size=max(cfg.read_threads * 4, 1)
            if cfg.read_threads else 0))
        if cfg.worker_count:
            _absl_flags_parsed()
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(
                num_workers=cfg.worker_count, per_worker_buffer_size=cfg.worker_buffer_size))
        self._upstream = iter(ds)
        self._packer = Packer(self._upstream, cfg.seq_len, cfg.batch_size, doc=self._doc,
                              offset=self._offset)

    def get_state(self) -> dict[str, Any]:
        if self._packer is not None:
            self._doc, self._offset = self._packer.doc, self._packer.offset
        return {"version": STATE_VERSION, "doc": int(self._doc), "offset": int(self._offset),
                "check": dict(self._check)}

    def set_state(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ValueError(f"not a data iterator state of version {STATE_VERSION}: {state!r:.200}")
        diff = {k: (v, self._check.get(k)) for k, v in state["check"].items()
                if self._check.get(k) != v}
        if diff:
            raise ValueError("the data state was saved with different settings (saved, now): " +
                             ", ".join(f"{k}={a!r}, {b!r}" for k, (a, b) in diff.items()) +
                             "; resume with the same data config, tokenizer and process count")
        self.close()
        self._closed = False
        self._doc, self._offset = int(state["doc"]), int(state["offset"])

    def close(self) -> None:
        """Stops reader threads and worker processes (idempotent; get_state still works)."""
        packer, upstream = getattr(self, "_packer", None), getattr(self, "_upstream", None)
        if packer is not None:
            self._doc, self._offset = packer.doc, packer.offset
        self._packer = self._upstream = None
        if upstream is not None:
            upstream.close()
        super().close()


def _absl_flags_parsed() -> None:
    """grain's worker processes read absl flags (--grain_*) and fail with UnparsedFlagAccessError
    unless the program parsed flags (absl.app.run does); outside absl.app, use the defaults."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def make_pretrain_iterator(cfg: DataConfig, tokenizer: Any = None, process_index: int | None = None,
                           process_count: int | None = None) -> PretrainIterator:
    """Iterator of packed batches for this host: dict of int32 numpy [cfg.batch_size, cfg.seq_len].

    Args:
      tokenizer: jaxlm Tokenizer (or anything with encode(text, bos, eos) / bos_id / eos_id /
        vocab_size, e.g. synthetic.ByteTokenizer); optional for the synthetic source.
      process_index, process_count: this host's shard; default jax.process_index() /
        jax.process_count() (pass them explicitly to simulate hosts in tests).
    """
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    docs, name = document_dataset(cfg, tokenizer, process_index, process_count)
    check = {"source": name, "split": cfg.split, "seed": cfg.seed, "shuffle": cfg.shuffle,
             "num_epochs": cfg.num_epochs, "seq_len": cfg.seq_len, "batch_size": cfg.batch_size,
             "process": f"{process_index}/{process_count}",
             "vocab_size": getattr(tokenizer, "vocab_size", None)}
    return PretrainIterator(docs, cfg, check)
