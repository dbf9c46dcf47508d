"""experiments/generate.py end to end on checkpoints whose model always answers one known token
(tests/inference/conftest.py): text assembly, tokenizer and eos handling, chat, errors."""
import json

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
