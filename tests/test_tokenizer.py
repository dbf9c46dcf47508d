"""Tokenizer (jaxlm/tokenizer.py) and Llama-2 chat format (jaxlm/chat.py).

One small tokenizer (vocab 1000, ~400 KB of the stdlib corpus) is trained once per module; the
chat goldens are built from SentencePiece directly with Meta's strings typed out by hand, so they
check jaxlm's format strings and masking independently of its implementation.
"""
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm

from jaxlm import chat
from jaxlm.data import stdlib_corpus
from jaxlm.tokenizer import (Tokenizer, bench, bench_table, check_model_vocab, main,
                             sample_lines, train_tokenizer)

VOCAB = 1000
REPO = Path(__file__).resolve().parents[1]


def _write_corpus(folder: Path, code_bytes: int, topic_bytes: int) -> int:
    """Copies stdlib files (code) and pydoc topics (prose) into folder; returns the file count."""
    folder.mkdir(parents=True)
    docs, size = [], 0
    for f in stdlib_corpus.stdlib_files():
        if size >= code_bytes:
            break
        docs.append(f.read_text("utf-8", errors="replace"))
        size += len(docs[-1])
    size = 0
    for t in stdlib_corpus.pydoc_topics():
        if size >= topic_bytes:
            break
        docs.append(t)
        size += len(t)
    for i, d in enumerate(docs):
        (folder / f"doc{i:04d}.txt").write_text(d, encoding="utf-8")
    return len(docs)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("corpus")


@pytest.fixture(scope="module")
def model_path(corpus) -> Path:
    _write_corpus(corpus / "text", 300_000, 100_000)
    return train_tokenizer(str(corpus / "text" / "*.txt"), corpus / "tok", vocab_size=VOCAB,
                           progress=False)


@pytest.fixture(scope="module")
def tok(model_path) -> Tokenizer:
    return Tokenizer(model_path)


@pytest.fixture(scope="module")
def sp(model_path) -> spm.SentencePieceProcessor:
    """The raw SentencePiece processor: the independent reference for the chat goldens."""
    return spm.SentencePieceProcessor(model_file=str(model_path))


# ----------------------------------------------------------------------------- training


