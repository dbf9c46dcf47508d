"""The embedded default corpus: the Python standard library of the running interpreter.

Every machine that runs jaxlm has this text, so tokenizer training, data-pipeline tests and demos
need no download. It holds two kinds of documents, in this order:

1. the `.py` sources under `sysconfig.get_paths()["stdlib"]`, one document per file, sorted by
   their path relative to that folder (so the order does not depend on the file system);
2. the pydoc topic texts `pydoc_data.topics.topics` (the prose of the language reference), one
   document per topic, sorted by topic name.

Excluded, so that the corpus is the library itself and the same on every install:
- `site-packages` / `dist-packages`: whatever happens to be installed is not the standard library
  (with pyenv and many distributions it lives under the stdlib folder);
- test folders (`test`, `tests`, `idle_test`): CPython's test suite is about twice the size of the
  library and contains deliberately odd files (bad encodings, huge literals, generated data).

For CPython 3.11 this is about 730 files and 12 MB of text.
"""
from __future__ import annotations

import os
import sysconfig
from pathlib import Path
from typing import Iterator

EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})


def stdlib_root() -> Path:
    """The folder of the running interpreter's standard library (outside any virtualenv)."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | str | None = None) -> list[Path]:
    """All `.py` files of the standard library, minus EXCLUDED_DIRS, in a deterministic order.

    Args:
      root: the folder to scan; defaults to `stdlib_root()` (tests pass a small fake tree).
    Returns:
      absolute paths sorted by their POSIX path relative to `root`.
    """
    root = Path(root) if root is not None else stdlib_root()
    found = []
    # os.walk does not follow symlinked folders by default, so no file is seen twice.
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in EXCLUDED_DIRS]
        found.extend(Path(folder, n) for n in names if n.endswith(".py"))
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def pydoc_topics() -> list[str]:
    """The pydoc topic texts (language reference prose), sorted by topic name."""
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]


def num_documents() -> int:
    """How many documents `iter_documents()` yields (for progress bars)."""
    return len(stdlib_files()) + len(pydoc_topics())


def iter_documents() -> Iterator[str]:
    """Yields the corpus documents: each stdlib file's text, then each pydoc topic.

    Files are decoded as UTF-8 with errors="replace": a few stdlib files declare other encodings
    and a corpus reader must never stop on one bad byte.
    """
    for path in stdlib_files():
        yield path.read_bytes().decode("utf-8", errors="replace")
    yield from pydoc_topics()
