"""Model-FLOP accounting (jaxlm.train.metrics) against independent counts: the published
parameter counts, a NumPy mask for the keys a query sees, and the datasheet table's lookup."""
import logging

import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.config import get_preset
from jaxlm.train import metrics
from jaxlm.train.metrics import (attention_keys_per_query, forward_flops, generate_flops,
                                 train_flops_per_token)


@pytest.mark.parametrize("t, window", [(1, None), (7, None), (64, None), (64, 16), (10, 3),
                                       (5, 8)])
def test_keys_per_query_counts_the_mask(t, window):
    q, k = np.arange(t)[:, None], np.arange(t)[None, :]
    visible = (k <= q) & ((q - k < window) if window else True)
    assert attention_keys_per_query(t, window) == pytest.approx(visible.sum() / t)


def test_llama2_7b_train_flops():
    # Llama 2 7B: 6,738,415,616 parameters (HF's count); the embedding table is a gather, the
    # untied head a matmul; causal attention at T=4096 sees (T+1)/2 keys per query.
    cfg = get_preset("llama2_7b")
    matmul = 6_738_415_616 - 32_000 * 4096
    attention = 12 * 32 * 32 * 128 * 4097 / 2
    assert train_flops_per_token(cfg, 4096) == pytest.approx(6 * matmul + attention, rel=1e-12)


def test_mixtral_counts_active_experts_only():
    # Mixtral 8x7B, two of eight experts per token: per layer q/k/v/o, 2 active SwiGLU experts,
    # the router and two norms; plus embedding, untied head and final norm = 12.88B active.
    cfg = get_preset("mixtral_8x7b")
    d, f, layers = 4096, 14336, 32
    per_layer = d * (4096 + 2 * 1024) + 4096 * d + 2 * 3 * d * f + d * 8 + 2 * d
    active = layers * per_layer + 2 * 32_000 * d + d
    assert active == 12_879_925_248
    keys = attention_keys_per_query(512, cfg.sliding_window)
    expected = 6 * (active - 32_000 * d) + 12 * layers * 32 * 128 * keys
    assert train_flops_per_token(cfg, 512) == pytest.approx(expected, rel=1e-12)


def test_tied_embeddings_count_the_head_once():
    tied, untied = get_preset("test", tie_embeddings=True), get_preset("test")
    v, d = tied.vocab_size, tied.d_model
    # No attention (0 keys): 2 FLOPs per matmul parameter; tied, the table is the head.
    assert forward_flops(tied, 1, 0) == 2 * tied.param_count()
    assert forward_flops(untied, 1, 0) == 2 * (untied.param_count() - v * d)


def test_forward_train_and_generate_relations():
    cfg = get_preset("test", sliding_window=6)
    head = 2 * cfg.vocab_size * cfg.d_model
    assert train_flops_per_token(cfg, 20) == pytest.approx(
        3 * forward_flops(cfg, 1, attention_keys_per_query(20, 6)))
    # Prefill of 10 tokens computes the head for its last token only.
    full = forward_flops(cfg, 10, attention_keys_per_query(10, 6))
    assert generate_flops(cfg, 1, 10, 1) == pytest.approx(full - 9 * head)
    # Each further new token is one forward at its position (0-based 10, 11, ...), window-capped.
    for n in (2, 3, 5):
        step = generate_flops(cfg, 1, 10, n) - generate_flops(cfg, 1, 10, n - 1)
        assert step == pytest.approx(forward_flops(cfg, 1, min(10 + n - 2 + 1, 6)))
    assert generate_flops(cfg, 4, 10, 5) == pytest.approx(4 * generate_flops(cfg, 1, 10, 5))


class _Device:
    def __init__(self, kind, platform="tpu"):
        self.device_kind, self.platform = kind, platform


@pytest.mark.parametrize("kind, peak", [
    ("TPU v5 lite", 197e12), ("TPU v5p", 459e12), ("TPU v5", 459e12), ("TPU v4", 275e12),
    ("TPU v3", 61.5e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 80GB HBM3", 989e12),
    ("NVIDIA H100 NVL", 835e12)])
def test_datasheet_peaks_match_the_longest_name(monkeypatch, kind, peak):
    monkeypatch.setattr(metrics.jax, "devices", lambda: [_Device(kind)])
    got, source = metrics.peak_flops_per_device()
    assert got == peak and "datasheet" in source


def test_unknown_accelerator_measures_a_large_bf16_matmul(monkeypatch, caplog):
    calls = []
    monkeypatch.setattr(metrics.jax, "devices", lambda: [_Device("TPU v9 imaginary")])
    monkeypatch.setattr(metrics, "measure_matmul_flops",
                        lambda n=2048, repeats=5, dtype=jnp.float32: calls.append((n, dtype)) or 1.0)
    with caplog.at_level(logging.WARNING, logger="jaxlm.train"):
        peak, source = metrics.peak_flops_per_device()
    assert calls == [(8192, jnp.bfloat16)] and "no datasheet entry" in source
    assert "PEAK_FLOPS" in caplog.text


def test_cpu_peak_is_measured_in_f32(monkeypatch):
    calls = []
    monkeypatch.setattr(metrics.jax, "devices", lambda: [_Device("cpu", "cpu")])
    monkeypatch.setattr(metrics, "measure_matmul_flops",
                        lambda n=2048, repeats=5, dtype=jnp.float32: calls.append((n, dtype)) or 2.0)
    assert metrics.peak_flops_per_device() == (2.0, "measured f32 matmul on cpu")
    assert calls == [(2048, jnp.float32)]
