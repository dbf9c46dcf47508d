"""local_text TFDS builder: round trip, splits, modes, bad input, reuse, the stdlib corpus."""
import json
import logging

import pytest
import tensorflow_datasets as tfds

from jaxlm.data import documents, sources, stdlib_corpus
from jaxlm.data.documents import ReadOptions
from jaxlm.data.tfds_text import build_local_text


def read_all(result):
    """{key: text} of both splits, and {key: split}, read back through tfds.data_source."""
    texts, split_of = {}, {}
    for split in ("train", "validation"):
        for ex in tfds.data_source(result.name, data_dir=result.data_dir, split=split,
                                   download=False):
            key = ex["key"].decode()
            assert key not in texts, f"{key} duplicated"
            texts[key], split_of[key] = ex["text"].decode(), split
    return texts, split_of


def test_round_trip_documents_equal_the_files(tmp_path):
    src = tmp_path / "src"
    files = {f"d{i}/f{i}.txt": f"document {i}\nwith ünïcödé ✓ and two lines\n" * (i + 1)
             for i in range(30)}
    for rel, text in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(text, encoding="utf-8")
    result = build_local_text(str(src / "**/*.txt"), str(tmp_path / "tfds"),
                              ReadOptions(eval_fraction=0.1))
    assert result.built and result.name.startswith("local_text/file_")
    texts, split_of = read_all(result)
    assert texts == files  # keys are paths relative to the common folder
    held = {k for k, s in split_of.items() if s == "validation"}
    assert held == documents.validation_keys(list(files), 0.1) and 0 < len(held) < 30
    assert "30 documents" in result.summary and "from 30 inputs" in result.summary
    # an unchanged input is reused; a changed file gets a new dataset (never stale data)
    assert not build_local_text(str(src / "**/*.txt"), str(tmp_path / "tfds"),
                                ReadOptions(eval_fraction=0.1)).built
    (src / "d0/f0.txt").write_text("changed\n")
    again = build_local_text(str(src / "**/*.txt"), str(tmp_path / "tfds"),
                             ReadOptions(eval_fraction=0.1))
    assert again.built and again.name != result.name


def test_line_and_jsonl_modes(tmp_path):
    (tmp_path / "a.txt").write_text("first line\n\n  \nsecond line\r\nthird\n")
    recs = [{"text": "rec one"}, {"text": "rec two", "x": 1}, {"other": "no text"}, "[not json",
            {"text": 5}, {"text": "   "}]
    (tmp_path / "b.jsonl").write_text("\n".join(r if isinstance(r, str) else json.dumps(r)
                                                for r in recs) + "\n")
    lines = build_local_text(str(tmp_path / "*.txt"), str(tmp_path / "tfds"),
                             ReadOptions(mode="line", eval_fraction=0.3))
    texts, _ = read_all(lines)
    assert texts == {"a.txt:1": "first line", "a.txt:4": "second line", "a.txt:5": "third"}
    jl = build_local_text(str(tmp_path / "*.jsonl"), str(tmp_path / "tfds"),
                          ReadOptions(mode="jsonl", eval_fraction=0.3))
    texts, _ = read_all(jl)
    assert texts == {"b.jsonl:1": "rec one", "b.jsonl:2": "rec two"}
    assert "1 invalid JSON lines, 2 records without the text field skipped" in jl.summary
    assert "1 empty skipped" in jl.summary


def test_bad_input_is_skipped_or_replaced_and_counted(tmp_path, caplog):
    src = tmp_path / "src"
    src.mkdir()
    good = {f"good{i}.txt": f"good text number {i}\n" for i in range(5)}
    for name, text in good.items():
        (src / name).write_text(text)
    (src / "empty.txt").write_bytes(b"")
    (src / "blank.txt").write_bytes(b" \n\t\n")
    (src / "nul.bin").write_bytes(b"ELF\x00\x01\x02 some text")
    (src / "noise.bin").write_bytes(bytes(range(128, 256)) * 40)  # no NUL, invalid UTF-8
    (src / "latin1.txt").write_bytes("café au lait, naïve résumé\n".encode("latin-1"))
    (src / "huge.txt").write_bytes(b"a" * 100_000_000)  # one 100 MB line
    with caplog.at_level(logging.INFO, logger="jaxlm.data.tfds_text"):
        result = build_local_text(str(src / "*"), str(tmp_path / "tfds"),
                                  ReadOptions(eval_fraction=0.01, max_chars=10_000_000))
    texts, _ = read_all(result)
    for name, text in good.items():
        assert texts[name] == text
    assert texts["latin1.txt"] == "caf\ufffd au lait, na\ufffdve r\ufffdsum\ufffd\n"
    pieces = [texts[f"huge.txt#{i}"] for i in range(10)]
    assert "".join(pieces) == "a" * 100_000_000 and len(texts) == 5 + 1 + 10
    assert not {"empty.txt", "blank.txt", "nul.bin", "noise.bin"} & set(texts)
    expected = ("16 documents", "from 11 inputs", "2 empty skipped", "2 binary skipped",
                "1 decoded with replacement", "1 over max_chars split into 10 pieces")
    assert all(e in result.summary for e in expected), result.summary
    assert result.summary in caplog.text


