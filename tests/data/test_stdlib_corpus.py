"""The embedded default corpus: the running interpreter's standard library + pydoc topics."""
import itertools
import sysconfig
from pathlib import Path

from jaxlm.data import stdlib_corpus


def test_files_are_the_stdlib_sorted_without_site_packages_or_tests():
    files = stdlib_corpus.stdlib_files()
    root = Path(sysconfig.get_paths()["stdlib"])
    rel = [f.relative_to(root).as_posix() for f in files]
    assert rel == sorted(rel), "order must be deterministic: sorted by relative path"
    assert len(rel) == len(set(rel))
    assert {"os.py", "json/__init__.py", "collections/__init__.py"} <= set(rel)
    assert all(f.suffix == ".py" and f.is_file() for f in files)
    excluded = {"site-packages", "dist-packages", "test", "tests", "idle_test"}
    assert not [r for r in rel if excluded & set(r.split("/"))]
    assert stdlib_corpus.stdlib_files() == files


def test_exclusions_on_a_fake_tree(tmp_path):
    for rel in ["b.py", "a.py", "pkg/z.py", "pkg/readme.txt", "site-packages/x.py",
                "dist-packages/x.py", "test/test_a.py", "pkg/tests/t.py", "idlelib/idle_test/t.py",
                "idlelib/run.py"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x = 1\n")
    got = [p.relative_to(tmp_path).as_posix() for p in stdlib_corpus.stdlib_files(tmp_path)]
    assert got == ["a.py", "b.py", "idlelib/run.py", "pkg/z.py"]


def test_documents_are_files_then_pydoc_topics():
    from pydoc_data.topics import topics

    files = stdlib_corpus.stdlib_files()
    docs = stdlib_corpus.iter_documents()
    first = list(itertools.islice(docs, 2))
    assert first == [f.read_bytes().decode("utf-8", errors="replace") for f in files[:2]]
    rest = list(docs)
    assert len(first) + len(rest) == stdlib_corpus.num_documents() == len(files) + len(topics)
    assert rest[-len(topics):] == [topics[k] for k in sorted(topics)]
    assert all(isinstance(d, str) for d in rest)
