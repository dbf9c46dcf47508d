"""jaxlm.hostmem: with freed memory kept, repeated XLA:CPU calls stop page-faulting their buffers.

Each case runs in a fresh interpreter: malloc settings are per process and must precede JAX's
threads.
"""
import json
import os
import platform
import subprocess
import sys
import textwrap

import pytest

from jaxlm import hostmem

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHILD = textwrap.dedent("""
    import json, resource, sys
    sys.path.insert(0, {root!r})
    from jaxlm.hostmem import keep_freed_memory
    applied = keep_freed_memory()
    import jax, jax.numpy as jnp
    # 64 MB results, above glibc's largest mmap threshold (32 MB).
    f = jax.jit(lambda x: x * 2.0 + 1.0)
    x = jnp.ones((4096, 4096), jnp.float32)
    faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(24):  # the heap settles within ~20 calls (measured: growth stops by call 18)
        f(x).block_until_ready()
    before = faults()
    for _ in range({calls}):
        f(x).block_until_ready()
    print(json.dumps({{"applied": applied, "faults": faults() - before}}))
""")
CALLS = 8
PAGES_PER_BUFFER = 64 * 2**20 // 4096


def run_child(setting: str) -> dict:
    env = {**os.environ, "JAXLM_HOST_MALLOC": setting, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", CHILD.format(root=ROOT, calls=CALLS)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="mallopt settings are glibc's")
def test_kept_memory_removes_the_page_faults_of_repeated_calls():
    off, on = run_child("0"), run_child("1")
    assert off["applied"] is False and on["applied"] is True
    # Without: every call maps its 64 MB buffers afresh (at least one per call, 16k pages each).
    assert off["faults"] >= CALLS * PAGES_PER_BUFFER * 0.9, off
    # With: the freed blocks are reused once the heap has settled; allow one late growth.
    assert on["faults"] <= PAGES_PER_BUFFER * 1.1, on


def test_auto_applies_on_cpu_only_hosts(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert hostmem.cpu_only_host()
    monkeypatch.setenv("JAX_PLATFORMS", "tpu,cpu")
    assert not hostmem.cpu_only_host()
    monkeypatch.delenv("JAX_PLATFORMS")
    monkeypatch.setattr(hostmem.glob, "glob", lambda pattern: ["/dev/accel0"] if "accel" in pattern else [])
    assert not hostmem.cpu_only_host()
    monkeypatch.setattr(hostmem.glob, "glob", lambda pattern: [])
    assert hostmem.cpu_only_host()


def test_bad_setting_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(hostmem, "_applied", None)
    monkeypatch.setenv("JAXLM_HOST_MALLOC", "yes")
    with pytest.raises(ValueError, match="JAXLM_HOST_MALLOC must be auto, 0 or 1"):
        hostmem.keep_freed_memory()
