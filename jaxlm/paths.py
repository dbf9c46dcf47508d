"""Paths that are local or in a bucket: workdirs and model directories go through `as_path`.

`pathlib.Path("gs://b/run").absolute()` is `/cwd/gs:/b/run`, a local directory. `as_path` returns
an `etils.epath.Path` instead (the path type orbax itself uses): a URL stays a URL, and mkdir,
open, read/write, exists, iterdir, copy and rmtree work on it through fsspec (gs:// needs gcsfs,
in the `[tpu]` extra) or TensorFlow's gfile when TensorFlow is installed. Local paths are made
absolute as before. Libraries that only read local files (SentencePiece) get a `local_copy`.
"""
from __future__ import annotations

import os
import pathlib
import tempfile

from etils import epath

# The URL schemes etils.epath serves (gpath._URI_PREFIXES); anything else is a local path.
REMOTE_PREFIXES = ("gs://", "s3://", "az://", "hf://")


def is_remote(path: str | os.PathLike) -> bool:
    """True for a bucket URL (gs://, s3://, az://, hf://), False for a local path."""
    return os.fspath(path).startswith(REMOTE_PREFIXES)


def as_path(path: str | os.PathLike) -> epath.Path:
    """An epath.Path: a URL unchanged (str() gives it back), a local path made absolute."""
    if is_remote(path):
        return epath.Path(os.fspath(path))
    return epath.Path(pathlib.Path(path).expanduser().absolute())


def local_copy(path: str | os.PathLike) -> pathlib.Path:
    """`path` itself when it is local; otherwise the file downloaded into a new temporary
    directory (for libraries that open local files only, such as SentencePiece)."""
    if not is_remote(path):
        return pathlib.Path(path)
    src = as_path(path)
    dst = pathlib.Path(tempfile.mkdtemp(prefix="jaxlm-")) / src.name
    dst.write_bytes(src.read_bytes())
    return dst
