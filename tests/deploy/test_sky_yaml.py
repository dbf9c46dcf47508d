"""tpu_scripts/sky/*.yaml: structure (always), their `run` scripts executed against stand-ins,
and, where SkyPilot is installed, SkyPilot's own parser and schema (sky.Task)."""
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SKY = REPO / "tpu_scripts" / "sky"
PRETRAIN, SERVE = SKY / "pretrain.yaml", SKY / "serve_vllm.yaml"


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def one_line(script: str) -> str:
    """The shell text with backslash-newline continuations joined."""
    return script.replace("\\\n", " ")


# structure -----------------------------------------------------------------------------------

def test_pretrain_yaml_structure():
    t = load(PRETRAIN)
    assert set(t) >= {"name", "workdir", "resources", "num_nodes", "envs", "setup", "run"}
    assert t["workdir"] == "." and t["num_nodes"] == 1  # a pod slice is one node of many hosts
    r = t["resources"]
    assert re.fullmatch(r"tpu-v[0-9]+[a-z]*(pod)?-[0-9]+", r["accelerators"])
    assert r["use_spot"] is True and r["accelerator_args"]["runtime_version"]
    rec = r["job_recovery"]
    assert rec["strategy"] in ("FAILOVER", "EAGER_NEXT_REGION") and rec["max_restarts_on_errors"] >= 1
    # The run script's preemption exit code is one that SkyPilot recovers from.
    assert 75 in rec["recover_on_exit_codes"] and "exit 75" in t["run"]

    env = t["envs"]
    assert env["WORKDIR"] is None  # must be given: sky jobs launch ... --env WORKDIR=gs://...
    cfg_file, preset = env["CONFIG"].split(":")
    assert (REPO / cfg_file).is_file()
    assert "bash tpu_scripts/remote/install.sh tpu" in t["setup"]
    assert (REPO / "tpu_scripts" / "remote" / "install.sh").is_file()

    run = one_line(t["run"])
    assert "source tpu_scripts/remote/env.sh" in run
    assert 'python experiments/pretrain.py --workdir "$WORKDIR" --config="$CONFIG"' in run


def test_pretrain_yaml_preset_exists():
    sys.path.insert(0, str(REPO))
    try:
        from experiments.configs.pretrain import get_config
    finally:
        sys.path.remove(str(REPO))
    preset = load(PRETRAIN)["envs"]["CONFIG"].split(":")[1]
    assert get_config(preset).model.preset == preset


def test_serve_yaml_structure():
    t = load(SERVE)
    assert set(t) >= {"name", "resources", "envs", "file_mounts", "setup", "run", "service"}
    assert t["envs"]["MODEL_SRC"] is None
    assert t["file_mounts"] == {"/model": "${MODEL_SRC}"}
    port = int(t["resources"]["ports"])
    run = shlex.split(one_line(t["run"]).split("\n")[1])  # the serve_vllm.sh line
    assert run[:4] == ["bash", "tpu_scripts/serve_vllm.sh", "--model", "/model"]
    assert run[run.index("--port") + 1] == str(port)
    assert "$VLLM_PACKAGE" in t["setup"] and t["envs"]["VLLM_PACKAGE"].startswith("vllm")
    assert t["service"]["readiness_probe"]["path"] == "/v1/models"


def test_serve_yaml_uses_only_flags_serve_vllm_accepts(run_script):
    help_text = run_script("serve_vllm.sh", "--help").stdout
    run = one_line(load(SERVE)["run"])
    for flag in re.findall(r"(?<=\s)--[a-z-]+", run.split("serve_vllm.sh", 1)[1]):
        assert re.search(rf"^\s+{flag}\b", help_text, re.M), flag


# the run scripts, executed -------------------------------------------------------------------

FAKE_TRAINER = r"""#!/usr/bin/env bash
# Stand-in for python: records its argv and the coordinator, then behaves as $FAKE_MODE says.
printf '%s\0' "$@" > "$FAKE_LOG"
echo "coordinator=${JAX_COORDINATOR_ADDRESS:-none}"
case $FAKE_MODE in
    done) echo "done: 10 steps, final loss 2.0" ;;
    preempt) echo "preempted at step 7: checkpoint saved in $3/checkpoints; run the same command to resume" ;;
    crash) echo "Traceback: boom" >&2; exit 3 ;;
    wait) trap 'echo "preempted at step 9: checkpoint saved"; exit 0' TERM
          echo ready; while :; do sleep 0.05; done ;;
esac
"""


