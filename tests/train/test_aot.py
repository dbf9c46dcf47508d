"""AOT compile check (jaxlm.train.aot, experiments/aot_check.py) on the 8 emulated CPU devices.

The real use is a TPU slice described by libtpu (docs/tpu_scaling.md); here the same code path
compiles the tiny presets' sharded train step and checks what it reports.
"""
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxlm.train import aot

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "experiments"))
import aot_check  # noqa: E402


def _config(preset: str, **mesh):
    c = aot_check.load_pretrain_configs().get_config(preset)
    c.mesh.update(mesh)
    return c


@pytest.fixture(scope="module")
def moe_compiled():
    # test_moe on data x fsdp x expert x tensor = 1 x 2 x 2 x 2: every mesh axis in play.
    return aot.compile_train_step(_config("test_moe", fsdp=2, expert=2, tensor=2), jax.devices(),
                                  hbm_bytes=1 * aot.GiB, return_compiled=True)


def test_compiles_and_fits(moe_compiled):
    report, compiled = moe_compiled
    assert report.compiled and compiled is not None, report.message
    assert report.mesh == {"data": 1, "fsdp": 2, "expert": 2, "tensor": 2}
    m = report.memory
    assert m["argument"] > 0 and report.bytes_per_device == (
        m["argument"] + m["output"] - m["alias"] + m["temp"] + m["code"])
    assert m["alias"] > 0  # the state is donated: outputs reuse its buffers
    assert report.fits is True and report.message.startswith("fits:")
    assert report.model_flops_per_step > 0 and report.flops_per_device > 0


def test_compiled_shardings_follow_the_table(moe_compiled):
    report, compiled = moe_compiled
    assert report.sharding_mismatches == []
    state_in, batch_in = compiled.input_shardings[0]
    mesh = state_in.params["layers"]["moe"]["up"].mesh
    # Spot checks against the table: experts over `expert`, embed over `fsdp` (and `expert` for
    # non-expert weights), mlp over `tensor`.
    assert state_in.params["layers"]["moe"]["up"].is_equivalent_to(
        NamedSharding(mesh, P(None, "expert", "fsdp", "tensor")), 4)
    assert state_in.params["embed"]["embedding"].is_equivalent_to(
        NamedSharding(mesh, P("tensor", ("fsdp", "expert"))), 2)
    # Adam's moments are sharded like their parameters, not replicated (8 bytes per parameter).
    mu = state_in.opt_state[1][0].mu
    assert mu["layers"]["moe"]["up"].is_equivalent_to(state_in.params["layers"]["moe"]["up"], 4)
    # The batch's rows split over every batch axis (data, fsdp, expert).
    assert batch_in["inputs"].is_equivalent_to(
        NamedSharding(mesh, P(("fsdp", "expert"), None)), 2)


def test_too_small_budget_is_reported(moe_compiled):
    report, _ = moe_compiled
    needed = report.bytes_per_device
    try:
        assert report.check_budget(needed // 2, "lower the micro-batch") is False
        assert report.fits is False
        assert report.message.startswith("does not fit: needs ")
        assert "GiB per device but the budget is" in report.message
        assert report.message.endswith("lower the micro-batch")
        assert report.check_budget(None) is None and report.message.startswith("compiles; needs")
    finally:
        report.check_budget(1 * aot.GiB)


def test_topology_table():
    t = aot.get_topology("v5p-64")
    assert (t.chips, t.topology_name, t.hbm_bytes) == (32, "v5:2x4x4", 95 * aot.GiB)
    assert aot.get_topology("v5e-16").chips == 16 and aot.get_topology("v4-32").chips == 16
    with pytest.raises(ValueError, match="unknown TPU topology 'v9-8'"):
        aot.get_topology("v9-8")
    assert aot_check._chips_from_name("v4-128") == 64


@pytest.mark.parametrize("args, message", [
    (["--preset", "llama3_8b", "--emulate", "8"], "--preset: unknown preset 'llama3_8b'"),
    (["--preset", "test", "--emulate", "8", "--mesh", "fsdp=3,tensor=2"],
     "multiply to 6 but there are 8 devices"),
    (["--preset", "test", "--emulate", "8", "--mesh", "pipeline=2"], "--mesh: 'pipeline=2'"),
    (["--preset", "test", "--topology", "v9-8"], "unknown TPU topology 'v9-8'"),
    (["--preset", "test", "--topology", "v9-8", "--emulate"], "--topology: 'v9-8' is not a TPU"),
    (["--preset", "test"], "give --topology"),
    (["--preset", "test", "--emulate", "8", "--global_batch_tokens", "100"],
     "--global_batch_tokens / --seq_len / --micro_batch: global_batch_tokens=100 is not a multiple"),
    (["--preset", "test", "--emulate", "8", "--mesh", "fsdp=4,tensor=2", "--micro_batch", "3"],
     "not a multiple of micro_batch_per_device x batch_shards (mesh data x fsdp x expert) = 3 x 4"),
])
def test_cli_bad_input_is_one_line(args, message, capsys):
    # In-process: every one of these is rejected before anything compiles.
    assert aot_check.run(args) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("aot_check: error:")]
    assert len(errors) == 1 and message in errors[0], err


def test_cli_help():
    r = subprocess.run([sys.executable, str(ROOT / "experiments" / "aot_check.py"), "--help"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--topology" in r.stdout and "--emulate" in r.stdout