def test_trained_model_has_llama2_settings(tok, model_path):
    assert (tok.vocab_size, tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (VOCAB, 0, 1, 2, -1)
    assert tok.pieces([0, 1, 2, 3, 258]) == ["<unk>", "<s>", "</s>", "<0x00>", "<0xFF>"]
    info = json.loads((model_path.parent / "tokenizer.json").read_text())
    assert info["input"].endswith("*.txt") and info["seed"] == 0
    assert info["files"] > 10 and info["lines"] > 5000 and info["bytes"] > 350_000
    assert info["settings"]["vocab_size"] == VOCAB
    opts = info["sentencepiece_options"]
    assert opts["split_digits"] and opts["byte_fallback"] and opts["add_dummy_prefix"]
    assert opts["normalization_rule_name"] == "identity" and not opts["remove_extra_whitespaces"]


def test_every_digit_is_its_own_token(tok):
    assert tok.pieces(tok.encode("2026")) == ["▁", "2", "0", "2", "6"]
    ids = tok.encode("in 1999, x=31415 and v2.0.1")
    digit_pieces = [p for p in tok.pieces(ids) if any(c.isdigit() for c in p)]
    assert "".join(digit_pieces) == "1999314152" + "01"
    assert all(len(p) == 1 for p in digit_pieces)
    # No learned piece (after unk/bos/eos and the 256 byte pieces <0x00>..<0xFF>) holds a digit
    # together with anything else.
    vocab = tok.pieces(range(3 + 256, tok.vocab_size))
    assert not [p for p in vocab if any(c in "0123456789" for c in p) and len(p) > 1]


def _random_text(rng: random.Random, n: int) -> str:
    """n random code points over all of Unicode except surrogates (not encodable in UTF-8) and
    U+2581 "▁" (SentencePiece's space symbol, see test_meta_space_symbol_decodes_to_space)."""
    out = []
    while len(out) < n:
        pick = rng.random()
        if pick < 0.3:
            c = rng.randrange(0x110000)
        elif pick < 0.5:
            c = rng.randrange(0x20, 0x7F)  # ASCII
        elif pick < 0.6:
            c = rng.choice([0x20, 0x20, 0x09, 0x0A, 0x0D, 0x00, 0x7F, 0x0C])  # spaces, controls
        elif pick < 0.7:
            c = rng.randrange(0x300, 0x370)  # combining marks
        elif pick < 0.85:
            c = rng.randrange(0x4E00, 0xA000)  # CJK
        else:
            c = rng.randrange(0x1F300, 0x1FAFF)  # emoji
        if not (0xD800 <= c <= 0xDFFF or c == 0x2581):
            out.append(chr(c))
    return "".join(out)


FIXED_TEXTS = [
    "", " ", "  ", "   leading", "trailing  ", "\n", "\tdef f():\n\t\treturn 1\r\n", "a\x00b\x1b[0m",
    "日本語のテキスト", "👩‍👩‍👧‍👦 🇫🇷 🙂", "e\u0301 n\u0303 Å", "\ufeffBOM", "\u200b\u2028\u2029",
    "ﬁ ｆｕｌｌ ① ²", "mixed 中文 and Ελληνικά and עברית",
]


def test_unicode_round_trip_is_exact_with_byte_fallback(tok):
    rng = random.Random(1234)
    texts = FIXED_TEXTS + [_random_text(rng, rng.randrange(1, 60)) for _ in range(400)]
    batch = tok.encode_batch(texts, num_threads=2)
    assert batch == [tok.encode(t) for t in texts]
    for text, ids in zip(texts, batch):
        assert tok.unk_id not in ids, text
        assert tok.decode(ids) == text, (text, tok.pieces(ids))
    assert tok.decode_batch(batch) == texts
    assert tok.decode_batch([]) == [] and tok.encode_batch([]) == []
    with pytest.raises(TypeError, match="use encode_batch"):
        tok.encode(["a list"])
    with pytest.raises(TypeError, match="use encode for one text"):
        tok.encode_batch("one text")
    # bos/eos decode to nothing, as in Meta's tokenizer.
    assert tok.decode(tok.encode("  hi", bos=True, eos=True)) == "  hi"


def test_meta_space_symbol_decodes_to_space(tok):
    # Documented SentencePiece limitation (Meta's Llama-2 model behaves the same): "▁" in the
    # input is the same symbol SentencePiece uses for " ", so it comes back as a space.
    assert tok.decode(tok.encode("a\u2581b")) == "a b"


def test_training_is_deterministic_for_a_seed(tmp_path):
    _write_corpus(tmp_path / "text", 120_000, 0)
    glob = str(tmp_path / "text" / "*.txt")
    # max_sentences below the line count, so the seeded sampling is active.
    kw = dict(vocab_size=500, max_sentences=2000, progress=False)
    a = train_tokenizer(glob, tmp_path / "a", seed=7, num_threads=2, **kw)
    b = train_tokenizer(glob, tmp_path / "b", seed=7, num_threads=2, **kw)
    c = train_tokenizer(glob, tmp_path / "c", seed=7, num_threads=1, **kw)
    d = train_tokenizer(glob, tmp_path / "d", seed=8, num_threads=2, **kw)
    assert json.loads((a.parent / "tokenizer.json").read_text())["sampled"] == 2000
    assert a.read_bytes() == b.read_bytes()

    def vocab(p):
        t = Tokenizer(p)
        return t.pieces(range(t.vocab_size))

    assert vocab(a) == vocab(c), "the vocabulary must not depend on num_threads"
    assert vocab(a) != vocab(d), "another seed samples other lines"


def test_sample_lines_is_uniform_ordered_and_seeded():
    lines = [str(i) for i in range(1000)]
    s = sample_lines(iter(lines), 100, seed=3)
    assert len(s) == 100 and s == sorted(s, key=int) and s == sample_lines(lines, 100, seed=3)
    assert s != sample_lines(lines, 100, seed=4)
    assert sample_lines(lines[:10], 100, seed=3) == lines[:10]


# ----------------------------------------------------------------------------- bad input


def test_glob_matching_nothing(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no files match --input '.*nothing/\*\.txt'"):
        train_tokenizer(str(tmp_path / "nothing" / "*.txt"), tmp_path / "out", progress=False)


def test_empty_corpus(tmp_path):
    for name in ["a.txt", "b.txt"]:
        (tmp_path / name).write_text("")
    (tmp_path / "c.txt").write_text("\n\n")
    with pytest.raises(ValueError, match=r"has no text: 3 file\(s\) read, all empty.*--input"):
        train_tokenizer(str(tmp_path / "*.txt"), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_corpus_too_small_for_vocab(tmp_path):
    (tmp_path / "small.txt").write_text("hello world 123\nthe quick brown fox\n" * 20)
    with pytest.raises(ValueError, match=r"too small for vocab_size=32000.*smaller --vocab_size"):
        train_tokenizer(str(tmp_path / "*.txt"), tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match=r"--vocab_size >= 260"):
        train_tokenizer(str(tmp_path / "*.txt"), tmp_path / "out", vocab_size=100, progress=False)


def test_missing_or_broken_model_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.model' not found"):
        Tokenizer(tmp_path / "nope.model")
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.model' not found"):
        Tokenizer(tmp_path)  # a directory without tokenizer.model
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="is not a SentencePiece model"):
        Tokenizer(tmp_path / "junk.model")


def _cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "jaxlm.tokenizer", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_cli_errors_are_one_line_and_exit_2(tmp_path):
    for args, needle in [
        (["train", "--input", str(tmp_path / "*.none"), "--out", str(tmp_path / "o")], "no files"),
        (["encode", "--model", str(tmp_path / "missing.model"), "--text", "x"], "not found"),
    ]:
        r = _cli(*args)
        assert r.returncode == 2, r.stderr
        assert "Traceback" not in r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0]


def test_cli_train_stdlib_and_encode(tmp_path, tok, model_path):
    r = _cli("train", "--input", "stdlib", "--vocab_size", "400", "--max_sentences", "3000",
             "--out", str(tmp_path / "t"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("trained BPE vocab 400 on 3,000 of ") and "tokenizer.model" in r.stdout
    info = json.loads((tmp_path / "t" / "tokenizer.json").read_text())
    assert info["input"] == "stdlib" and info["files"] == stdlib_corpus.num_documents()
    r = _cli("encode", "--model", str(model_path.parent), "--text", "x = 2026", "--bos")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(i) for i in tok.encode("x = 2026", bos=True)]


@pytest.mark.parametrize("command", ["train", "encode", "bench"])
def test_cli_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--model" in out or "--vocab_size" in out
    if command != "encode":
        assert "stdlib" in out


def test_bench_runs_on_a_glob(corpus, model_path):
    r = bench(model_path, str(corpus / "text" / "doc000*.txt"), repeats=1, num_threads=2)
    assert r["documents"] == 10 and r["tokens"] > 0 and r["batch_mb_per_s"] > 0
    assert "| `encode_batch`" in bench_table(r)


# ----------------------------------------------------------------------------- vocab padding


def test_padded_vocab_and_decode_ignores_padding_ids(tok):
    assert tok.padded_vocab_size() == 1024 and tok.padded_vocab_size(64) == 1024
    assert tok.padded_vocab_size(8) == 1000
    ids = tok.encode("hello world")
    assert tok.decode(ids + [1000, 1023, -1]) == "hello world"
    assert tok.decode_batch([[1020] + ids, [-1]]) == ["hello world", ""]
    check_model_vocab(tok, 1024)
    check_model_vocab(tok, 1000)
    with pytest.raises(ValueError, match=r"vocab_size=999 is smaller .* 1000 pieces.*= 1024"):
        check_model_vocab(tok, 999)


# ----------------------------------------------------------------------------- chat format


DIALOG = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "  What is 2+2? "},
    {"role": "assistant", "content": " 4. "},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "6"},
]


