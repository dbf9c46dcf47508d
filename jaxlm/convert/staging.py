"""Safe output directories for the converters: checked before any work, written beside, moved in.

import-hf and export-hf write everything into a temporary sibling of --dst and rename it into place
at the end, so a failure or Ctrl-C leaves --dst as it was (the old model, or nothing), and
--overwrite never deletes anything before the new directory is complete.
"""
from __future__ import annotations

import contextlib
import os
import pathlib
from typing import Callable, Iterator

from etils import epath

from jaxlm.paths import as_path, is_remote


def check_destination(src: str | os.PathLike, dst: str | os.PathLike, *, overwrite: bool,
                      replaceable: Callable[[epath.Path], bool] | None = None,
                      kind: str = "") -> epath.Path:
    """Raise (naming --dst and the fix) unless `dst` may be written; returns it as a path.

    Refused: a file; a directory equal to, inside or around `src` (replacing it would delete the
    source); a non-empty directory without `overwrite`; with `overwrite`, a non-empty directory
    that `replaceable` says is not a `kind` (so a typo cannot delete an unrelated folder).
    """
    out = as_path(dst)
    if _overlap(src, dst):
        raise ValueError(f"--dst {dst} and --src {src} overlap (the same directory, or one inside "
                         "the other); writing there would destroy the source: choose a --dst "
                         "outside --src")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--dst {dst}: is a file; pass a directory path")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{dst}: exists and is not empty; choose another --dst or pass "
                                  "--overwrite")
        if replaceable is not None and not replaceable(out):
            raise FileExistsError(f"--dst {dst}: --overwrite only replaces {kind}, and this "
                                  "directory is not one; choose another --dst (or delete it "
                                  "yourself if you mean to)")
    return out


def _overlap(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    if is_remote(a) != is_remote(b):
        return False
    if is_remote(a):
        x, y = (os.fspath(p).rstrip("/") + "/" for p in (a, b))
        return x.startswith(y) or y.startswith(x)
    x, y = (pathlib.Path(p).expanduser().resolve() for p in (a, b))
    return x == y or x in y.parents or y in x.parents


@contextlib.contextmanager
def staged_directory(dst: str | os.PathLike, tag: str) -> Iterator[epath.Path]:
    """Yield an empty temporary sibling of `dst`; when the block finishes, it replaces `dst`.

    If the block raises (Ctrl-C included), the sibling is deleted and `dst` is untouched. The old
    `dst` is moved aside before the rename and deleted after it, so no moment lacks both.
    """
    dst = as_path(dst)
    tmp = dst.parent / f".{dst.name}.{tag}-{os.getpid()}"
    old = dst.parent / f".{dst.name}.old-{os.getpid()}"
    for leftover in (tmp, old):  # from an earlier run of this same pid, killed hard
        if leftover.exists():
            leftover.rmtree()
    tmp.mkdir(parents=True)
    try:
        yield tmp
        moved = dst.exists()
        if moved:
            dst.rename(old)
        try:
            tmp.rename(dst)
        except BaseException:
            if moved:
                old.rename(dst)
            raise
    finally:
        if tmp.exists():
            tmp.rmtree()
    if old.exists():
        old.rmtree()
