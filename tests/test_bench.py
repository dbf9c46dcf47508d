"""experiments/bench.py end to end on the `test` preset: every row carries tokens/s, MFU and the
transformers ratio, the JSON / PNG outputs are written; `race` alternates the two sides and takes the
median of the pairs' ratios."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jaxlm.hostmem import is_glibc

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # ~1 min cold: compiles five benchmarks; `make test-slow`
def test_bench_smoke_against_transformers(tmp_path):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    cmd = [sys.executable, f"{ROOT}/experiments/bench.py", "train", "decode", "prefill", "moe",
           "--vs", "hf", "--preset", "test", "--repeats", "1", "--train_batch", "2",
           "--train_seq_len", "16", "--batches", "1,2", "--new_tokens", "4", "--prompt_len", "8",
           "--prefill_len", "16", "--moe_seq_len", "16", "--moe_experts", "8",
           "--json", str(out), "--plot", str(png)]
    env = {**os.environ, "JAXLM_HOST_MALLOC": "1"}
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["host_malloc"] == ("kept" if is_glibc() else "default")  # jaxlm.hostmem, forced on
    assert result["cpu_matvec"] == "on"  # decode b=1 ran on jaxlm.kernels.matvec
    assert result["peak_source"].startswith("measured f32 matmul") and result["peak_flops"] > 0
    assert "at start and" in result["peak_source"]  # measured again after the suite, the best kept
    rows = result["results"]
    names = [r["benchmark"] for r in rows]
    assert names[:4] == ["train 2x16", "decode b=1", "decode b=2", "prefill T=16"]
    assert any(n.startswith("moe layer: moe dropless E=8") for n in names)
    moe = [r for r in rows if r["benchmark"].startswith("moe layer: moe ")]
    # each MoE row raced the dense layer: its time ratio is in the row and in its name
    assert moe and all(r["vs_dense"] > 0 and f"({r['vs_dense']:.2f}× dense time)" in r["benchmark"]
                       for r in moe)
    for r in rows:
        assert {"tokens_per_s", "hf_tokens_per_s", "ratio", "mfu"} <= set(r), r
        assert r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1.0, r
    for r in rows[:4]:  # every dense benchmark ran against transformers
        # every timed run is kept; with one pair the ratio is that pair's quotient
        assert len(r["times_s"]) == len(r["hf_times_s"]) == 1
        assert abs(r["ratio"] - r["hf_times_s"][0] / r["times_s"][0]) < 1e-6 * r["ratio"]
        assert abs(r["ratio"] - r["tokens_per_s"] / r["hf_tokens_per_s"]) < 1e-6 * r["ratio"]
    assert "| train 2x16 |" in run.stdout and png.stat().st_size > 1000


sys.path.insert(0, str(ROOT / "experiments"))


@pytest.mark.parametrize("argv, message", [
    (["decode", "--batches", "1,x"], "--batches: expected a positive integer, got 'x'"),
    (["decode", "--repeats", "0"], "--repeats: expected a positive integer, got 0"),
    (["train", "--preset", "nope"], "--preset: invalid choice: 'nope'"),
    (["moe", "--moe_experts", "1,8"], "--moe_experts: every expert count must be >= top_k = 2"),
])
def test_bench_bad_input_is_one_error_line(argv, message, capsys):
    import bench

    with pytest.raises(SystemExit) as exit_:
        bench.parse_args(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert ": error: " in err[-1] and message in err[-1], err  # argparse: usage, then one line


@pytest.mark.parametrize("argv, message", [
    (["--experts", "4,a"], "--experts: expected a positive integer, got 'a'"),
    (["--experts", "2,8", "--top_k", "3"], "every expert count must be >= --top_k (3), got 2"),
])
def test_moe_bench_bad_input_is_one_error_line(argv, message, capsys):
    import moe_bench

    with pytest.raises(SystemExit) as exit_:
        moe_bench.main(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]


def test_race_alternates_and_takes_the_median_of_pair_ratios(monkeypatch):
    """race() warms both up, then times pairs in alternating order, and its ratio is the median
    of each pair's quotient, not the quotient of the two medians (they differ here)."""
    import bench

    clock, calls = [0.0], []
    ours_times = iter([9.0, 1.0, 2.0, 4.0])     # first: the warm-up
    theirs_times = iter([9.0, 3.0, 8.0, 4.0])

    def timed(name, times):
        def fn():
            calls.append(name)
            clock[0] += next(times)
        return fn

    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])
    monkeypatch.setitem(bench.HOST, "memory_kept", False)
    t, th, ratio = bench.race(timed("ours", ours_times), timed("theirs", theirs_times), repeats=3)
    # warm-ups, then pairs in alternating order (ABBA...): neither side always runs second
    assert calls == ["ours", "theirs"] + ["ours", "theirs", "theirs", "ours", "ours", "theirs"]
    assert t.runs == (1.0, 2.0, 4.0) and th.runs == (3.0, 8.0, 4.0)
    assert (t, th) == (2.0, 4.0)
    assert ratio == 3.0  # pairs 3/1, 8/2, 4/4 -> median 3; the medians' quotient would be 2
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        bench.race(lambda: None, lambda: None, repeats=0)


