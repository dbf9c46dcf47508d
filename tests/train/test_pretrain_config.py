"""experiments/configs/pretrain.py: the presets resolve, and the README's override commands run."""
import dataclasses
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from jaxlm.config import Dispatch, ModelConfig, MoEConfig, get_preset

ROOT = Path(__file__).resolve().parents[2]
CONFIG_FILE = ROOT / "experiments" / "configs" / "pretrain.py"
PRESETS = ("tiny", "tiny_moe", "test", "test_moe", "llama2_7b", "llama2_70b", "mistral_7b")


def configs():
    spec = importlib.util.spec_from_file_location("pretrain_configs", CONFIG_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_model_field_can_be_overridden():
    fields = {f.name for f in dataclasses.fields(ModelConfig)} - {"moe"}
    assert set(configs().MODEL_FIELDS) == fields
    assert set(configs().MOE_FIELDS) == {f.name for f in dataclasses.fields(MoEConfig)}


def parse(*argv):
    """The experiment's model config after these command-line flags, as pretrain.py parses them."""
    from absl import flags
    from ml_collections import config_flags

    from jaxlm.train.experiment import preset_overrides

    argv = ["pretrain.py", *argv]
    flag_values = flags.FlagValues()
    # the config flag reads its overrides from sys.argv (or sys_argv) when --config is parsed
    config_flags.DEFINE_config_file("config", flag_values=flag_values, sys_argv=argv)
    flag_values(argv)
    c = flag_values.config.to_dict()
    return get_preset(c["model"]["preset"], **preset_overrides(c, c["train"]["seq_len"]))


def test_moe_fields_and_window_off_from_the_command_line():
    base = get_preset("test_moe")
    model = parse(f"--config={CONFIG_FILE}:test_moe", "--config.model.overrides.moe.n_experts=8",
                  "--config.model.overrides.moe.dispatch=capacity",
                  "--config.model.overrides.moe.router_jitter=0.01")
    assert (model.moe.n_experts, model.moe.dispatch, model.moe.router_jitter) == (8, Dispatch.CAPACITY, 0.01)
    assert model.moe.top_k == base.moe.top_k and model.moe.every == base.moe.every  # the preset's
    # a dense preset becomes a MoE one with n_experts (the other fields: MoEConfig's defaults)
    model = parse(f"--config={CONFIG_FILE}:test", "--config.model.overrides.moe.n_experts=4")
    assert get_preset("test").moe is None and model.moe == MoEConfig(n_experts=4)
    with pytest.raises(ValueError, match=r"preset 'test' is dense; set config.model.overrides.moe.n_experts"):
        parse(f"--config={CONFIG_FILE}:test", "--config.model.overrides.moe.top_k=1")
    # ... and n_experts=0 makes a MoE preset dense (other MoE fields then are an error)
    dense = parse(f"--config={CONFIG_FILE}:test_moe", "--config.model.overrides.moe.n_experts=0")
    assert dense.moe is None and dense.ffn_hidden == base.ffn_hidden
    with pytest.raises(ValueError, match="n_experts=0 makes the model dense"):
        parse(f"--config={CONFIG_FILE}:test_moe", "--config.model.overrides.moe.n_experts=0",
              "--config.model.overrides.moe.top_k=1")
    with pytest.raises(ValueError, match="MoEConfig.dispatch"):
        parse(f"--config={CONFIG_FILE}:test_moe", "--config.model.overrides.moe.dispatch=nope")
    # sliding_window=0 turns a preset's window off; unset keeps it
    swa = (f"--config={CONFIG_FILE}:test", "--config.model.preset=test_swa")
    assert get_preset("test_swa").sliding_window is not None
    assert parse(*swa).sliding_window == get_preset("test_swa").sliding_window
    assert parse(*swa, "--config.model.overrides.sliding_window=0").sliding_window is None
    assert parse(*swa, "--config.model.overrides.sliding_window=4").sliding_window == 4


@pytest.mark.parametrize("preset", PRESETS)
def test_unset_overrides_are_left_out(preset):
    c = configs().get_config(preset)
    overrides = c.to_dict()["model"]["overrides"]
    assert None not in overrides.values() and {} not in overrides.values()
    big = preset.startswith(("llama2", "mistral"))
    assert (overrides.get("dtype"), "remat" in overrides) == (("bfloat16", True) if big else (None, False))


def test_readme_override_command_runs(tmp_path):
    # README §Pretraining: `--config.model.overrides.remat=full` on the tiny preset (it used to be
    # an AttributeError: overrides was an empty, locked ConfigDict). Shrunk to one short step
    # (conftest gives 8 emulated devices: 8 rows of 64 tokens, one each).
    readme = (ROOT / "README.md").read_text()
    assert "--config=experiments/configs/pretrain.py:tiny" in readme
    assert "--config.model.overrides.remat=full" in readme
    cmd = [sys.executable, str(ROOT / "experiments" / "pretrain.py"), f"--workdir={tmp_path}",
           f"--config={CONFIG_FILE}:tiny", "--config.model.overrides.remat=full",
           "--config.model.overrides.n_layers=1", "--config.train.steps=1",
           "--config.train.seq_len=64", "--config.train.global_batch_tokens=512",
           "--config.train.micro_batch_per_device=1",
           "--config.tokenizer.vocab_size=512", "--config.train.eval_batches=1",
           "--config.optim.warmup_steps=0", "--config.train.sample_prompt="]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "done: 1 steps" in run.stdout
    model = json.loads((tmp_path / "config.json").read_text())["model_config"]
    assert model["remat"] == "full" and model["n_layers"] == 1
    assert model["sliding_window"] is None and model["dtype"] == "float32"  # unset: the preset's


def test_micro_batch_rows_land_on_each_device_with_tensor_parallelism(tmp_path):
    """fsdp=4 x tensor=2 on 8 devices: the batch splits 4 ways, so micro_batch_per_device=2 means
    8 rows per pass and 16 rows take 2 accumulation steps (dividing by all 8 devices gave 1
    step, and each chip processed 4 rows per pass)."""
    import jax
    import numpy as np

    from jaxlm.train.experiment import resolve
    from jaxlm.train.trainer import batch_sharding_for

    c = configs().get_config("test")
    c.mesh.update(fsdp=4, tensor=2)
    c.train.update(global_batch_tokens=16 * 32, seq_len=32, micro_batch_per_device=2)
    exp = resolve(c, tmp_path)
    plan = exp.plan
    assert (plan.batch_shards, plan.micro_global_batch, plan.grad_accum_steps) == (4, 8, 2)
    rows = plan.per_host_batch
    sharding = batch_sharding_for(exp.mesh, rows, 32)
    # The train step's micro-batch split (rows r % accum_steps), on the sharded batch.
    batch = jax.device_put(np.arange(rows * 32, dtype=np.int32).reshape(rows, 32), sharding)
    micro = jax.jit(lambda a: a.reshape(-1, plan.grad_accum_steps, 32).swapaxes(0, 1)[0])(batch)
    assert {s.data.shape[0] for s in micro.addressable_shards} == {c.train.micro_batch_per_device}
    assert len(micro.addressable_shards) == 8


@pytest.mark.parametrize("field, value, message", [
    ("checkpoint.every_steps", 0, "config.checkpoint.every_steps must be an integer >= 1"),
    ("checkpoint.keep", 0, "config.checkpoint.keep must be an integer >= 1"),
    ("optim.warmup_steps", 20, r"config.optim.warmup_steps: warmup \(20 steps\) must be shorter "
                               r"than config.train.steps \(20\)"),
    ("optim.warmup_steps", -1, "config.optim.warmup_steps must be >= 0"),
    ("optim.b1", 1.0, r"config.optim.b1 must be in \[0, 1\)"),
    ("optim.b2", 1.5, r"config.optim.b2 must be in \[0, 1\)"),
    ("optim.eps", 0.0, "config.optim.eps must be > 0"),
    ("optim.weight_decay", -0.1, "config.optim.weight_decay must be >= 0"),
    ("train.eval_batches", 0, "config.train.eval_batches must be >= 1"),
])
def test_bad_values_are_one_error_naming_the_field(tmp_path, field, value, message):
    from jaxlm.train.experiment import resolve

    c = configs().get_config("test")  # 20 steps
    group, name = field.split(".")
    c[group][name] = value
    with pytest.raises(ValueError, match=message):
        resolve(c, tmp_path)


def test_unknown_preset_error_lists_every_preset():
    with pytest.raises(ValueError, match="unknown pretrain preset 'llama3'") as e:
        configs().get_config("llama3")
    assert all(p in str(e.value) for p in PRESETS)