def _golden(sp, pairs, open_prompt=None):
    """bos + sp.encode(whole pair) + eos per pair; mask from the literal prompt prefix length."""
    ids, mask = [], []
    for prompt, whole in pairs:
        assert whole.startswith(prompt)
        p, w = sp.encode(prompt), sp.encode(whole)
        assert w[: len(p)] == p, "the prompt's tokens are a prefix of the whole pair's tokens"
        ids += [1] + w + [2]
        mask += [0] * (1 + len(p)) + [1] * (len(w) - len(p)) + [1]
    if open_prompt is not None:
        p = sp.encode(open_prompt)
        ids += [1] + p
        mask += [0] * (1 + len(p))
    return ids, mask


# Meta's strings typed out by hand. The merged system+user content is stripped as a whole, so the
# user's leading spaces after "<</SYS>>\n\n" survive (as in Meta's chat_completion).
PAIRS = [
    ("[INST] <<SYS>>\nAnswer briefly.\n<</SYS>>\n\n  What is 2+2? [/INST]",
     "[INST] <<SYS>>\nAnswer briefly.\n<</SYS>>\n\n  What is 2+2? [/INST] 4. "),
    ("[INST] And 3+3? [/INST]", "[INST] And 3+3? [/INST] 6 "),
]


def test_chat_golden_two_turns_with_system(tok, sp):
    ids, mask = chat.encode_dialog(tok, DIALOG)
    expected_ids, expected_mask = _golden(sp, PAIRS)
    assert ids == expected_ids
    assert mask == expected_mask
    # Spot checks of the golden itself: the answer " 6 " is trained on, "[/INST]" is not.
    last = len(ids) - 1
    assert ids[last] == 2 and mask[last] == 1 and mask[0] == 0 and ids[0] == 1
    assert sum(mask) == len(ids) - sum(len(sp.encode(p)) + 1 for p, _ in PAIRS)