def test_mfu_is_rescaled_to_the_better_peak():
    import bench

    rows = [{"mfu": 0.8, "hf_mfu": 0.6}, {"mfu": None}, {"mfu": 0.5}]
    assert bench.rescale_mfu(rows, 100.0, 125.0) == 125.0
    assert rows[1] == {"mfu": None}
    assert [rows[0]["mfu"], rows[0]["hf_mfu"], rows[2]["mfu"]] == pytest.approx([0.64, 0.48, 0.4])


def test_race_warm_up_settles_the_shared_heap_in_pairs(monkeypatch):
    """With freed memory kept, race warms up in (ours, theirs) rounds until a round takes
    (almost) no page faults, at most SETTLE_CALLS more rounds."""
    import bench

    calls, faults = [], iter([0, 50_000, 50_000, 50_500, 50_500, 10**9])
    monkeypatch.setitem(bench.HOST, "memory_kept", True)
    monkeypatch.setattr(bench, "_page_faults", lambda: next(faults))
    bench.race(lambda: calls.append("ours"), lambda: calls.append("theirs"), repeats=1)
    # first round, a growing round (50k faults), a settled one (500), then the timed pair
    assert calls == ["ours", "theirs"] * 4


def test_timed_row_without_transformers_has_no_hf_keys(monkeypatch):
    """--vs none (no run_hf): jaxlm's median alone; the hf columns stay for main() to fill."""
    import types

    import bench

    clock = [0.0]

    def ours():
        clock[0] += 2.0
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])
    monkeypatch.setitem(bench.HOST, "memory_kept", False)
    setup = types.SimpleNamespace(args=types.SimpleNamespace(repeats=3))
    row = bench._timed_row(setup, "decode b=1", ours, None, tokens=10, flops=100.0, peak=200.0,
                           trace="x")
    assert row == {"benchmark": "decode b=1", "tokens_per_s": 5.0, "mfu": 0.25,
                   "times_s": (2.0, 2.0, 2.0)}


def test_bench_bad_matvec_setting_is_one_error_line(monkeypatch, capsys):
    import bench

    monkeypatch.setenv("JAXLM_CPU_MATVEC", "fast")
    with pytest.raises(SystemExit) as exit_:
        bench.matvec_state()
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip() == \
        "error: JAXLM_CPU_MATVEC must be auto, 0 or 1, got 'fast'"
    monkeypatch.setenv("JAXLM_CPU_MATVEC", "0")
    assert bench.matvec_state() == "off"
    monkeypatch.setenv("JAXLM_CPU_MATVEC", "auto")
    assert bench.matvec_state() == "on"


def test_bench_xla_flags_reach_xla(tmp_path):
    """--xla_dump (and --xla_flags) go into XLA_FLAGS before anything starts JAX's backend."""
    dump = tmp_path / "hlo"
    cmd = [sys.executable, f"{ROOT}/experiments/bench.py", "decode", "--preset", "test",
           "--repeats", "1", "--batches", "1", "--new_tokens", "2", "--prompt_len", "4",
           "--xla_dump", str(dump)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert any(dump.glob("*generate*")), sorted(p.name for p in dump.iterdir())[:10]
