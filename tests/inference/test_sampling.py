"""Sampling rules against a NumPy reference of the same rule on fixed logits; seeds reproduce."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.inference.sampling import SamplingConfig, argmax, filtered_logits, sample


def reference_probs(logits, temperature, top_k, top_p, vocab_limit=None):
    """The distribution each rule leaves, written directly from its definition."""
    logits = logits.astype(np.float64).copy()
    if vocab_limit is not None:
        logits[:, vocab_limit:] = -np.inf
    logits /= temperature
    out = []
    for row in logits:
        if top_k:
            kth = np.sort(row)[-top_k]
            row = np.where(row >= kth, row, -np.inf)
        p = np.exp(row - row.max())
        p /= p.sum()
        if top_p < 1:
            # Meta sample_top_p: sort, cumsum, drop where cumsum - p > top_p, renormalise.
            order = np.argsort(-p, kind="stable")
            sp = p[order]
            sp[np.cumsum(sp) - sp > top_p] = 0
            p = np.zeros_like(p)
            p[order] = sp
            p /= p.sum()
        out.append(p)
    return np.array(out)


LOGITS = np.random.default_rng(0).normal(size=(3, 50)).astype(np.float32) * 3


@pytest.mark.parametrize("temperature,top_k,top_p,vocab_limit", [
    (1.0, 0, 1.0, None), (0.6, 0, 0.9, None), (1.3, 5, 1.0, None), (0.8, 10, 0.5, None),
    (1.0, 0, 0.05, None), (1.0, 0, 0.9, 40),
])
def test_filtered_distribution_matches_reference(temperature, top_k, top_p, vocab_limit):
    cfg = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, vocab_limit=vocab_limit)
    got = np.asarray(jax.nn.softmax(filtered_logits(jnp.asarray(LOGITS), cfg), axis=-1))
    np.testing.assert_allclose(got, reference_probs(LOGITS, temperature, top_k, top_p, vocab_limit),
                               atol=1e-6)


def test_samples_follow_the_distribution_and_seeds_reproduce():
    cfg = SamplingConfig(temperature=0.8, top_k=10, top_p=0.7)
    logits = jnp.asarray(np.repeat(LOGITS[:1], 20000, axis=0))
    draws = np.asarray(sample(logits, jax.random.key(0), cfg))
    freq = np.bincount(draws, minlength=50) / len(draws)
    np.testing.assert_allclose(freq, reference_probs(LOGITS[:1], 0.8, 10, 0.7)[0], atol=0.015)
    again = np.asarray(sample(logits, jax.random.key(0), cfg))
    other = np.asarray(sample(logits, jax.random.key(1), cfg))
    assert (draws == again).all() and (draws != other).any()


def test_greedy_is_argmax_and_respects_vocab_limit():
    assert np.asarray(sample(jnp.asarray(LOGITS), jax.random.key(0), SamplingConfig())).tolist() == \
        LOGITS.argmax(-1).tolist()
    limited = sample(jnp.asarray(LOGITS), jax.random.key(0), SamplingConfig(vocab_limit=10))
    assert np.asarray(limited).tolist() == LOGITS[:, :10].argmax(-1).tolist()


def test_argmax_matches_numpy_on_ties_infinities_and_nans():
    rows = np.random.default_rng(1).integers(-3, 4, size=(64, 37)).astype(np.float32)  # many ties
    rows[5, :] = -np.inf
    rows[6, 9] = np.inf
    rows[7, [4, 20]] = np.nan       # NumPy: the first NaN is the maximum
    rows[8, :] = np.nan
    assert np.asarray(argmax(jnp.asarray(rows))).tolist() == rows.argmax(-1).tolist()


@pytest.mark.parametrize("field,value", [("temperature", -1.0), ("top_k", -2), ("top_p", 0.0),
                                         ("top_p", 1.5), ("vocab_limit", 0)])
def test_invalid_sampling_config(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingConfig(**{field: value})


def test_top_k_above_the_vocabulary_keeps_every_token():
    # HF's TopKLogitsWarper clamps k to V; jax.lax.top_k would fail on k > V.
    wide = filtered_logits(jnp.asarray(LOGITS), SamplingConfig(temperature=1.0, top_k=10_000))
    np.testing.assert_allclose(np.asarray(wide), LOGITS, rtol=1e-6)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_temperature_must_be_finite(value):
    with pytest.raises(ValueError, match="temperature must be a finite number"):
        SamplingConfig(temperature=value)
