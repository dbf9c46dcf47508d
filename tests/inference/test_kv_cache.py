"""KV cache and rolling buffer against full recomputation; chunked prefill; cache size."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm.config import get_preset
from jaxlm.inference.generate import generate
from jaxlm.model import Transformer
from jaxlm.model.attention import KVCache


@pytest.fixture(scope="module")
def swa_model():
    return Transformer(get_preset("test_swa"), rngs=nnx.Rngs(0))  # window W = 8


@pytest.fixture(scope="module")
def full_model():
    return Transformer(get_preset("test"), rngs=nnx.Rngs(1))


@pytest.mark.parametrize("name", ["swa_model", "full_model"])
def test_decode_matches_full_recompute_beyond_three_windows(name, request):
    model = request.getfixturevalue(name)
    prompt = [5, 17, 99, 3, 200]
    new = 3 * 8 + 6  # > 3·W generated tokens: the rolling buffer wraps several times
    result = generate(model, [prompt], max_new_tokens=new, return_logits=True)
    seq = prompt + result.tokens[0]
    assert len(result.tokens[0]) == new
    # Reference: the whole sequence at once with the model's (sliding-window) masks, no cache.
    full = np.asarray(model(jnp.asarray([seq])))[0, len(prompt) - 1:-1]
    np.testing.assert_allclose(result.logits[0], full, atol=1e-4)
    assert full.argmax(-1).tolist() == result.tokens[0]  # the same greedy tokens


@pytest.mark.parametrize("chunk", [pytest.param(1, marks=pytest.mark.slow), 3,
                                   pytest.param(5, marks=pytest.mark.slow), 8, 13,
                                   pytest.param(30, marks=pytest.mark.slow)])
def test_chunked_prefill_equals_one_shot(swa_model, chunk):
    # Chunks smaller than, equal to and larger than W = 8, dividing and not dividing T = 30.
    t = 30
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, t)))
    one_shot = np.asarray(swa_model(tokens))
    cache = KVCache.create(swa_model.cfg, 2, 100)
    outs = []
    for start in range(0, t, chunk):
        piece = tokens[:, start:start + chunk]
        pos = jnp.broadcast_to(jnp.arange(start, start + piece.shape[1]), piece.shape)
        logits, cache = swa_model(piece, pos, cache=cache)
        outs.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(outs, axis=1), one_shot, atol=1e-5)
    # The buffer now holds exactly the last W positions, each in slot p mod W.
    pos = np.asarray(cache.pos)
    assert sorted(pos[0].tolist()) == list(range(t - 8, t))
    assert all(pos[0, p % 8] == p for p in range(t - 8, t))


@pytest.mark.slow  # the logits-level chunk test above covers it; keeps `make test` < 10 min cold
def test_generate_same_tokens_for_any_prefill_chunk(swa_model):
    prompt = list(range(1, 21))
    runs = [generate(swa_model, [prompt], max_new_tokens=10, prefill_chunk=c).tokens[0]
            for c in (None, 3, 13)]
    assert all(r == runs[0] for r in runs)


@pytest.mark.parametrize("per_layer", [False, True])
def test_single_padding_token_leaves_the_cache_alone(swa_model, per_layer):
    """Batch 1, one token at position -1 (the batch-1 write path): nothing is written."""
    _, cache = swa_model(jnp.asarray([[5, 17, 99]]), cache=KVCache.create(swa_model.cfg, 1, 100))
    start = cache.per_layer() if per_layer else cache
    groups = swa_model.layer_groups() if per_layer else None
    _, after = swa_model.hidden(jnp.asarray([[7]]), jnp.asarray([[-1]]), cache=start,
                                layer_groups=groups)
    for got, want in zip(jax.tree.leaves(after), jax.tree.leaves(start)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    _, written = swa_model.hidden(jnp.asarray([[7]]), jnp.asarray([[3]]), cache=start,
                                  layer_groups=groups)
    assert int(written.pos[0, 3]) == 3 and not np.array_equal(written.k[0], start.k[0])


def test_per_layer_cache_shapes_and_misuse(swa_model):
    layers = KVCache.create(swa_model.cfg, 3, 100).per_layer()  # test_swa: L=2, K=2, H=8, W=8
    assert [a.shape for a in layers.k] == [(6, 8, 8)] * 2 and layers.per_layer() is layers
    with pytest.raises(ValueError, match="layer_groups"):
        swa_model.hidden(jnp.zeros((3, 1), jnp.int32), cache=layers)


def test_cache_size_does_not_depend_on_generation_length(swa_model, full_model):
    short, long = KVCache.create(swa_model.cfg, 2, 100), KVCache.create(swa_model.cfg, 2, 100_000)
    assert short.k.shape == long.k.shape == (2, 2, 2, 8, 8)  # [L, B, K, H, W]
    assert short.v.shape == long.v.shape == (2, 2, 2, 8, 8)  # [L, B, K, W, H]
    full = KVCache.create(full_model.cfg, 2, 100)  # full attention grows with the length
    assert full.size == 100
    assert full.k.shape == (2, 2, 4, 8, 100) and full.v.shape == (2, 2, 4, 100, 8)  # keys [.., H, S]
    # Mistral 7B at 32k tokens: 8x less cache memory with W = 4096 (Mistral §2).
    mistral = get_preset("mistral_7b")
    rolled = KVCache.create(mistral, 1, 32768).pos.shape[1]
    full = KVCache.create(mistral.replace(sliding_window=None), 1, 32768).pos.shape[1]
    assert full // rolled == 8


@pytest.mark.parametrize("name", ["swa_model", pytest.param("full_model", marks=pytest.mark.slow)])
def test_ragged_batch_equals_each_prompt_alone(name, request):
    model = request.getfixturevalue(name)
    prompts = [[5, 17, 99, 3, 200], list(range(1, 14)), [7]]
    batched = generate(model, prompts, max_new_tokens=12, return_logits=True)
    for row, prompt in enumerate(prompts):
        alone = generate(model, [prompt], max_new_tokens=12, return_logits=True)
        assert batched.tokens[row] == alone.tokens[0]
        np.testing.assert_allclose(batched.logits[row], alone.logits[0], atol=1e-5)


def test_eos_stops_each_row_independently(full_model):
    prompts = [[5, 17, 99], [8, 1, 2, 3]]
    free = generate(full_model, prompts, max_new_tokens=12)
    eos = free.tokens[0][3]  # make the 4th token of row 0 the "eos"
    stopped = generate(full_model, prompts, max_new_tokens=12, eos_id=eos)
    assert stopped.tokens[0] == free.tokens[0][:free.tokens[0].index(eos)]
    assert stopped.finished[0]
    row1 = free.tokens[1]
    assert stopped.tokens[1] == (row1[:row1.index(eos)] if eos in row1 else row1)


def test_prompts_may_be_arrays(full_model):
    import jax.numpy as jnp

    as_list = generate(full_model, [[5, 17, 99], [8, 1]], max_new_tokens=3).tokens
    arrays = generate(full_model, [jnp.array([5, 17, 99]), np.array([8, 1])], max_new_tokens=3)
    assert arrays.tokens == as_list
    square = generate(full_model, np.array([[5, 17, 99], [8, 1, 2]]), max_new_tokens=3).tokens
    assert square[0] == as_list[0]  # a 2-D array is a batch of equal-length prompts


def test_bad_generation_input(full_model):
    with pytest.raises(ValueError, match=r"each a list of token ids \(e.g. \[\[1, 2, 3\]\]"):
        generate(full_model, [1, 2, 3], max_new_tokens=4)  # a flat prompt, not a list of them
    with pytest.raises(ValueError, match="empty prompt"):
        generate(full_model, [[1, 2], []], max_new_tokens=4)
    with pytest.raises(ValueError, match=r"exceeds the model's context max_seq_len=128"):
        generate(full_model, [list(range(120))], max_new_tokens=20)
    with pytest.raises(ValueError, match="token ids must be in"):
        generate(full_model, [[1, 300]], max_new_tokens=4)
    with pytest.raises(ValueError, match="segment_ids are for packed training rows"):
        cache = KVCache.create(full_model.cfg, 1, 8)
        full_model(jnp.ones((1, 2), jnp.int32), cache=cache, segment_ids=jnp.ones((1, 2), jnp.int32))


def test_prefill_chunk_zero_is_an_error_not_the_default(full_model):
    with pytest.raises(ValueError, match="prefill_chunk must be >= 1"):
        generate(full_model, [[1, 2, 3]], max_new_tokens=1, prefill_chunk=0)


@pytest.mark.parametrize("name", ["full_model", "swa_model"])
def test_cache_smaller_than_the_sequence_is_an_error(name, request):
    # Full attention: 6 slots for 8 positions would silently act as a 6-token sliding window.
    # test_swa (W = 8): 6 slots < W is the same mistake; 8 slots = W rolls by design.
    model = request.getfixturevalue(name)
    tokens = jnp.ones((1, 8), jnp.int32)
    with pytest.raises(ValueError, match=r"position 7 does not fit the KVCache's 6 slots.*"
                                         r"KVCache.create\(cfg, batch, max_len=...\)"):
        model(tokens, cache=KVCache.create(model.cfg, 1, 6))
    model(tokens, cache=KVCache.create(model.cfg, 1, 8))
    if name == "swa_model":
        model(jnp.ones((1, 12), jnp.int32), cache=KVCache.create(model.cfg, 1, 100))  # rolls