def test_chat_golden_open_user_turn_is_the_prompt(tok, sp):
    dialog = DIALOG + [{"role": "user", "content": " Thanks! "}]
    ids, mask = chat.encode_dialog(tok, dialog)
    assert (ids, mask) == _golden(sp, PAIRS, open_prompt="[INST] Thanks! [/INST]")
    assert chat.encode_dialog_prompt(tok, dialog) == ids
    assert chat.encode_dialog(tok, [{"role": "user", "content": "hi"}]) == _golden(
        sp, [], open_prompt="[INST] hi [/INST]")


def test_chat_turns_concatenate_to_the_dialog(tok):
    turns = chat.encode_dialog_turns(tok, DIALOG)
    assert len(turns) == 2
    assert chat.encode_dialog(tok, DIALOG) == (turns[0][0] + turns[1][0], turns[0][1] + turns[1][1])


def test_chat_prefix_property_on_random_dialogs(tok, sp):
    # The mask boundary relies on "[INST] u [/INST]" tokenising as a prefix of the whole pair.
    rng = random.Random(5)
    for _ in range(100):
        user, answer = _random_text(rng, rng.randrange(0, 30)), _random_text(rng, rng.randrange(0, 30))
        if any(t in user + answer for t in ("[INST]", "[/INST]", "<<SYS>>", "<</SYS>>")):
            continue
        dialog = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        ids, mask = chat.encode_dialog(tok, dialog)
        assert ids == [1] + sp.encode(f"[INST] {user.strip()} [/INST] {answer.strip()} ") + [2]
        assert len(mask) == len(ids) and mask[-1] == 1 and mask[0] == 0


def test_chat_refuses_to_guess_the_mask_boundary():
    class MergingTokenizer:  # a piece spanning "[/INST] a": no token boundary at the answer
        path = "stub"

        def encode(self, text, bos=False, eos=False):
            return [1] * bos + [len(text)] + [2] * eos

    with pytest.raises(RuntimeError, match="internal error.*not a prefix"):
        chat.encode_dialog(MergingTokenizer(), DIALOG[1:3])


@pytest.mark.parametrize("dialog, match", [
    ([], "empty dialog"),
    ([{"role": "system", "content": "s"}], "message 0: a system message must be followed"),
    ([{"role": "assistant", "content": "a"}], "message 0: role 'assistant' where 'user'"),
    ([{"role": "user", "content": "u"}, {"role": "user", "content": "u"}],
     "message 1: role 'user' where 'assistant'"),
    ([{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}],
     "message 1: role 'assistant' where 'user'.*after the optional system"),
    ([{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"},
      {"role": "system", "content": "s"}], "message 2: role 'system' where 'user'"),
    ([{"role": "user", "content": "u"}, {"role": "bot", "content": "a"}],
     "message 1: role 'bot' where 'assistant'"),
    ([{"role": "user", "content": None}], "message 0: 'content' must be a string"),
    (["hi"], "message 0: expected a dict"),
])
def test_chat_role_errors(tok, dialog, match):
    with pytest.raises(ValueError, match=match):
        chat.encode_dialog(tok, dialog)


@pytest.mark.parametrize("tag", ["[INST]", "[/INST]", "<<SYS>>", "<</SYS>>"])
@pytest.mark.parametrize("index", [0, 1, 2])
def test_chat_rejects_tags_in_any_message(tok, tag, index):
    dialog = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
              {"role": "assistant", "content": "a"}]
    dialog[index] = dict(dialog[index], content=f"please {tag} now")
    with pytest.raises(ValueError, match=rf"message {index}: contains .*special tags are not allowed"):
        chat.encode_dialog(tok, dialog)


def test_prompt_must_end_with_user(tok):
    with pytest.raises(ValueError, match="message 1: a generation prompt must end with a user"):
        chat.encode_dialog_prompt(tok, DIALOG[1:3])
