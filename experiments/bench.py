"""Benchmarks on the shared bench config (experiments/configs/bench.json), optionally side by side
with Hugging Face transformers on PyTorch in the same process.

    python experiments/bench.py train decode prefill moe data --vs hf --json bench/results.json --plot bench/results.png
    python experiments/bench.py decode --batches 1 --new_tokens 64 --repeats 3
    python experiments/bench.py train --profile /tmp/prof --xla_dump /tmp/hlo   # where the time goes

Sub-benchmarks:
  train    one optimizer step (the trainer's jitted step: AdamW 0.9/0.95/1e-5, wd 0.1, clip 1.0)
           vs transformers forward/backward + torch.optim.AdamW with the same hyperparameters
  decode   greedy generation at each --batches vs transformers' generate
  prefill  one long prompt (chunked by the sliding window) vs one transformers forward; both
           compute the logits of the last position only (logits_to_keep=1), as generation does
  moe      one MoE FFN layer fwd+bwd: dense SwiGLU of equal active FLOPs, capacity, dropless, an
           expert-count sweep; vs transformers' MixtralSparseMoeBlock
  data     packed batches from the embedded corpus vs the transformers recipe (fast tokenizer +
           run_clm.py's concatenate-and-chunk)
Each number is the median of --repeats timed runs after one untimed warm-up (compilation; with
freed host memory kept, up to 3 more while the heap still grows). With --vs hf, train, decode and
prefill alternate jaxlm and transformers call by call, and their ratio is the median of the
pairs' ratios (two neighbouring calls see the same phase of a drifting machine).
MFU divides model FLOPs (jaxlm.train.metrics: 6·N per trained token, 2·N per token a forward
pass processes, the output head only where logits are computed, plus attention over the keys
each query sees; decode counts its prefill) by the time and by a peak measured in this process
(large f32 matmul, at the start and again at the end, the better one kept; the device table on
TPU/GPU).
Output: a Markdown table, --json (one object per row: tokens_per_s, hf_tokens_per_s, ratio, mfu;
train / decode / prefill also every timed run, times_s / hf_times_s, and transformers' MFU,
hf_mfu; MoE rows vs_dense, the time ratio to the dense layer) and --plot (bar chart PNG). With alternating pairs
the ratio is the median of the pairs' ratios, so it can differ a little from the quotient of
the two tokens/s columns.
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
sys.path.insert(0, os.path.dirname(__file__))

BENCH_JSON = Path(__file__).resolve().parent / "configs" / "bench.json"
if __name__ == "__main__":
    # moe_bench does `import bench`: let it find this module, not load a second copy whose
    # HOST / PROFILE settings main() never sets (no heap settling, no --profile traces).
    sys.modules.setdefault("bench", sys.modules[__name__])


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a bad value is one `error:` line, before anything runs)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def positive_ints(text: str) -> tuple[int, ...]:
    """argparse type: comma-separated positive integers, e.g. 1,16."""
    return tuple(positive_int(part) for part in text.split(","))


def parse_args(argv=None):
    from jaxlm.config import PRESETS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("benchmarks", nargs="+", choices=sorted(BENCHMARKS), help="what to run")
    p.add_argument("--vs", choices=["none", "hf"], default="none", help="also time transformers")
    p.add_argument("--preset", default="bench", choices=sorted(PRESETS), metavar="PRESET",
                   help="model preset (default: bench, the shared bench config; `test` for a smoke run)")
    p.add_argument("--repeats", type=positive_int, default=5,
                   help="timed repetitions (the median is reported, every run kept in --json)")
    p.add_argument("--batches", type=positive_ints, default=None,
                   help="decode batch sizes, e.g. 1,16 (default: bench.json)")
    p.add_argument("--new_tokens", type=positive_int, default=None, help="decode length (default: bench.json)")
    p.add_argument("--prompt_len", type=positive_int, default=None,
                   help="decode prompt length (default: bench.json)")
    p.add_argument("--prefill_len", type=positive_int, default=1024,
                   help="prompt length of the prefill benchmark")
    p.add_argument("--train_batch", type=positive_int, default=None,
                   help="train rows, also the MoE layer's (default: bench.json)")
    p.add_argument("--train_seq_len", type=positive_int, default=None,
                   help="train sequence length (default: bench.json)")
    p.add_argument("--remat", choices=["none", "full", "dots"], default=None,
                   help="train with this remat policy (default: the preset's)")
    p.add_argument("--moe_seq_len", type=positive_int, default=256, help="sequence length of the moe benchmark")
    p.add_argument("--moe_experts", type=positive_ints, default=(4, 8, 16),
                   help="expert counts of the moe sweep (default 4,8,16; bench.json's count is always in)")
    p.add_argument("--data_batches", type=positive_int, default=200,
                   help="timed batches of the data benchmark (200 x 8 x 512 = 0.8M tokens)")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="after timing, trace one more jaxlm run of train, decode (each batch size), "
                        "prefill and the dropless MoE layer with jax.profiler into DIR/NAME (open "
                        "with TensorBoard's profile plugin or Perfetto)")
    p.add_argument("--xla_dump", default=None, metavar="DIR",
                   help="dump optimized HLO of every compiled program into DIR (XLA_FLAGS=--xla_dump_to)")
    p.add_argument("--xla_flags", default="",
                   help="extra XLA flags for this run, e.g. --xla_cpu_experimental_onednn_fusion_type="
                        "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT")
    p.add_argument("--json", default=None, help="write results to this JSON file")
    p.add_argument("--plot", default=None, help="write a bar chart PNG of tokens/s")
    args = p.parse_args(argv)
    top_k = json.loads(BENCH_JSON.read_text())["moe"]["top_k"]
    if "moe" in args.benchmarks and min(args.moe_experts) < top_k:
        p.error(f"--moe_experts: every expert count must be >= top_k = {top_k} (bench.json), "
                f"got {min(args.moe_experts)}")
    return args


PROFILE: dict = {"dir": None}  # --profile DIR: median_time / race(..., trace=NAME) trace into DIR/NAME
HOST = {"memory_kept": False}   # set by main: jaxlm.hostmem's settings are in force
SETTLE_CALLS = 3                # extra warm-up calls at most while the kept heap still grows


class Seconds(float):
    """A median time in seconds that also carries every timed run (`.runs`), for the JSON: one
    slow repetition (a heap growing, a noisy neighbour) shows there instead of hiding."""

    runs: tuple[float, ...] = ()


def _page_faults() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _warm_up(*fns) -> None:
    """One untimed call of each (compilation, caches); with freed host memory kept, up to
    SETTLE_CALLS more rounds of them, in the order they will be timed, while the heap still grows."""
    for fn in fns:
        fn()
    if HOST["memory_kept"]:
        # With freed memory kept the heap still grows over the first calls, each growth a burst
        # of first-touch page faults (2-3 s on a train step): warm-up too. Call again, a few
        # times at most, until a round takes (almost) none. Alternating calls (race) share one
        # heap, so they settle together.
        for _ in range(SETTLE_CALLS):
            before = _page_faults()
            for fn in fns:
                fn()
            if _page_faults() - before < 1000:
                break


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _trace(fn, trace: str | None) -> None:
    """With --profile and a `trace` name: one more call traced with jax.profiler into
    PROFILE["dir"]/trace."""
    if PROFILE["dir"] and trace:
        import jax

        with jax.profiler.trace(os.path.join(PROFILE["dir"], trace)):
            fn()


def _seconds(times: list[float]) -> Seconds:
    median = Seconds(statistics.median(times))
    median.runs = tuple(times)
    return median


def median_time(fn, repeats: int, trace: str | None = None) -> Seconds:
    """Median of `repeats` timed calls of fn after the warm-up; with --profile and a `trace` name,
    one more call traced with jax.profiler into PROFILE["dir"]/trace."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    _warm_up(fn)
    times = [_timed(fn) for _ in range(repeats)]
    _trace(fn, trace)
    return _seconds(times)


