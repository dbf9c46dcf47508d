"""Fixtures for the deployment scripts (tpu_scripts/): run them, and fake the cloud around them.

Nothing here reaches a cloud. `sandbox` puts fake `gcloud`, `curl`, `uv` and `vllm` first on
PATH: the fake gcloud records each call's argv and runs `tpu-vm ssh --command` scripts with
bash on this machine under a scratch HOME (~/jaxlm -> this repository, a stub ~/jaxlm-venv), so
the quoting and the remote side of the scripts are exercised for real.
"""
import os
import shlex
import stat
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "tpu_scripts"

FAKE_GCLOUD = r"""#!/usr/bin/env bash
# Records argv (NUL-separated, one file per call); runs `compute tpus tpu-vm ssh --command CMD`
# locally with HOME=$FAKE_HOME, as every worker would.
n=$(find "$FAKE_CALLS" -type f | wc -l)
printf '%s\0' "$@" > "$FAKE_CALLS/$(printf %03d "$n")"
if [[ "$1 $2 $3 $4" == "compute tpus tpu-vm ssh" ]]; then
    while (($#)); do if [[ $1 == --command ]]; then cmd=$2; break; fi; shift; done
    HOME=$FAKE_HOME exec bash -c "$cmd"
fi
"""
FAKE_CURL = r"""#!/usr/bin/env bash
# The TPU metadata server: worker-network-endpoints comes from $FAKE_TPU_ENDPOINTS.
if [[ $* == *worker-network-endpoints* && -n ${FAKE_TPU_ENDPOINTS:-} ]]; then
    printf '%s' "$FAKE_TPU_ENDPOINTS"
else
    exit 22
fi
"""
FAKE_UV = r"""#!/usr/bin/env bash
printf '%s\n' "uv $*" >> "$FAKE_LOG"
if [[ $1 == venv ]]; then
    dir=${@: -1}; mkdir -p "$dir/bin"
    printf '#!/usr/bin/env bash\necho "stub python $*"\n' > "$dir/bin/python"; chmod +x "$dir/bin/python"
fi
"""
FAKE_VLLM = r"""#!/usr/bin/env bash
printf '%s\0' "$@" > "$FAKE_LOG"
echo "fake vllm: $*"
"""
ACTIVATE = 'export VIRTUAL_ENV="{venv}"; export PATH="$VIRTUAL_ENV/bin:$PATH"\n'


def _write_exe(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def make_venv(path: Path) -> Path:
    """A stand-in virtual environment: bin/activate that puts its bin/ first on PATH."""
    (path / "bin").mkdir(parents=True, exist_ok=True)
    (path / "bin" / "activate").write_text(ACTIVATE.format(venv=path))
    return path


class Sandbox:
    def __init__(self, root: Path):
        self.root = root
        self.bin = root / "bin"
        self.home = root / "home"
        self.calls = root / "calls"
        self.fake_log = root / "fake.log"
        self.calls.mkdir(parents=True)
        self.home.mkdir()
        (self.home / "jaxlm").symlink_to(REPO)
        make_venv(self.home / "jaxlm-venv")
        _write_exe(self.bin / "gcloud", FAKE_GCLOUD)
        _write_exe(self.bin / "curl", FAKE_CURL)
        _write_exe(self.bin / "uv", FAKE_UV)
        _write_exe(self.bin / "vllm", FAKE_VLLM)
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("JAX_COORDINATOR", "JAXLM_", "SKYPILOT_", "VIRTUAL_ENV"))}
        env.update(PATH=f"{self.bin}{os.pathsep}{env.get('PATH', '')}", FAKE_HOME=str(self.home),
                   FAKE_CALLS=str(self.calls), FAKE_LOG=str(self.fake_log), TMPDIR=str(root))
        self.env = env
        self.hostname = subprocess.run(["hostname"], capture_output=True, text=True).stdout.strip()
        self.log = self.home / "jaxlm-logs" / f"{self.hostname}.log"

    def gcloud_calls(self) -> list[list[str]]:
        """argv of every fake gcloud call so far (without the leading 'gcloud')."""
        return [p.read_bytes().decode().split("\0")[:-1] for p in sorted(self.calls.iterdir())]


@pytest.fixture
def sandbox(tmp_path) -> Sandbox:
    return Sandbox(tmp_path / "sandbox")


GUARD = r"""#!/usr/bin/env bash
echo "test bug: the real $(basename "$0") would have run: $*" >&2
exit 99
"""


@pytest.fixture(scope="session")
def guarded_env(tmp_path_factory) -> dict:
    """os.environ with gcloud / vllm / sky stubs first on PATH that fail loudly: a script that
    a test thinks is a dry run can never reach a real cloud account."""
    bin_dir = tmp_path_factory.mktemp("guard")
    for tool in ("gcloud", "vllm", "sky"):
        _write_exe(bin_dir / tool, GUARD)
    return dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")


def _runner(default_env):
    def run(script: str, *args, env=None, timeout=60) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(SCRIPTS / script), *map(str, args)],
                              capture_output=True, text=True, env=env or default_env,
                              timeout=timeout, stdin=subprocess.DEVNULL)
    return run


@pytest.fixture
def run_script(guarded_env):
    """run_script(script, *args, env=None) -> CompletedProcess (text, captured). Without env, the
    guarded environment."""
    return _runner(guarded_env)


@pytest.fixture
def dry_run(guarded_env):
    """dry_run(script, *args) -> argv of each command the script prints with --dry-run (given
    first, so that it is never taken for part of a command after '--').

    Asserts the run succeeded and that every stdout line is a "+ command" (parsed back with
    shlex, so the printed line is valid shell) or a "# comment".
    """
    def dry(script: str, *args, env=None) -> list[list[str]]:
        r = _runner(guarded_env)(script, "--dry-run", *args, env=env)
        assert r.returncode == 0, r.stderr
        lines = r.stdout.splitlines()
        assert lines and all(line.startswith(("+ ", "# ")) for line in lines), r.stdout
        return [shlex.split(line[2:]) for line in lines if line.startswith("+ ")]

    return dry


def one_line_error(r: subprocess.CompletedProcess, script: str, *needles: str) -> str:
    """Assert a usage error: exit 2, nothing on stdout, one stderr line 'SCRIPT: error: ...'."""
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"{script}: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture
def usage_error():
    return one_line_error
