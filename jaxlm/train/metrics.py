"""Throughput accounting (FLOPs, MFU against a peak) and metric sinks: console, JSONL,
TensorBoard event files, and a loss-curve PNG."""
from __future__ import annotations

import io
import json
import logging
import math
import os
import shutil
import tempfile
import time

import jax
import jax.numpy as jnp
from etils import epath

from jaxlm.config import ModelConfig
from jaxlm.paths import as_path, is_remote

log = logging.getLogger("jaxlm.train")

# Dense bf16 peak FLOP/s per JAX device (vendor datasheets): a chip, except on TPU v2 / v3,
# where each of a chip's two TensorCores is its own device (chip: 45 / 123 TFLOP/s).
# MFU on these is against bf16 peak. Matched by prefix of jax's device_kind, first match wins:
# the longer names come first ("TPU v5 lite" before "TPU v5", "NVIDIA H100 PCIe" before
# "NVIDIA H100").
PEAK_FLOPS = {
    "TPU v2": 22.5e12, "TPU v3": 61.5e12, "TPU v4": 275e12,
    "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12,
    "NVIDIA H100 PCIe": 756e12, "NVIDIA H100 NVL": 835e12, "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12, "NVIDIA A100": 312e12, "NVIDIA L4": 121e12,
}


def measure_matmul_flops(n: int = 2048, repeats: int = 5, dtype=jnp.float32) -> float:
    """FLOP/s of an n x n matmul on the default device, measured now (best of repeats).

    On CPU this is the 'peak' MFU is reported against: what this machine's BLAS really does."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        f(a).block_until_ready()
        times.append(time.perf_counter() - start)
    # The fastest run: a peak is what the hardware can do, and on a shared machine the slower
    # runs measure the neighbours (a median here once gave MFU > 100%).
    return 2 * n ** 3 / min(times)


def peak_flops_per_device() -> tuple[float, str]:
    """(peak FLOP/s of one device, where the number came from)."""
    device = jax.devices()[0]
    kind = getattr(device, "device_kind", "")
    for name, flops in PEAK_FLOPS.items():
        if kind.startswith(name):
            return flops, f"{kind} datasheet (bf16)"
    if device.platform == "cpu":
        return measure_matmul_flops(), f"measured f32 matmul on {kind or 'cpu'}"
    # An accelerator missing from the table: a small f32 matmul would measure launch overhead and
    # inflate MFU many times over, so measure a large bf16 one and say that it is a stand-in.
    log.warning("no datasheet peak for device kind %r: MFU is against a measured 8192² bf16 "
                "matmul; add the chip to jaxlm.train.metrics.PEAK_FLOPS", kind)
    return (measure_matmul_flops(8192, dtype=jnp.bfloat16),
            f"measured bf16 matmul on {kind or device.platform} (no datasheet entry)")


def attention_keys_per_query(seq_len: int, window: int | None) -> float:
    """Mean keys a query attends to under a causal (and sliding-window) mask: causal ≈ T/2."""
    w = window or seq_len
    return sum(min(i + 1, w) for i in range(seq_len)) / seq_len


def matmul_params(cfg: ModelConfig) -> int:
    """Parameters a token multiplies with: active parameters (MoE: the routed experts only) less
    the embedding table, a gather, unless it doubles as the tied output head."""
    active = cfg.active_param_count() if hasattr(cfg, "active_param_count") else cfg.param_count()
    return active - (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model)


def forward_flops(cfg: ModelConfig, tokens: int, keys_per_token: float,
                  head_tokens: int | None = None) -> float:
    """Model FLOPs of a forward pass over `tokens` tokens that attend to `keys_per_token` keys
    each on average: 2 per matmul parameter, plus 4·L·N_heads·H per key (scores and values),
    with the output head counted for `head_tokens` of them only (default: all; prefill and
    generation compute logits for a row's last token alone)."""
    head = 2 * cfg.vocab_size * cfg.d_model
    per_token = 2 * matmul_params(cfg) - head + 4 * cfg.n_layers * cfg.n_heads * cfg.head_dim * keys_per_token
    return tokens * per_token + head * (tokens if head_tokens is None else head_tokens)


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """6·N (forward + backward over matmul parameters) + attention scores and values: three
    times the forward FLOPs (the backward computes two products for every forward one), over
    the mean number of keys a query sees (causal halves it)."""
    return 3 * forward_flops(cfg, 1, attention_keys_per_query(seq_len, cfg.sliding_window))


def generate_flops(cfg: ModelConfig, rows: int, prompt_len: int, new_tokens: int) -> float:
    """Model FLOPs of generate(): the prompt's forward with logits for its last token (the first
    new token), then one forward per further new token, attending to every earlier position
    (or the last W)."""
    w = cfg.sliding_window or prompt_len + new_tokens
    prefill = forward_flops(cfg, prompt_len, attention_keys_per_query(prompt_len, w), head_tokens=1)
    decode = sum(forward_flops(cfg, 1, min(p + 1, w))
                 for p in range(prompt_len, prompt_len + new_tokens - 1))
    return rows * (prefill + decode)


class MetricsWriter:
    """One call, three sinks: WORKDIR/metrics.jsonl, TensorBoard events, and the return value for
    the console. Only process 0 writes (multi-host).

    A bucket workdir (gs://) has no append and shows an object only once it is closed, so both
    files are written in a local directory (metrics.jsonl seeded with the bucket's, so a resumed
    run keeps its history) and uploaded every `sync_every_s` seconds and at close.
    """

    def __init__(self, workdir: str | os.PathLike, enabled: bool = True,
                 sync_every_s: float = 60.0):
        self.enabled = enabled
        workdir = as_path(workdir)
        self.path = workdir / "metrics.jsonl"
        self._tb = None
        self._remote = None  # the bucket workdir files are uploaded to, if any
        self.sync_every_s = sync_every_s
        if enabled:
            from tensorboardX import SummaryWriter

            local = workdir
            if is_remote(workdir):
                self._remote = workdir
                local = epath.Path(tempfile.mkdtemp(prefix="jaxlm-metrics-"))
                if self.path.exists():
                    (local / "metrics.jsonl").write_bytes(self.path.read_bytes())
                log.info("metrics.jsonl and TensorBoard events are written in %s and uploaded to "
                         "%s every %.0f s and at exit", local, workdir, sync_every_s)
            self._local = local
            self._tb = SummaryWriter(str(local / "tensorboard"))
            self._file = open(local / "metrics.jsonl", "a")
            self._synced = time.monotonic()

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
        if self._remote is not None and time.monotonic() - self._synced >= self.sync_every_s:
            try:
                self.sync()
            except Exception as e:  # noqa: BLE001  a storage hiccup must not stop training
                log.warning("uploading metrics to %s failed (%s); retrying later", self._remote, e)
                self._synced = time.monotonic()

    def sync(self) -> None:
        """Upload metrics.jsonl and the event files to the bucket workdir (no-op when local)."""
        if not self.enabled or self._remote is None:
            return
        self._file.flush()
        self._tb.flush()
        self._upload()

    def _upload(self) -> None:
        (self._local / "metrics.jsonl").copy(self.path, overwrite=True)
        events = self._local / "tensorboard"
        if events.is_dir():
            (self._remote / "tensorboard").mkdir(parents=True, exist_ok=True)
            for f in events.iterdir():
                f.copy(self._remote / "tensorboard" / f.name, overwrite=True)
        self._synced = time.monotonic()

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            self._tb.close()
            if self._remote is not None:
                try:
                    self._upload()
                except Exception as e:  # noqa: BLE001  keep the local copy, say where it is
                    log.warning("uploading metrics to %s failed (%s); they are in %s",
                                self._remote, e, self._local)
                    return
                shutil.rmtree(self._local, ignore_errors=True)


def read_metrics(path: str | os.PathLike) -> list[dict]:
    return [json.loads(line) for line in as_path(path).read_text().splitlines() if line.strip()]


def plot_loss(metrics_path: str | os.PathLike, out_png: str | os.PathLike,
              reference: float | None = None, reference_label: str = "") -> epath.Path:
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
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    plt.close(fig)
    out_png = as_path(out_png)  # local or in a bucket
    out_png.write_bytes(png.getvalue())
    return out_png