def race(ours, theirs, repeats: int, trace: str | None = None) -> tuple[Seconds, Seconds, float]:
    """Time jaxlm (`ours`) and transformers (`theirs`) alternately, `repeats` pairs after both
    warm-ups: (our median, their median, the median of the pairs' ratios their time / our time).
    This machine drifts by 5-10 % over minutes; two calls next to each other see the same phase,
    so each pair's ratio is fairer than medians taken a minute apart. The order within a pair
    alternates (ours-theirs, theirs-ours, ...), so whatever one call leaves behind for the next
    (caches, a busy core) falls on both sides alike."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    _warm_up(ours, theirs)
    pairs = []
    for i in range(repeats):
        if i % 2 == 0:
            pairs.append((_timed(ours), _timed(theirs)))
        else:
            t_theirs = _timed(theirs)
            pairs.append((_timed(ours), t_theirs))
    _trace(ours, trace)
    ratio = statistics.median(t_theirs / t_ours for t_ours, t_theirs in pairs)
    return _seconds([p[0] for p in pairs]), _seconds([p[1] for p in pairs]), ratio


def measured_peak_flops() -> tuple[float, str]:
    """(peak FLOP/s MFU is relative to, where it came from): the device table on TPU/GPU, else an
    f32 matmul measured now."""
    from jaxlm.train.metrics import peak_flops_per_device

    return peak_flops_per_device()


class Setup:
    """The bench model in jaxlm and (lazily) the same weights in transformers."""

    def __init__(self, args):
        from jaxlm.config import get_preset

        spec = json.loads(BENCH_JSON.read_text())
        self.spec, self.args = spec, args
        self.cfg = get_preset(args.preset, max_seq_len=4096)
        self._hf = self._ours = None

    def hf(self):
        if self._hf is None:
            import torch
            import transformers

            m = self.cfg
            cfg = transformers.MistralConfig(
                vocab_size=m.vocab_size, hidden_size=m.d_model, num_hidden_layers=m.n_layers,
                num_attention_heads=m.n_heads, num_key_value_heads=m.n_kv_heads,
                head_dim=m.head_dim, intermediate_size=m.ffn_hidden,
                sliding_window=m.sliding_window, rope_theta=m.rope_theta,
                rms_norm_eps=m.norm_eps, tie_word_embeddings=m.tie_embeddings,
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


def _timed_row(setup: Setup, name: str, run_ours, run_hf, *, tokens: int, flops: float,
               peak: float, trace: str) -> dict:
    """A row: jaxlm timed alone (median_time), or with --vs hf alternating with transformers
    (race), the ratio then being the median of the pairs' ratios. Every timed run is kept; MFU
    is `flops` per call over the median time and the peak."""
    if run_hf is not None:
        t, th, ratio = race(run_ours, run_hf, setup.args.repeats, trace=trace)
    else:
        t, th, ratio = median_time(run_ours, setup.args.repeats, trace=trace), None, None
    row = {"benchmark": name, "tokens_per_s": tokens / t, "mfu": flops / t / peak, "times_s": t.runs}
    if th is not None:
        row.update(hf_tokens_per_s=tokens / th, ratio=ratio, hf_mfu=flops / th / peak,
                   hf_times_s=th.runs)
    return row


def bench_decode(setup: Setup, peak: float) -> list[dict]:
    import numpy as np

    from jaxlm.inference.generate import generate
    from jaxlm.train.metrics import generate_flops

    d = setup.spec["decode"]
    prompt_len = setup.args.prompt_len or d["prompt_len"]
    new = setup.args.new_tokens or d["new_tokens"]
    batches = setup.args.batches or d["batches"]
    rows = []
    for b in batches:
        prompts = np.random.default_rng(0).integers(3, setup.cfg.vocab_size, (b, prompt_len))
        ours = setup.ours()

        def run_ours():
            generate(ours, prompts.tolist(), max_new_tokens=new)

        run_hf = None
        if setup.args.vs == "hf":
            import torch

            ids = torch.tensor(prompts)

            def run_hf():
                with torch.no_grad():
                    setup.hf().generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                        min_new_tokens=new, do_sample=False, pad_token_id=0)
        rows.append(_timed_row(setup, f"decode b={b}", run_ours, run_hf, tokens=b * new,
                               flops=generate_flops(setup.cfg, b, prompt_len, new),  # + prefill
                               peak=peak, trace=f"decode_b{b}"))
    return rows


def bench_prefill(setup: Setup, peak: float) -> list[dict]:
    import numpy as np

    from jaxlm.inference.generate import generate
    from jaxlm.train.metrics import generate_flops

    t_len = setup.args.prefill_len
    prompt = np.random.default_rng(1).integers(3, setup.cfg.vocab_size, (1, t_len))
    ours = setup.ours()

    def run_ours():
        generate(ours, prompt.tolist(), max_new_tokens=1)

    run_hf = None
    if setup.args.vs == "hf":
        import torch

        ids = torch.tensor(prompt)

        def run_hf():  # logits for the last position only, as generate() computes
            with torch.no_grad():
                setup.hf()(ids, use_cache=True, logits_to_keep=1)
    return [_timed_row(setup, f"prefill T={t_len}", run_ours, run_hf, tokens=t_len,
                       flops=generate_flops(setup.cfg, 1, t_len, 1), peak=peak, trace="prefill")]


def train_batch(vocab: int, rows: int, seq_len: int, seed: int = 2) -> dict:
    """A packed-looking batch of random tokens: one document per row, every target trained."""
    import numpy as np

    tokens = np.random.default_rng(seed).integers(3, vocab, (rows, seq_len + 1)).astype(np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
            "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (rows, seq_len)).copy(),
            "segment_ids": np.ones((rows, seq_len), np.int32),
            "loss_mask": np.ones((rows, seq_len), np.float32)}


def bench_train(setup: Setup, peak: float) -> list[dict]:
    """One optimizer step on batch x seq_len tokens: jaxlm's jitted train step (the trainer's) vs
    transformers forward/backward + torch.optim.AdamW with the same hyperparameters (bench.json)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxlm.train.metrics import train_flops_per_token
    from jaxlm.train.optim import OptimConfig, make_optimizer
    from jaxlm.train.step import init_state, make_train_step

    t = setup.spec["train"]
    rows, seq_len = setup.args.train_batch or t["batch"], setup.args.train_seq_len or t["seq_len"]
    optim = OptimConfig(total_steps=1000, peak_lr=3e-4, warmup_steps=0, b1=0.9, b2=0.95,
                        eps=1e-5, weight_decay=0.1, clip_norm=1.0)
    model = setup.ours()
    if setup.args.remat:
        model = _with_config(model, remat=setup.args.remat)
    graphdef, params = nnx.split(model, nnx.Param)
    tx = make_optimizer(optim, params)
    # Copies: the step donates its state, and later benchmarks reuse the model's own buffers.
    state = init_state(jax.tree.map(jnp.copy, nnx.to_pure_dict(params)), tx)
    step = jax.jit(make_train_step(graphdef, tx), donate_argnums=0)
    batch = jax.device_put(train_batch(setup.cfg.vocab_size, rows, seq_len))
    holder = [state]

    def run_ours():
        holder[0], metrics = step(holder[0], batch)
        jax.block_until_ready(metrics["loss"])

    run_hf = None
    if setup.args.vs == "hf":
        import torch

        import copy

        hf_model = copy.deepcopy(setup.hf()).train()  # trained here; later benchmarks keep the original
        opt = torch.optim.AdamW(hf_model.parameters(), lr=3e-4, betas=(0.9, 0.95), eps=1e-5,
                                weight_decay=0.1)
        ids = torch.tensor(train_batch(setup.cfg.vocab_size, rows, seq_len)["inputs"], dtype=torch.long)

        def run_hf():
            opt.zero_grad(set_to_none=True)
            loss = hf_model(input_ids=ids, labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(hf_model.parameters(), 1.0)
            opt.step()
    tokens = rows * seq_len
    flops = train_flops_per_token(setup.cfg, seq_len) * tokens
    row = _timed_row(setup, f"train {rows}x{seq_len}", run_ours, run_hf, tokens=tokens,
                     flops=flops, peak=peak, trace="train")
    return [{**row, "step_s": tokens / row["tokens_per_s"]}]


def _with_config(model, **changes):
    """The same weights under a changed ModelConfig (e.g. another remat policy)."""
    from flax import nnx

    from jaxlm.model import Transformer

    graphdef, state = nnx.split(model)
    fresh = nnx.eval_shape(lambda: Transformer(model.cfg.replace(**changes), rngs=nnx.Rngs(0)))
    g2, abstract = nnx.split(fresh)
    nnx.replace_by_pure_dict(abstract, nnx.to_pure_dict(state))
    return nnx.merge(g2, abstract)


def bench_moe(setup: Setup, peak: float) -> list[dict]:
    """One MoE FFN layer (bench.json: E experts, top-k, d_model, ffn) trained on batch x seq_len
    tokens: dense SwiGLU of the same active FLOPs, capacity and dropless dispatch, an expert sweep;
    with --vs hf, transformers' MixtralSparseMoeBlock of the same shape (forward + backward).
    Every backward computes the input gradient as well as the weights' (see moe_bench)."""
    from moe_bench import bench_moe as moe_rows

    m, t = setup.spec["moe"], setup.spec["train"]
    rows_, seq_len = setup.args.train_batch or t["batch"], setup.args.moe_seq_len
    rows = moe_rows(d_model=setup.cfg.d_model, ffn=setup.cfg.ffn_hidden, top_k=m["top_k"],
                    n_experts=m["n_experts"],
                    expert_counts=setup.args.moe_experts, batch=rows_,
                    seq_len=seq_len, repeats=setup.args.repeats, peak_flops=peak)
    if setup.args.vs == "hf":
        import torch
        import transformers

        cfg = transformers.MixtralConfig(hidden_size=setup.cfg.d_model,
                                         intermediate_size=setup.cfg.ffn_hidden,
                                         num_local_experts=m["n_experts"],
                                         num_experts_per_tok=m["top_k"])
        torch.manual_seed(0)
        block = transformers.models.mixtral.modeling_mixtral.MixtralSparseMoeBlock(cfg)
        x = torch.randn(rows_, seq_len, setup.cfg.d_model, requires_grad=True)  # dx too, as jaxlm

        def run_hf():
            block.zero_grad(set_to_none=True)
            x.grad = None
            out = block(x)
            y = out[0] if isinstance(out, tuple) else out
            y.square().mean().backward()
        t_hf = median_time(run_hf, setup.args.repeats)
        for r in rows:
            if r["dispatch"] == "dropless" and r["n_experts"] == m["n_experts"]:
                hf_tps = rows_ * seq_len / t_hf
                r.update(hf_tokens_per_s=hf_tps, ratio=r["tokens_per_s"] / hf_tps)
    for r in rows:
        r["benchmark"] = "moe layer: " + r["benchmark"]
        if r["dispatch"] != "dense":
            r["benchmark"] += f" ({r['vs_dense']:.2f}× dense time)"
    return rows


def bench_data(setup: Setup, peak: float) -> list[dict]:
    """Packed training batches (bench.json batch x seq_len) from the embedded stdlib corpus with
    a 32k BPE: jaxlm's grain pipeline vs the transformers recipe (fast tokenizer over the same
    documents, then run_clm.py's concatenate-and-chunk `group_texts`)."""
    import numpy as np

    from jaxlm.data.bench import time_pipeline
    from jaxlm.data.pipeline import DataConfig
    from jaxlm.tokenizer import Tokenizer

    t = setup.spec["train"]
    tok_path = _bench_tokenizer(setup.cfg.vocab_size)
    tokenizer = Tokenizer(tok_path)
    cfg = DataConfig(source="stdlib", seq_len=t["seq_len"], batch_size=t["batch"], worker_count=0)
    batches = setup.args.data_batches
    runs = [time_pipeline(cfg, tokenizer, batches)[1] for _ in range(setup.args.repeats)]
    ours = sorted(runs)[len(runs) // 2]
    row = {"benchmark": f"data {t['batch']}x{t['seq_len']}", "tokens_per_s": ours, "mfu": None}
    if setup.args.vs == "hf":
        import transformers

        from jaxlm.convert.export import write_tokenizer_files
        from jaxlm.data.stdlib_corpus import stdlib_files

        with tempfile.TemporaryDirectory() as d:
            write_tokenizer_files(tok_path, Path(d), max_len=10**9)
            hf_tok = transformers.AutoTokenizer.from_pretrained(d)
        need = batches * t["batch"] * t["seq_len"]
        texts, chars = [], 0
        for f in stdlib_files():  # about as much text as our timed batches hold (~3.5 chars/token)
            texts.append(f.read_text(errors="replace"))
            chars += len(texts[-1])
            if chars > 4 * need:
                break

        def run_hf():
            ids = hf_tok(texts, add_special_tokens=True)["input_ids"]
            flat = np.fromiter((i for doc in ids for i in doc + [hf_tok.eos_token_id]), np.int32)
            block = t["seq_len"] + 1
            n = len(flat) // block
            rows = flat[: n * block].reshape(n, block)
            run_hf.tokens = n * t["seq_len"]
            return rows
        t_hf = median_time(run_hf, setup.args.repeats)
        row.update(hf_tokens_per_s=run_hf.tokens / t_hf, ratio=ours / (run_hf.tokens / t_hf))
    return [row]


def _bench_tokenizer(vocab: int) -> Path:
    """A vocab-size BPE on the stdlib corpus, trained once and kept in bench/tokenizer_{vocab}."""
    from jaxlm.tokenizer import train_tokenizer

    out = Path(__file__).resolve().parents[1] / "bench" / f"tokenizer_{vocab}"
    if not (out / "tokenizer.model").is_file():
        train_tokenizer("stdlib", out, vocab_size=vocab)
    return out / "tokenizer.model"


BENCHMARKS = {"train": bench_train, "decode": bench_decode, "prefill": bench_prefill,
              "moe": bench_moe, "data": bench_data}


def rescale_mfu(rows: list[dict], old_peak: float, new_peak: float) -> float:
    """Re-express every row's MFU against new_peak (MFU is linear in 1 / peak); returns it."""
    for r in rows:
        for key in ("mfu", "hf_mfu"):
            if r.get(key) is not None:
                r[key] *= old_peak / new_peak
    return new_peak


def markdown(rows: list[dict], peak: float, peak_source: str) -> str:
    lines = [f"peak: {peak / 1e9:,.0f} GFLOP/s ({peak_source})", "",
             "| benchmark | jaxlm tokens/s | MFU | transformers tokens/s | jaxlm / transformers |",
             "|---|---:|---:|---:|---:|"]
    fmt = lambda v, spec, suffix="": "–" if v is None else f"{v:{spec}}{suffix}"
    for r in rows:
        lines.append(f"| {r['benchmark']} | {fmt(r['tokens_per_s'], ',.0f')} | {fmt(r['mfu'], '.1%')} "
                     f"| {fmt(r['hf_tokens_per_s'], ',.0f')} | {fmt(r['ratio'], '.2f', '×')} |")
    return "\n".join(lines)


def _progress_line(r: dict) -> str:
    line = f"{r['benchmark']}: {r['tokens_per_s']:,.0f} tokens/s"
    if r["hf_tokens_per_s"]:
        line += f", transformers {r['hf_tokens_per_s']:,.0f} ({r['ratio']:.2f}x)"
    return line


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["benchmark"].replace("moe layer: ", "") for r in rows]
    fig, ax = plt.subplots(figsize=(1.1 * len(rows) + 3, 4.5))
    x = range(len(rows))
    ours = ax.bar([i - 0.2 for i in x], [r["tokens_per_s"] for r in rows], 0.4, label="jaxlm")
    if any(r["hf_tokens_per_s"] for r in rows):
        ax.bar([i + 0.2 for i in x], [r["hf_tokens_per_s"] or 0 for r in rows], 0.4,
               label="transformers")
    # The ratio over each pair: what the chart is for.
    ax.bar_label(ours, [f"{r['ratio']:.2f}×" if r.get("ratio") else "" for r in rows],
                 fontsize=8, padding=2)
    ax.set_xticks(list(x), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("tokens/s")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("jaxlm vs transformers, bench config")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def matvec_state() -> str:
    """Whether decode at batch 1 runs on jaxlm's CPU matvec kernel: on, off, or not-cpu. A bad
    JAXLM_CPU_MATVEC is one error line (exit 2); building the kernel happens here, not mid-row."""
    import jax

    from jaxlm.kernels import matvec

    try:
        matvec.mode()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if jax.default_backend() != "cpu":
        return "not-cpu"
    return "on" if matvec.available() else "off"


def main(argv=None) -> int:
    from jaxlm.hostmem import keep_freed_memory_for_cli

    # First thing, before JAX is imported (parse_args imports it for the preset names) and starts
    # threads: XLA:CPU's per-call buffers stop page-faulting (jaxlm.hostmem). Process-wide, so
    # transformers in this process gets the same allocator.
    host_malloc = "kept" if keep_freed_memory_for_cli(by_default=True) else "default"
    args = parse_args(argv)
    HOST["memory_kept"] = host_malloc == "kept"
    flags = [args.xla_flags] + ([f"--xla_dump_to={args.xla_dump}"] if args.xla_dump else [])
    os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), *flags]).strip()
    cpu_matvec = matvec_state()  # starts JAX's backend, which reads XLA_FLAGS: after them
    PROFILE["dir"] = args.profile
    setup = Setup(args)
    peak, peak_source = measured_peak_flops()
    rows, start = [], time.perf_counter()
    for i, name in enumerate(args.benchmarks):
        print(f"[{i + 1}/{len(args.benchmarks)}] {name} ...", file=sys.stderr, flush=True)
        for row in BENCHMARKS[name](setup, peak):  # every row carries the four JSON keys
            rows.append({"mfu": None, "hf_tokens_per_s": None, "ratio": None, **row})
            print(f"    {_progress_line(rows[-1])}  ({time.perf_counter() - start:.0f} s)",
                  file=sys.stderr, flush=True)
    if peak_source.startswith("measured"):
        # Measured again after the suite: a machine in a slow phase at start would give a low
        # peak and inflated MFU (one run here measured 173 GFLOP/s, then a layer ran at 191).
        again, _ = measured_peak_flops()
        peaks = (peak, again)
        peak = rescale_mfu(rows, peak, max(peaks))
        peak_source += f", best of {peaks[0] / 1e9:,.0f} at start and {peaks[1] / 1e9:,.0f} at end"
    print(markdown(rows, peak, peak_source))
    print(f"host malloc: freed memory {host_malloc} (jaxlm.hostmem; JAXLM_HOST_MALLOC=0|1)")
    print(f"batch-1 matvec kernel: {cpu_matvec} (jaxlm.kernels.matvec; JAXLM_CPU_MATVEC=0|1)")
    if args.json:
        Path(args.json).write_text(json.dumps({"peak_flops": peak, "peak_source": peak_source,
                                               "host_malloc": host_malloc,
                                               "cpu_matvec": cpu_matvec,
                                               "results": rows}, indent=2) + "\n")
    if args.plot:
        plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
