"""experiments/generate.py end to end on checkpoints whose model always answers one known token
(tests/inference/conftest.py): text assembly, tokenizer and eos handling, chat, errors."""
import io
import json

import pytest

from jaxlm.tokenizer import Tokenizer

PROMPT = "The capital of France is"


def _piece_id(tok: Tokenizer, piece: str) -> int:
    return next(i for i in range(tok.vocab_size) if tok.pieces([i]) == [piece])


def test_prompt_text_keeps_the_space_before_the_continuation(constant_checkpoint, tokenizer_file,
                                                             generate_cli, capsys):
    # SentencePiece drops the leading space of a decoded sequence's first piece, so decoding the
    # continuation on its own glued the prompt and the first new piece together ("isis").
    tok = Tokenizer(tokenizer_file)
    is_ = _piece_id(tok, "▁is")
    ckpt = constant_checkpoint(is_)
    assert generate_cli.main(["--checkpoint", str(ckpt), "--prompt", PROMPT,
                              "--max_new_tokens", "2"]) == 0
    assert capsys.readouterr().out == "The capital of France is is is\n"
    assert generate_cli.main(["--checkpoint", str(ckpt), "--prompt", PROMPT,
                              "--max_new_tokens", "2", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record == {"ids": [is_, is_], "text": " is is"}


def test_prompt_ids_use_the_checkpoint_tokenizer_for_eos_and_vocab(constant_checkpoint, generate_cli,
                                                                    tokenizer_file, capsys):
    vocab = Tokenizer(tokenizer_file).vocab_size  # the model's vocab is padded past it
    # A model that always says eos: with the checkpoint's tokenizer.model the answer stops at once.
    assert generate_cli.main(["--checkpoint", str(constant_checkpoint(2)), "--prompt_ids", "1,5",
                              "--max_new_tokens", "3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ids"] == []
    # A model that always says a padded-vocab id the tokenizer lacks: never sampled.
    assert generate_cli.main(["--checkpoint", str(constant_checkpoint(vocab + 10)),
                              "--prompt_ids", "1,5", "--max_new_tokens", "3", "--json"]) == 0
    assert all(i < vocab for i in json.loads(capsys.readouterr().out)["ids"])


def test_chat_drops_old_exchanges_when_the_context_is_full(constant_checkpoint, tokenizer_file,
                                                           generate_cli, capsys, monkeypatch):
    # max_seq_len 80 holds the first two turns (prompts of 47 and 72 tokens + 4 new); the third
    # (97 + 4) fits only without the first exchange, and so on for every later turn.
    ckpt = constant_checkpoint(_piece_id(Tokenizer(tokenizer_file), "▁is"), max_seq_len=80)
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\nhi\nhi\nhi\n"))
    assert generate_cli.main(["--checkpoint", str(ckpt), "--chat", "--system", "Be brief.",
                              "--max_new_tokens", "4", "--temperature", "0"]) == 0
    out, err = capsys.readouterr()
    assert out.count("assistant> is is is is") == 4, err
    assert err.count("dropped the oldest 1 exchange(s)") == 2 and "error" not in err
    assert err.count("[truncated at --max_new_tokens]") == 4  # the model never says eos


def test_fit_dialog_prompt_keeps_the_system_message_and_the_last_question(tokenizer_file):
    from jaxlm.chat import encode_dialog_prompt, fit_dialog_prompt

    tok = Tokenizer(tokenizer_file)
    dialog = [{"role": "system", "content": "Be brief."}]
    for q in ("one", "two", "three"):
        dialog += [{"role": "user", "content": q}, {"role": "assistant", "content": "is"}]
    dialog.append({"role": "user", "content": "four"})
    ids, kept = fit_dialog_prompt(tok, dialog, len(encode_dialog_prompt(tok, dialog)) - 1)
    assert kept == dialog[:1] + dialog[3:] and ids == encode_dialog_prompt(tok, kept)
    ids, kept = fit_dialog_prompt(tok, dialog, 1)  # too small for anything: system + last stay
    assert kept == dialog[:1] + dialog[-1:]
    assert fit_dialog_prompt(tok, dialog, None)[1] == dialog


class _CtrlC:
    """stdin on which the user presses Ctrl-C at the prompt."""

    def readline(self, *_):
        raise KeyboardInterrupt


def test_ctrl_c_prints_interrupted_without_a_traceback(constant_checkpoint, tokenizer_file,
                                                       generate_cli, capsys, monkeypatch):
    ckpt = str(constant_checkpoint(_piece_id(Tokenizer(tokenizer_file), "▁is")))
    # At the chat prompt: like Ctrl-D, a normal exit.
    monkeypatch.setattr("sys.stdin", _CtrlC())
    assert generate_cli.main(["--checkpoint", ckpt, "--chat"]) == 0
    assert "Traceback" not in capsys.readouterr().err

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    # While generating: "interrupted", exit status 130 (128 + SIGINT).
    monkeypatch.setattr("jaxlm.inference.generate.generate", interrupted)
    assert generate_cli.main(["--checkpoint", ckpt, "--prompt", PROMPT]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "interrupted"


@pytest.mark.parametrize("flags,message", [
    (["--temperature", "nan"], "--temperature must be a finite number >= 0"),
    (["--temperature", "-1"], "--temperature must be a finite number >= 0"),
    (["--top_k", "5"], "set --temperature > 0 to sample"),
    (["--top_p", "0.9", "--temperature", "0"], "set --temperature > 0 to sample"),
    (["--prefill_chunk", "0"], "--prefill_chunk must be >= 1"),
])
def test_bad_sampling_flags_are_one_line_naming_the_flag(flags, message, constant_checkpoint,
                                                         generate_cli, capsys):
    assert generate_cli.main(["--checkpoint", str(constant_checkpoint(5)), "--prompt", PROMPT,
                              *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_bad_matvec_setting_is_one_line_before_loading(constant_checkpoint, generate_cli,
                                                       monkeypatch, capsys):
    monkeypatch.setenv("JAXLM_CPU_MATVEC", "on")
    assert generate_cli.main(["--checkpoint", str(constant_checkpoint(5)), "--prompt", PROMPT]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: JAXLM_CPU_MATVEC must be auto, 0 or 1, got 'on'"  # no "loading"


def test_top_k_larger_than_the_vocabulary_samples(constant_checkpoint, generate_cli, capsys):
    assert generate_cli.main(["--checkpoint", str(constant_checkpoint(5)), "--prompt_ids", "1,5",
                              "--temperature", "1", "--top_k", "100000", "--max_new_tokens", "2",
                              "--json"]) == 0
    # Token 5's logit is d_model above every other one: sampling at T=1 still picks it.
    assert json.loads(capsys.readouterr().out)["ids"] == [5, 5]


def test_wrong_directories_as_checkpoint_say_what_to_pass(constant_checkpoint, generate_cli,
                                                          make_hf_model, tmp_path, capsys):
    import shutil

    # A trainer workdir: config.json (the experiment) at the top, the model in model/.
    workdir = tmp_path / "run"
    shutil.copytree(constant_checkpoint(5), workdir / "model")
    (workdir / "config.json").write_text(json.dumps({"model": {"preset": "test"}}))
    assert generate_cli.main(["--checkpoint", str(workdir), "--prompt_ids", "1"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"--checkpoint {workdir / 'model'}" in errors[0]
    # A Hugging Face directory.
    _, hf_dir = make_hf_model("llama")
    assert generate_cli.main(["--checkpoint", str(hf_dir), "--prompt_ids", "1"]) == 2
    err = capsys.readouterr().err
    assert "python -m jaxlm.convert import-hf" in err.splitlines()[-1]


def test_progress_goes_to_stderr(constant_checkpoint, generate_cli, capsys):
    ckpt = str(constant_checkpoint(5))
    assert generate_cli.main(["--checkpoint", ckpt, "--prompt_ids", "1", "--max_new_tokens", "1",
                              "--json"]) == 0
    out, err = capsys.readouterr()
    assert f"loading {ckpt}…" in err and "compiling and generating…" in err
    json.loads(out)  # stdout is the JSON object alone


def test_help_shows_the_examples_as_written_and_the_defaults(generate_cli, capsys):
    with pytest.raises(SystemExit):
        generate_cli.parse_args(["--help"])
    text = capsys.readouterr().out
    assert "--max_new_tokens 8 \\\n        --temperature 0 --json" in text  # a shell continuation
    assert "(default 128)" in text and "(default: the sliding window W" in " ".join(text.split())
