"""`python -m jaxlm.data build | show | bench`: output, --help, and one-line errors (exit 2)."""
import json

import pytest

from jaxlm.data.__main__ import main


@pytest.mark.parametrize("command", ["build", "show", "bench"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert f"usage: python -m jaxlm.data {command}" in capsys.readouterr().out


def test_build_prints_the_summary_and_show_prints_segments(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("alpha document\n")
    (tmp_path / "b.txt").write_text("beta document, a little longer\n")
    (tmp_path / "c.txt").write_bytes(b"")
    args = ["--data_dir", str(tmp_path / "tfds")]
    assert main(["build", "--input", str(tmp_path / "*.txt")] + args) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("built local_text/file_") and "1 empty skipped" in out[0]
    assert main(["show", "--source", f"local:{tmp_path}/*.txt", "--seq_len", "12",
                 "--batch", "2"] + args) == 0
    out = capsys.readouterr().out
    assert "row 0: 12 tokens" in out and "seg 1: positions 0..11, BOS .. continues" in out


def test_bench_runs_on_synthetic_data(capsys):
    assert main(["bench", "--source", "synthetic", "--tokenizer", "bytes", "--workers", "0",
                 "--batches", "2", "--repeats", "1", "--seq_len", "16", "--batch", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[2] == "| workers | read threads | tokens/s | first batch (s) |"
    assert json.loads(out[-1])["rows"][0]["tokens_per_s"] > 0


@pytest.mark.parametrize("argv,match", [
    (["build", "--input", "/nonexistent/*.txt"], "no files match"),
    (["build", "--input", "stdlib", "--eval_fraction", "2"], "eval_fraction=2.0"),
    (["show", "--source", "tfds:lm1b"], "is not prepared in"),
    (["show", "--source", "nope"], "data source='nope'"),
    (["show", "--tokenizer", "/nonexistent.model", "--source", "synthetic"], "not found"),
    (["bench", "--tokenizer", "bytes", "--workers", "x"], "--workers 'x'"),
])
def test_bad_input_is_one_error_line_and_exit_2(argv, match, capsys, tmp_path):
    assert main(argv + ["--data_dir", str(tmp_path)] if argv[0] != "bench" else argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and match in err[0], err