def test_split_long_keeps_every_character_and_prefers_line_ends():
    text = "".join(f"line {i}\n" for i in range(1000))
    pieces = documents.split_long(text, 100)
    assert "".join(pieces) == text and all(len(p) <= 100 for p in pieces)
    assert all(p.endswith("\n") for p in pieces)
    assert documents.split_long("abcdefg", 3) == ["abc", "def", "g"]


def test_nothing_usable_is_one_clear_error(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"\x00\x01")
    with pytest.raises(ValueError, match="no documents"):
        build_local_text(str(tmp_path / "*.bin"), str(tmp_path / "tfds"))
    with pytest.raises(FileNotFoundError, match="no files match"):
        build_local_text(str(tmp_path / "*.nothing"), str(tmp_path / "tfds"))


def test_stdlib_corpus_builds_with_a_small_deterministic_eval_split(stdlib_tfds):
    texts, split_of = read_all(stdlib_tfds)
    expected = [d for d in stdlib_corpus.iter_documents() if d.strip()]
    assert sorted(texts.values()) == sorted(expected)
    held = {k for k, s in split_of.items() if s == "validation"}
    assert 1 <= len(held) <= 0.03 * len(texts)
    keys = [it.key for it in documents.list_items("stdlib")]  # e.g. "json/__init__.py"
    assert held == documents.validation_keys(keys, 0.01) & set(texts)


def test_open_tfds_errors_name_the_fix(tmp_path, stdlib_tfds):
    with pytest.raises(FileNotFoundError, match="not prepared"):
        sources.open_tfds("lm1b", str(tmp_path), "train")
    with pytest.raises(ValueError, match="Unknown split"):
        sources.open_tfds(stdlib_tfds.name, stdlib_tfds.data_dir, "test")


@pytest.mark.parametrize("key, value, message", [
    ("eval_split", "valid", r"config.data.eval_split='valid': TFDS dataset 'local_text/"),
    ("split", "tran", r"config.data.split='tran'"),
    ("text_field", "content", r"config.data.text_field='content': examples have no field "
                              r"'content'; their fields are \['key', 'text'\]"),
])
def test_tfds_split_and_text_field_checked_before_training(
        stdlib_tfds, spm_tokenizer, tmp_path, key, value, message):
    """A wrong split or text_field of a tfds: source is one ValueError from resolve(), not a
    KeyError traceback at the first batch or the first evaluation."""
    import importlib.util
    from pathlib import Path

    from jaxlm.train.experiment import resolve

    path = Path(__file__).resolve().parents[2] / "experiments" / "configs" / "pretrain.py"
    spec = importlib.util.spec_from_file_location("pretrain_cfg", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config("test")
    c.data.update(source=f"tfds:{stdlib_tfds.name}", data_dir=stdlib_tfds.data_dir)
    c.tokenizer.path = str(spm_tokenizer.path)
    resolve(c, tmp_path)  # the defaults (train, validation, text) are fine
    c.data[key] = value
    with pytest.raises(ValueError, match=message):
        resolve(c, tmp_path)


def test_source_errors_are_not_blamed_on_the_split(spm_tokenizer, tmp_path):
    """Only a missing or empty split names config.data.split; a source that finds no documents
    keeps its own message."""
    import importlib.util
    from pathlib import Path

    from jaxlm.train.experiment import resolve

    path = Path(__file__).resolve().parents[2] / "experiments" / "configs" / "pretrain.py"
    spec = importlib.util.spec_from_file_location("pretrain_cfg", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config("test")
    (tmp_path / "empty.txt").write_text("")  # matched, but no document in it
    c.data.source = f"local:{tmp_path}/empty*.txt"
    c.tokenizer.path = str(spm_tokenizer.path)
    with pytest.raises(ValueError) as error:
        resolve(c, tmp_path)
    assert "config.data.split" not in str(error.value), error.value
    assert str(error.value).startswith(f"config.data.source='local:{tmp_path}/empty*.txt': "
                                       "no documents"), error.value


def test_workdir_tokenizer_of_another_size_is_an_error(spm_tokenizer, tmp_path):
    """WORKDIR/tokenizer was trained earlier with 400 pieces: a run asking for another size must
    not silently reuse it (its checkpoints and data positions belong to that tokenizer)."""
    import shutil

    from jaxlm.paths import as_path
    from jaxlm.train.experiment import _tokenizer

    (tmp_path / "tokenizer").mkdir()
    shutil.copy(spm_tokenizer.path, tmp_path / "tokenizer" / "tokenizer.model")
    c = {"data": {"source": f"local:{tmp_path}/*.txt"},
         "tokenizer": {"path": "", "train_if_missing": True, "vocab_size": 400}}
    tokenizer, _ = _tokenizer(c, as_path(tmp_path), seed=0)
    assert tokenizer.vocab_size == 400
    c["tokenizer"]["vocab_size"] = 512
    with pytest.raises(ValueError, match=r"config.tokenizer.vocab_size=512, but .* has 400 pieces"):
        _tokenizer(c, as_path(tmp_path), seed=0)
    c["tokenizer"]["train_if_missing"] = False  # placed there by hand: vocab_size is not its own
    assert _tokenizer(c, as_path(tmp_path), seed=0)[0].vocab_size == 400
