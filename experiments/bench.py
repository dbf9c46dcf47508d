"""Benchmarks on the shared bench config (experiments/configs/bench.json), optionally side by side
with Hugging Face transformers on PyTorch in the same process.

    python experiments/bench.py decode prefill --vs hf --json bench.json --plot bench.png
    python experiments/bench.py decode --batches 1 --new_tokens 64 --repeats 3

Each number is the median of --repeats timed runs after one untimed warm-up (compilation).
MFU divides model FLOPs (2·params per token forward, plus attention) by the time and by a peak
measured in this process (large f32 matmul).
Sub-benchmarks: decode (greedy generation at each --batches), prefill (one long prompt).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

BENCH_JSON = Path(__file__).resolve().parent / "configs" / "bench.json"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("benchmarks", nargs="+", choices=sorted(BENCHMARKS), help="what to run")
    p.add_argument("--vs", choices=["none", "hf"], default="none", help="also time transformers")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions (median reported)")
    p.add_argument("--batches", default=None, help="decode batch sizes, e.g. 1,16 (default: bench.json)")
    p.add_argument("--new_tokens", type=int, default=None, help="decode length (default: bench.json)")
    p.add_argument("--prompt_len", type=int, default=None, help="decode prompt length (default: bench.json)")
    p.add_argument("--prefill_len", type=int, default=1024, help="prompt length of the prefill benchmark")
    p.add_argument("--json", default=None, help="write results to this JSON file")
    p.add_argument("--plot", default=None, help="write a bar chart PNG of tokens/s")
    return p.parse_args(argv)


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up: compilation and caches, never timed
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measured_peak_flops() -> float:
    """f32 matmul FLOP/s on this machine, measured now (the CPU 'peak' MFU is relative to)."""
    from jaxlm.train.metrics import measure_matmul_flops

    return measure_matmul_flops()


class Setup:
    """The bench model in jaxlm and (lazily) the same weights in transformers."""

    def __init__(self, args):
        from jaxlm.config import get_preset

        spec = json.loads(BENCH_JSON.read_text())
        self.spec, self.args = spec, args
        self.cfg = get_preset("bench", max_seq_len=4096)
        self._hf = self._ours = None

    def hf(self):
        if self._hf is None:
            import torch
            import transformers

            m = self.spec["model"]
            cfg = transformers.MistralConfig(
                vocab_size=m["vocab_size"], hidden_size=m["d_model"], num_hidden_layers=m["n_layers"],
                num_attention_heads=m["n_heads"], num_key_value_heads=m["n_kv_heads"],
                head_dim=m["head_dim"], intermediate_size=m["ffn_hidden"],
                sliding_window=m["sliding_window"], rope_theta=m["rope_theta"],
                rms_norm_eps=m["norm_eps"], tie_word_embeddings=m["tie_embeddings"],
                max_position_embeddings=4096)
            torch.manual_seed(0)
            self._hf = transformers.MistralForCausalLM(cfg).eval()
        return self._hf

    def ours(self):
        if self._ours is None:
            if self.args.vs == "hf":  # same weights: import the HF model we race against
                from jaxlm.convert import hf

                with tempfile.TemporaryDirectory() as d:
                    self.hf().save_pretrained(d)
                    self._ours = hf.load(d, max_seq_len=4096)
            else:
                from flax import nnx

                from jaxlm.model import Transformer

                self._ours = Transformer(self.cfg, rngs=nnx.Rngs(0))
        return self._ours


def forward_flops(cfg, tokens: int, context: int, head_tokens: int | None = None) -> float:
    """Forward FLOPs: 2·(non-embedding params) per token + attention (QK and PV), with the output
    head counted for `head_tokens` only (prefill computes logits for the last token alone)."""
    head = cfg.vocab_size * cfg.d_model
    n = cfg.param_count() - head - (0 if cfg.tie_embeddings else head)
    attn = 4 * cfg.n_layers * cfg.n_heads * cfg.head_dim * min(context, cfg.sliding_window or context)
    return tokens * (2 * n + attn) + 2 * head * (tokens if head_tokens is None else head_tokens)


def bench_decode(setup: Setup, peak: float) -> list[dict]:
    import numpy as np
    import torch

    from jaxlm.inference.generate import generate

    d = setup.spec["decode"]
    prompt_len = setup.args.prompt_len or d["prompt_len"]
    new = setup.args.new_tokens or d["new_tokens"]
    batches = [int(b) for b in (setup.args.batches or ",".join(map(str, d["batches"]))).split(",")]
    rows = []
    for b in batches:
        prompts = np.random.default_rng(0).integers(3, setup.cfg.vocab_size, (b, prompt_len))
        ours = setup.ours()
        t = median_time(lambda: generate(ours, prompts.tolist(), max_new_tokens=new), setup.args.repeats)
        row = {"benchmark": f"decode b={b}", "tokens_per_s": b * new / t}
        row["mfu"] = forward_flops(setup.cfg, b * new, prompt_len + new // 2) / t / peak
        if setup.args.vs == "hf":
            ids = torch.tensor(prompts)

            def run_hf():
                with torch.no_grad():
                    setup.hf().generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                        min_new_tokens=new, do_sample=False, pad_token_id=0)
            th = median_time(run_hf, setup.args.repeats)
            row.update(hf_tokens_per_s=b * new / th, ratio=th / t)
        rows.append(row)
    return rows


def bench_prefill(setup: Setup, peak: float) -> list[dict]:
    import numpy as np
    import torch

    from jaxlm.inference.generate import generate

    t_len = setup.args.prefill_len
    prompt = np.random.default_rng(1).integers(3, setup.cfg.vocab_size, (1, t_len))
    ours = setup.ours()
    t = median_time(lambda: generate(ours, prompt.tolist(), max_new_tokens=1), setup.args.repeats)
    row = {"benchmark": f"prefill T={t_len}", "tokens_per_s": t_len / t,
           "mfu": forward_flops(setup.cfg, t_len, t_len // 2, head_tokens=1) / t / peak}
    if setup.args.vs == "hf":
        ids = torch.tensor(prompt)

        def run_hf():
            with torch.no_grad():
                setup.hf()(ids, use_cache=True)
        th = median_time(run_hf, setup.args.repeats)
        row.update(hf_tokens_per_s=t_len / th, ratio=th / t)
    return [row]


BENCHMARKS = {"decode": bench_decode, "prefill": bench_prefill}


def markdown(rows: list[dict], peak: float) -> str:
    lines = [f"measured peak: {peak / 1e9:.0f} GFLOP/s (f32 matmul)", "",
             "| benchmark | jaxlm tokens/s | MFU | transformers tokens/s | jaxlm / transformers |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        hf_s = f"{r['hf_tokens_per_s']:,.0f}" if "hf_tokens_per_s" in r else "–"
        ratio = f"{r['ratio']:.2f}×" if "ratio" in r else "–"
        lines.append(f"| {r['benchmark']} | {r['tokens_per_s']:,.0f} | {r['mfu']:.1%} | {hf_s} | {ratio} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["benchmark"] for r in rows]
    fig, ax = plt.subplots(figsize=(1.8 * len(rows) + 2, 3.5))
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["tokens_per_s"] for r in rows], 0.4, label="jaxlm")
    if any("hf_tokens_per_s" in r for r in rows):
        ax.bar([i + 0.2 for i in x], [r.get("hf_tokens_per_s", 0) for r in rows], 0.4,
               label="transformers")
    ax.set_xticks(list(x), names)
    ax.set_ylabel("tokens/s")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("jaxlm vs transformers, bench config")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    args = parse_args(argv)
    setup = Setup(args)
    peak = measured_peak_flops()
    rows = []
    for name in args.benchmarks:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        rows += BENCHMARKS[name](setup, peak)
    print(markdown(rows, peak))
    if args.json:
        Path(args.json).write_text(json.dumps({"peak_flops": peak, "results": rows}, indent=2) + "\n")
    if args.plot:
        plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
