"""experiments/model_info.py (what `make demo` runs until the trainer lands)."""
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "model_info.py"


def run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True)


def test_forward_on_test_preset_reports_loss_near_ln_vocab():
    out = run("--preset", "test", "--forward", "--seq_len", "16")
    assert out.returncode == 0, out.stderr
    assert "106,816 parameters" in out.stdout
    loss = float(out.stdout.split("loss ")[1].split()[0])
    assert abs(loss - 5.545) < 0.3  # ln(256) at initialisation


def test_big_preset_counts_without_allocating_and_bad_flags_fail_cleanly():
    out = run("--preset", "llama2_7b")
    assert out.returncode == 0 and "6,738,415,616 parameters" in out.stdout
    bad = run("--preset", "test", "--mesh", "fsdp=x")
    assert bad.returncode == 2 and "is not AXIS=INT" in bad.stderr
    bad = run("--preset", "nope")
    assert bad.returncode == 2 and "unknown model preset 'nope'" in bad.stderr
