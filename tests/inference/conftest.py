"""Checkpoints for the generate CLI tests: a tiny model that always answers one token, saved with
a small SentencePiece tokenizer, so a test knows the generated ids before it runs."""
import importlib.util
from pathlib import Path

import jax.numpy as jnp
import pytest
from flax import nnx

ROOT = Path(__file__).resolve().parents[2]
TOKENIZER_VOCAB = 300
MODEL_VOCAB = 384  # padded past the tokenizer, as trainer checkpoints are


@pytest.fixture(scope="session")
def tokenizer_file(tmp_path_factory) -> Path:
    from jaxlm.tokenizer import train_tokenizer

    corpus = tmp_path_factory.mktemp("corpus")
    text = ("The capital of France is Paris. The capital of Italy is Rome. "
            "Paris is a city in France. Rome is a city in Italy.\n") * 100
    (corpus / "a.txt").write_text(text)
    return train_tokenizer(str(corpus / "*.txt"), corpus / "tok", vocab_size=TOKENIZER_VOCAB,
                           progress=False, num_threads=1)


@pytest.fixture(scope="session")
def constant_checkpoint(tmp_path_factory, tokenizer_file):
    """constant_checkpoint(token, max_seq_len=128, tokenizer=True) -> model directory whose model
    greedily generates `token` after any prompt.

    Attention and MLP outputs are zero, so the last hidden state is the token's embedding; every
    embedding row is the same vector and the head scores only `token`, so its logit is the
    largest (d_model) and all others are 0.
    """
    from jaxlm.checkpoint import save_model
    from jaxlm.config import get_preset
    from jaxlm.model import Transformer

    cache = {}

    def make(token: int, max_seq_len: int = 128, tokenizer: bool = True) -> Path:
        key = (token, max_seq_len, tokenizer)
        if key not in cache:
            cfg = get_preset("test", vocab_size=MODEL_VOCAB, max_seq_len=max_seq_len)
            model = Transformer(cfg, rngs=nnx.Rngs(0))
            model.layers.attn.o[...] = jnp.zeros_like(model.layers.attn.o[...])
            model.layers.mlp.down[...] = jnp.zeros_like(model.layers.mlp.down[...])
            model.embed.embedding[...] = jnp.ones_like(model.embed.embedding[...])
            model.lm_head[...] = jnp.zeros_like(model.lm_head[...]).at[:, token].set(1.0)
            out = tmp_path_factory.mktemp(f"const{token}_{max_seq_len}")
            save_model(out, model)
            if tokenizer:
                (out / "tokenizer.model").write_bytes(tokenizer_file.read_bytes())
            cache[key] = out
        return cache[key]

    return make


@pytest.fixture(scope="session")
def generate_cli():
    """experiments/generate.py imported as a module, so tests call main(argv) in process."""
    spec = importlib.util.spec_from_file_location("generate_cli", ROOT / "experiments" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
