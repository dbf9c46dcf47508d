"""Throughput accounting (FLOPs, MFU against a peak) and metric sinks: console, JSONL,
TensorBoard event files, and a loss-curve PNG."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxlm.config import ModelConfig

# Dense bf16 peak FLOP/s per chip (vendor datasheets). MFU on these is against bf16 peak.
PEAK_FLOPS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
    "TPU v5": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12,
    "NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12, "NVIDIA L4": 121e12,
}


def measure_matmul_flops(n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of an n x n f32 matmul on the default device, measured now (median of repeats).

    On CPU this is the 'peak' MFU is reported against: what this machine's BLAS really does."""
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        f(a).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * n ** 3 / sorted(times)[len(times) // 2]


def peak_flops_per_device() -> tuple[float, str]:
    """(peak FLOP/s of one device, where the number came from)."""
    device = jax.devices()[0]
    kind = getattr(device, "device_kind", "")
    for name, flops in PEAK_FLOPS.items():
        if kind.startswith(name):
            return flops, f"{kind} datasheet (bf16)"
    return measure_matmul_flops(), f"measured f32 matmul on {kind or device.platform}"


def attention_keys_per_query(seq_len: int, window: int | None) -> float:
    """Mean keys a query attends to under a causal (and sliding-window) mask: causal ≈ T/2."""
    w = window or seq_len
    return sum(min(i + 1, w) for i in range(seq_len)) / seq_len


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """6·N (forward + backward over matmul parameters) + attention scores and values.

    N excludes the embedding table (a gather, not a matmul) but includes the output head; MoE
    models count only active parameters. Attention: 4·L·N_heads·H FLOPs per key forward, ×3
    for training, over the mean number of keys a query sees (causal halves it).
    """
    active = cfg.active_param_count() if hasattr(cfg, "active_param_count") else cfg.param_count()
    matmul_params = active - cfg.vocab_size * cfg.d_model
    if cfg.tie_embeddings:
        matmul_params += cfg.vocab_size * cfg.d_model
    keys = attention_keys_per_query(seq_len, cfg.sliding_window)
    return 6 * matmul_params + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * keys


class MetricsWriter:
    """One call, three sinks: WORKDIR/metrics.jsonl, TensorBoard events, and the return value for
    the console. Only process 0 writes (multi-host)."""

    def __init__(self, workdir: str | Path, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(workdir) / "metrics.jsonl"
        self._tb = None
        if enabled:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(Path(workdir) / "tensorboard"))
            self._file = open(self.path, "a")

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if isinstance(v, (int, float)) and math.isfinite(v) else
                     (None if isinstance(v, float) else v)) for k, v in metrics.items()}
        self._file.write(json.dumps({"step": step, **clean}) + "\n")
        self._file.flush()
        for k, v in clean.items():
            if isinstance(v, float):
                self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            self._tb.close()


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_loss(metrics_path: str | Path, out_png: str | Path, reference: float | None = None,
              reference_label: str = "") -> Path:
    """Training (and eval) loss against step, from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
    evals = [(r["step"], r["eval_loss"]) for r in rows if r.get("eval_loss") is not None]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    if reference is not None:
        ax.axhline(reference, color="gray", linestyle="--", label=reference_label)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return Path(out_png)
