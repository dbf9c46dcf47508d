"""Pipeline throughput: packed tokens per second for several worker counts (median of repeats).

Not a test: timings belong in benchmarks. The first batch of each run is not timed (it holds the
one-time start: opening the source, loading the tokenizer, starting worker processes); the
report shows it separately.
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any, Sequence

from jaxlm.data.pipeline import DataConfig, make_pretrain_iterator


def time_pipeline(cfg: DataConfig, tokenizer: Any, batches: int) -> tuple[float, float]:
    """(seconds to the first batch, tokens/s over the next `batches` batches) of one run."""
    start = time.perf_counter()
    it = make_pretrain_iterator(cfg, tokenizer, process_index=0, process_count=1)
    try:
        next(it)
        first = time.perf_counter() - start
        start, tokens = time.perf_counter(), 0
        for _ in range(batches):
            tokens += int(next(it)["loss_mask"].sum())
        return first, tokens / (time.perf_counter() - start)
    finally:
        it.close()


def bench(cfg: DataConfig, tokenizer: Any, workers: Sequence[int], batches: int = 50,
          repeats: int = 3) -> list[dict]:
    """One row per worker count: median tokens/s (and first-batch seconds) of `repeats` runs."""
    rows = []
    for w in workers:
        runs = [time_pipeline(dataclasses.replace(cfg, worker_count=w), tokenizer, batches)
                for _ in range(repeats)]
        rows.append({"workers": w, "read_threads": cfg.read_threads,
                     "tokens_per_s": round(statistics.median(r[1] for r in runs)),
                     "runs_tokens_per_s": [round(r[1]) for r in runs],
                     "first_batch_s": round(statistics.median(r[0] for r in runs), 2)})
    return rows


def bench_table(cfg: DataConfig, rows: list[dict], batches: int) -> str:
    """Markdown table of bench() rows."""
    lines = [f"pipeline throughput: source {cfg.source}, seq_len {cfg.seq_len}, batch "
             f"{cfg.batch_size}, {batches} timed batches, median of {len(rows[0]['runs_tokens_per_s'])}",
             "", "| workers | read threads | tokens/s | first batch (s) |", "|---:|---:|---:|---:|"]
    lines += [f"| {r['workers']} | {r['read_threads']} | {r['tokens_per_s']:,} | "
              f"{r['first_batch_s']} |" for r in rows]
    return "\n".join(lines)
