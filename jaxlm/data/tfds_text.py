"""TFDS builder `local_text`: local text files (or the embedded stdlib corpus) → array_record.

Built once into a data_dir, then read like any catalogue dataset with
`tfds.data_source("local_text/<config>", data_dir=..., split=...)` (no TensorFlow needed).
Examples are {"text": str, "key": str}; splits "train" and "validation" (see documents.py for
what a document is, the eval hold-out and the bad-input policy).

Each input gets its own builder config, named from a hash of the inputs (keys, sizes, mtimes) and
the read options, e.g. `local_text/file_3f2a9c0d81b4` or `local_text/stdlib_0c1d2e3f4a5b`:
changing a file or an option builds a new dataset next to the old one instead of serving stale
data; an unchanged input is never rebuilt. On a multi-host pod with a shared data_dir (gs://),
build once with `python -m jaxlm.data build` before launching, so hosts do not race.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import sys
import tempfile
from pathlib import Path

import filelock
import tensorflow_datasets as tfds

from jaxlm.data import documents
from jaxlm.data.documents import STDLIB, TRAIN, VALIDATION, BuildStats, Item, ReadOptions

NAME = "local_text"
DATASET_VERSION = "1.0.0"
log = logging.getLogger(__name__)


class LocalText(tfds.core.GeneratorBasedBuilder):
    """Documents from local text; construct through `build_local_text`, which sets the config."""

    VERSION = tfds.core.Version(DATASET_VERSION)
    RELEASE_NOTES = {DATASET_VERSION: "One document per file / line / JSONL record; validation by hash."}

    def __init__(self, *, items: list[Item] | None = None, read: ReadOptions | None = None,
                 **kwargs):
        self._items, self._read = items, read or ReadOptions()
        self.stats = BuildStats()
        super().__init__(**kwargs)

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        # TFDS looks for a download-checksums file next to the builder's module and, for a module
        # in a plain folder, touches `importlib_resources`, which tensorflow-datasets 4.9.10 uses
        # but does not install. Local text downloads nothing, so there is no such file.
        return None

    def _info(self) -> tfds.core.DatasetInfo:
        # DatasetInfo(builder=self) directly: dataset_info_from_configs() would look for
        # metadata files next to this module (TFDS's layout for catalogue datasets).
        return tfds.core.DatasetInfo(
            builder=self, description="Local text documents (jaxlm.data.tfds_text).",
            features=tfds.features.FeaturesDict({"text": tfds.features.Text(),
                                                 "key": tfds.features.Text()}),
            metadata=tfds.core.MetadataDict())

    def _split_generators(self, dl_manager):
        if self._items is None:
            raise ValueError(f"{NAME} has no inputs: build it with "
                             f"jaxlm.data.tfds_text.build_local_text or `python -m jaxlm.data build`")
        held, self.stats = documents.scan(self._items, self._read)
        # Saved in metadata.json, so reusing a build can print its summary again.
        self.info.metadata["stats"] = dataclasses.asdict(self.stats)
        splits = {TRAIN: self._generate_examples(TRAIN, held)}
        if held:  # TFDS cannot write an empty split; eval_fraction=0 means no validation split
            splits[VALIDATION] = self._generate_examples(VALIDATION, held)
        return splits

    def _generate_examples(self, split: str, held: set[str]):
        for key, text in documents.iter_split(self._items, split, self._read, held):
            yield key, {"text": text, "key": key}


def config_name(input_spec: str, read: ReadOptions, items: list[Item]) -> str:
    """`<stdlib|mode>_<12 hex>` from the inputs' fingerprint and the read options."""
    payload = json.dumps([DATASET_VERSION, dataclasses.asdict(read), documents.fingerprint(items),
                          sys.version_info[:2] if input_spec == STDLIB else None])
    prefix = STDLIB if input_spec == STDLIB else read.mode
    return f"{prefix}_{hashlib.sha256(payload.encode()).hexdigest()[:12]}"


@dataclasses.dataclass(frozen=True)
class BuildResult:
    name: str  # "local_text/<config>": pass to tfds.data_source with the same data_dir
    data_dir: str
    path: Path  # the version folder holding the array_record files
    summary: str  # "built local_text/...: N documents (...), 3 empty skipped, ..."
    built: bool  # False when an existing build was reused


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def build_local_text(input_spec: str, data_dir: str, read: ReadOptions = ReadOptions(),
                     progress: bool = False) -> BuildResult:
    """Builds (once) the local_text dataset of `input_spec` ("stdlib" or a glob) into data_dir.

    Logs and returns the summary line. Raises FileNotFoundError when the glob matches nothing and
    ValueError when no file holds usable text.
    """
    read = read.for_input(input_spec)
    items = documents.list_items(input_spec)
    config = tfds.core.BuilderConfig(name=config_name(input_spec, read, items),
                                     description=f"input={input_spec!r} {read}")
    # One builder at a time per dataset on this host: processes started together (pytest -n,
    # several local runs) would otherwise all prepare it and race on the final rename.
    lock = Path(tempfile.gettempdir()) / f"jaxlm-build-{config.name}-{_digest(str(data_dir))}.lock"
    with _quiet_tfds(progress), filelock.FileLock(str(lock)):
        builder = LocalText(items=items, read=read, config=config, data_dir=data_dir,
                            file_format="array_record")
        built = not builder.is_prepared()
        if built:
            builder.download_and_prepare()
    name = f"{NAME}/{config.name}"
    if built:
        summary = builder.stats.summary(name)
    else:
        stats = builder.info.metadata.get("stats", {})
        summary = BuildStats(**stats).summary(name, "reused") if stats \
            else f"reused {name}"
    log.info("%s", summary)
    return BuildResult(name, str(data_dir), Path(builder.data_dir), summary, built)


@contextlib.contextmanager
def _quiet_tfds(progress: bool):
    """TFDS prints "Downloading and preparing..." to stdout and draws tqdm bars; a CLI whose
    stdout is the summary line wants neither (the text goes to stderr, bars only on request)."""
    from tensorflow_datasets.core.utils import tqdm_utils

    was = getattr(tqdm_utils, "_active", True)
    tqdm_utils.display_progress_bar(progress)
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)  # "Using custom data configuration ..." is expected here
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        tqdm_utils.display_progress_bar(was)
        absl_logger.setLevel(level)