def pretrain_run(sandbox, mode, **envs):
    """Start the pretrain.yaml run script the way SkyPilot does (bash, cwd = the workdir)."""
    venv = sandbox.root / "venv"
    (venv / "bin").mkdir(parents=True, exist_ok=True)
    (venv / "bin" / "activate").write_text(
        f'export VIRTUAL_ENV={venv}; export PATH="$VIRTUAL_ENV/bin:$PATH"\n')
    py = venv / "bin" / "python"
    py.write_text(FAKE_TRAINER)
    py.chmod(0o755)
    script = sandbox.root / "run.sh"
    script.write_text(load(PRETRAIN)["run"])
    env = dict(sandbox.env, JAXLM_VENV=str(venv), FAKE_MODE=mode)
    env.update({k: v for k, v in load(PRETRAIN)["envs"].items() if v is not None}, **envs)
    return subprocess.Popen(["bash", str(script)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def trainer_argv(sandbox):
    return sandbox.fake_log.read_bytes().decode().split("\0")[:-1]


def test_pretrain_run_passes_the_env_to_the_trainer(sandbox):
    p = pretrain_run(sandbox, "done", WORKDIR="gs://b/run", DATA_DIR="gs://b/tfds",
                     EXTRA_FLAGS="--config.train.steps=10 --config.train.seq_len=128",
                     FAKE_TPU_ENDPOINTS="w-0:0:10.0.0.2,w-1:1:10.0.0.3")
    out, _ = p.communicate(timeout=30)
    assert p.returncode == 0, out
    assert trainer_argv(sandbox) == [
        "experiments/pretrain.py", "--workdir", "gs://b/run",
        "--config=experiments/configs/pretrain.py:llama2_7b", "--config.data.data_dir=gs://b/tfds",
        "--config.train.steps=10", "--config.train.seq_len=128"]
    assert "coordinator=10.0.0.2:8482" in out


def test_pretrain_run_without_data_dir_adds_no_flag(sandbox):
    p = pretrain_run(sandbox, "done", WORKDIR="gs://b/run")
    out, _ = p.communicate(timeout=30)
    assert p.returncode == 0, out
    assert trainer_argv(sandbox)[4:] == []  # pretrain.py --workdir W --config=C, nothing more
    assert "coordinator=none" in out        # one host: no jax.distributed coordinator


@pytest.mark.parametrize("mode,rc", [("preempt", 75), ("crash", 3)])
def test_pretrain_run_exit_codes(sandbox, mode, rc):
    p = pretrain_run(sandbox, mode, WORKDIR="gs://b/run")
    out, _ = p.communicate(timeout=30)
    assert p.returncode == rc, out


def test_pretrain_run_survives_sigterm_to_report_the_preemption(sandbox):
    # A spot preemption sends SIGTERM to every process: the wrapper must outlive it, see the
    # trainer's "preempted" line through tee, and exit 75 so that SkyPilot recovers the job.
    p = pretrain_run(sandbox, "wait", WORKDIR="gs://b/run")
    try:
        assert p.stdout.readline().startswith("coordinator=")
        assert p.stdout.readline() == "ready\n"
        os.killpg(p.pid, signal.SIGTERM)
        out, _ = p.communicate(timeout=30)
        assert p.returncode == 75, out
        assert "preempted at step 9" in out
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def test_serve_run_starts_vllm_on_the_mounted_model(sandbox, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    vllm_venv = sandbox.home / "vllm-venv"
    (vllm_venv / "bin").mkdir(parents=True)
    (vllm_venv / "bin" / "activate").write_text("export VIRTUAL_ENV=~/vllm-venv\n")
    t = load(SERVE)
    script = tmp_path / "run.sh"
    script.write_text(t["run"].replace("/model", str(model)))
    env = dict(sandbox.env, HOME=str(sandbox.home), SKYPILOT_NUM_GPUS_PER_NODE="2",
               **{k: v for k, v in t["envs"].items() if v is not None})
    r = subprocess.run(["bash", str(script)], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0, r.stderr
    assert sandbox.fake_log.read_bytes().decode().split("\0")[:-1] == [
        "serve", str(model), "--host", "0.0.0.0", "--port", "8000", "--served-model-name", "jaxlm",
        "--tensor-parallel-size", "2", "--max-model-len", t["envs"]["MAX_MODEL_LEN"]]


# SkyPilot's own validation -------------------------------------------------------------------

@pytest.fixture(scope="module")
def sky(tmp_path_factory):
    # SkyPilot writes state under ~/.sky on import: keep it in a scratch HOME.
    mp = pytest.MonkeyPatch()
    mp.setenv("HOME", str(tmp_path_factory.mktemp("skyhome")))
    mp.setenv("SKYPILOT_DISABLE_USAGE_COLLECTION", "1")
    try:
        yield pytest.importorskip(
            "sky", reason="SkyPilot is not installed (pip install 'skypilot==0.14.1'; it is kept "
                          "out of the test extra: it pins click<8.2, huggingface_hub needs >=8.4)")
    finally:
        mp.undo()


def test_sky_rejects_the_yaml_without_required_envs(sky):
    for path, var in ((PRETRAIN, "WORKDIR"), (SERVE, "MODEL_SRC")):
        with pytest.raises(ValueError, match=var):
            sky.Task.from_yaml(str(path))


def test_sky_parses_pretrain(sky):
    task = sky.Task.from_yaml_config(load(PRETRAIN), env_overrides=[("WORKDIR", "gs://b/run")])
    assert task.num_nodes == 1 and task.envs["WORKDIR"] == "gs://b/run"
    [res] = list(task.resources)
    assert res.use_spot and res.accelerators == {"tpu-v4-32": 1}
    assert res.accelerator_args["runtime_version"] == "tpu-ubuntu2204-base"
    assert res.job_recovery["recover_on_exit_codes"] == [75]


def test_sky_parses_serve(sky):
    task = sky.Task.from_yaml_config(load(SERVE), env_overrides=[("MODEL_SRC", "gs://b/run/hf")])
    assert task.file_mounts == {"/model": "gs://b/run/hf"}
    assert {acc for r in task.resources for acc in r.accelerators} >= {"L4", "A100"}
    assert all(r.ports == ["8000"] for r in task.resources)
    assert task.service is not None
