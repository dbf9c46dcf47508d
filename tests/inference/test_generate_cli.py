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

