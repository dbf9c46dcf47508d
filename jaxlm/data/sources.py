"""Where documents come from: TFDS data sources (catalogue or local_text), as grain MapDatasets.

Every text source takes the same path: `tfds.data_source(name, data_dir=, split=)` returns a
random-access ArrayRecordDataSource of example dicts (no TensorFlow needed), which grain reads
directly; the `text_field` of each example is the document.

- "stdlib": the embedded default corpus, built as local_text on first use (tfds_text.py).
- "local:GLOB": local text files, built as local_text on first use (mode file / line / jsonl).
- "tfds:NAME": any TFDS dataset already prepared in array_record format in data_dir, e.g.
  "tfds:c4/en:3.1.0" with data_dir="gs://my-bucket/tensorflow_datasets" on a TPU VM. Prepare it
  once with `tfds build NAME --file_format=array_record --data_dir=...` (that step may need
  TensorFlow / Beam for some datasets; reading does not).
"""
from __future__ import annotations

import os
from typing import Any

import grain
import numpy as np

from jaxlm.data import documents

DEFAULT_DATA_DIR = "~/.cache/jaxlm/tfds"  # for stdlib/local builds; env JAXLM_DATA_DIR overrides


def default_data_dir() -> str:
    """Where stdlib/local datasets are built when no data_dir is given."""
    return os.path.expanduser(os.environ.get("JAXLM_DATA_DIR", DEFAULT_DATA_DIR))


class SplitError(ValueError):
    """The split asked for does not exist, or holds no examples (a config's split name to fix)."""


def open_tfds(name: str, data_dir: str | None, split: str) -> Any:
    """The random-access data source of a prepared TFDS dataset split, with errors for people.

    Args:
      name: "dataset[/config][:version]", e.g. "lm1b", "c4/en", "local_text/file_3f2a9c0d81b4".
      data_dir: folder (or gs:// path) holding the prepared dataset; None = TFDS's default
        (TFDS_DATA_DIR or ~/tensorflow_datasets).
    """
    import tensorflow_datasets as tfds

    where = data_dir or "TFDS's default data_dir"
    missing = (f"TFDS dataset {name!r} is not prepared in {where}: prepare it there first (`tfds "
               f"build {name} --file_format=array_record --data_dir=DIR`, or `python -m jaxlm.data "
               f"build` for local text) and pass that data_dir")
    # tfds.builder + as_data_source is what tfds.data_source(download=False) does, with a check
    # in between: never start a multi-hour download/preparation from a training job.
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise FileNotFoundError(missing) from None
    if not builder.is_prepared():
        raise FileNotFoundError(missing)
    try:
        src = builder.as_data_source(split=split)
    except NotImplementedError:
        raise ValueError(f"TFDS dataset {name!r} in {where} is not stored as array_record, which "
                         f"random access (grain) needs: rebuild it with "
                         f"--file_format=array_record") from None
    except (ValueError, KeyError) as e:  # unknown split
        raise SplitError(f"TFDS dataset {name!r}: {e}") from None
    if len(src) == 0:
        raise SplitError(f"split {split!r} of TFDS dataset {name!r} in {where} has no examples")
    return src


def text_field_of(example: dict, field: str) -> str:
    """The document text of a TFDS example (TFDS returns Text features as UTF-8 bytes)."""
    try:
        value = example[field]
    except KeyError:
        raise KeyError(f"examples have no field {field!r}; their fields are "
                       f"{sorted(example)}: set text_field to one of them") from None
    if isinstance(value, (bytes, np.bytes_)):
        return bytes(value).decode("utf-8", errors="replace")
    return str(value)


class Tokenize(grain.transforms.Map):
    """Example dict -> int32 [n + 2] token ids [BOS, ..., EOS] of its text field.

    Picklable for grain worker processes: a jaxlm SentencePiece Tokenizer travels as its model
    path and is loaded again on arrival (SentencePiece processors do not pickle).
    """

    def __init__(self, tokenizer: Any, text_field: str = "text"):
        self.tokenizer, self.text_field = tokenizer, text_field

    def map(self, example: dict) -> np.ndarray:
        text = text_field_of(example, self.text_field)
        return np.asarray(self.tokenizer.encode(text, bos=True, eos=True), np.int32)

    def __getstate__(self):
        from jaxlm.tokenizer import Tokenizer

        tok = self.tokenizer
        tok = ("spm", str(tok.path)) if isinstance(tok, Tokenizer) else ("obj", tok)
        return {"tokenizer": tok, "text_field": self.text_field}

    def __setstate__(self, state):
        kind, tok = state["tokenizer"]
        if kind == "spm":
            from jaxlm.tokenizer import Tokenizer

            tok = Tokenizer(tok)
        self.tokenizer, self.text_field = tok, state["text_field"]


def text_dataset(source: str, data_dir: str | None, split: str,
                 read: documents.ReadOptions = documents.ReadOptions()) -> tuple[
                     grain.MapDataset, str, str]:
    """(MapDataset of example dicts, dataset name, text field) of "stdlib" | "local:GLOB" |
    "tfds:NAME".

    stdlib/local are built into data_dir (default: default_data_dir()) on first use, as `read`
    says (ReadOptions.for_input); their text field is "text".
    """
    if source.startswith("tfds:"):
        name, field = source[len("tfds:"):], read.text_field
    else:
        from jaxlm.data import tfds_text

        data_dir = data_dir or default_data_dir()
        spec = documents.STDLIB if source == documents.STDLIB else source[len("local:"):]
        name, field = tfds_text.build_local_text(spec, data_dir, read).name, "text"
    return grain.MapDataset.source(open_tfds(name, data_dir, split)), name, field


def first_text(source: str, data_dir: str | None, split: str,
               read: documents.ReadOptions = documents.ReadOptions()) -> str:
    """The text of the split's first example: opens the split and reads its text field, so an
    unknown split (ValueError) or text_field (KeyError) is found before a run compiles rather
    than at its first batch or evaluation."""
    ds, _, field = text_dataset(source, data_dir, split, read)
    return text_field_of(ds[0], field)
