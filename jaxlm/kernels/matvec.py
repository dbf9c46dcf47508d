"""A float32 matrix-vector kernel for batch-1 decode on CPU, and `weight_einsum`, which sends an
activation-times-weight einsum there when it applies and to `jnp.einsum` otherwise.

Why: decoding one sequence on a CPU is bound by streaming the weights from DRAM (~155 MB per
token for the bench config), one matrix-vector product per weight. XLA:CPU's library calls
(Eigen; XNNPACK, YNNPACK and oneDNN through flags) stream the per-layer sizes (1.5-3 MB) at
18-25 GB/s on the bench machine, where its two cores can read ~31 GB/s. `matvec.cc` splits the
weight's rows into one contiguous block per thread of XLA's own intra-op pool. Measured on the
bench machine in a chain of the bench model's 41 products (8 alternating rounds): 24.0 -> 30.4
GB/s, 6.5 -> 5.1 ms per token.

When: `weight_einsum` uses it only where it is the same computation and the better one: the CPU
backend, float32 operands, one row of activations (batch 1, one token: decode), the einsum a
plain `x[..., K] @ w[K, ...]`, and no multi-device mesh in context (a custom call has no
sharding rule). Everything else - training, prefill, batch > 1, bf16, TPU/GPU - is `jnp.einsum`.
Gradients through it are exact (a custom JVP in einsums), so it never blocks autodiff.

Build: on first use, with the system C++ compiler (`$CXX`, else `c++`) against the XLA FFI
headers that jaxlib ships (`jax.ffi.include_dir()`), into `$JAXLM_CACHE_DIR/kernels` (default
`~/.cache/jaxlm/kernels`), named by a hash of the source, jaxlib's version, the compiler command
and flags, and this CPU's flags (the build is `-march=native`); ~3 s once per machine. No compiler, or a failed build: one
warning, and `jnp.einsum` as before. JAXLM_CPU_MATVEC=0 turns the kernel off, =1 makes a failed
build an error, auto (default) is the above.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import platform
import shlex
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib

SOURCE = Path(__file__).with_name("matvec.cc")
TARGET = "jaxlm_matvec_f32"
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")
MODES = ("auto", "0", "1")


def mode() -> str:
    """JAXLM_CPU_MATVEC: auto (default), 0 (off) or 1 (on; a failed build is an error)."""
    value = os.environ.get("JAXLM_CPU_MATVEC", "auto").strip().lower()
    if value not in MODES:
        raise ValueError(f"JAXLM_CPU_MATVEC must be auto, 0 or 1, got {value!r}")
    return value


def cache_dir() -> Path:
    return Path(os.environ.get("JAXLM_CACHE_DIR", "~/.cache/jaxlm")).expanduser() / "kernels"


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.processor()


def _compiler() -> list[str]:
    return shlex.split(os.environ.get("CXX", "c++"))


def library_path() -> Path:
    """Where the build for this source, jaxlib, compiler and CPU lives (built or not)."""
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), jaxlib.__version__.encode(), " ".join(_compiler()).encode(),
                 " ".join(FLAGS).encode(), _cpu_flags().encode(), platform.machine().encode()):
        key.update(part + b"\0")
    return cache_dir() / f"matvec-{key.hexdigest()[:16]}.so"


def build() -> Path:
    """Compile matvec.cc unless this build exists; returns the library. Raises RuntimeError with
    the compiler's message on failure. Safe to race: each build writes its own file, then renames."""
    out = library_path()
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    cmd = [*_compiler(), *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", tmp]
    try:
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise RuntimeError(f"could not run the C++ compiler {cmd[0]!r} ({e})") from None
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise RuntimeError(f"{shlex.join(cmd[:2])} ... failed: {last}")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o755 & ~umask)  # mkstemp made it 0600: readable like any built library
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):  # a failed or interrupted build leaves nothing behind
            os.unlink(tmp)
    return out


@functools.cache
def _registered() -> bool:
    """Build (if needed), load and register the kernel once per process; False if unavailable."""
    try:
        lib = ctypes.CDLL(str(build()))
    except (RuntimeError, OSError) as e:
        if mode() == "1":
            raise RuntimeError(f"JAXLM_CPU_MATVEC=1 but the CPU matvec kernel is unavailable: {e}")
        warnings.warn(f"jaxlm's CPU matvec kernel is unavailable, decode uses XLA's dot ({e}); "
                      "JAXLM_CPU_MATVEC=0 silences this", stacklevel=3)
        return False
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.jaxlm_matvec_f32), platform="cpu")
    return True


def available() -> bool:
    """True when the kernel is on (JAXLM_CPU_MATVEC) and built and registered for this process."""
    return mode() != "0" and _registered()


@jax.custom_jvp
def matvec(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [K] @ w [K, N] -> [N], float32, through the kernel (CPU only; see `available`)."""
    if not _registered():
        raise RuntimeError("jaxlm's CPU matvec kernel could not be built (see the warning above)")
    return jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(w.shape[1:], jnp.float32),
                            vmap_method="sequential")(x, w)


@matvec.defjvp
def _matvec_jvp(primals, tangents):
    (x, w), (dx, dw) = primals, tangents
    return matvec(x, w), jnp.einsum("K,KN->N", dx, w) + jnp.einsum("K,KN->N", x, dw)


def _plain_product(spec: str, x_ndim: int, w_ndim: int) -> bool:
    """`spec` is x[..., K] @ w[K, ...] with distinct letters (no diagonal, no ellipsis): x's last
    letter is w's first, the only one they share, and the output is x's other letters then w's."""
    inputs, _, out = spec.replace(" ", "").partition("->")
    lhs, _, rhs = inputs.partition(",")
    return (lhs.isalpha() and rhs.isalpha() and len(set(lhs)) == len(lhs) == x_ndim
            and len(set(rhs)) == len(rhs) == w_ndim >= 2 and lhs[-1] == rhs[0]
            and not set(lhs) & set(rhs[1:]) and out == lhs[:-1] + rhs[1:])


def applies(spec: str, x: jax.Array, w: jax.Array, **kwargs) -> bool:
    """Whether `weight_einsum(spec, x, w, **kwargs)` runs on the kernel (decided when tracing;
    a jitted function keeps its choice, so set JAXLM_CPU_MATVEC before the first call)."""
    if x.dtype != jnp.float32 or w.dtype != jnp.float32 or not _plain_product(spec, x.ndim, w.ndim):
        return False
    if math.prod(x.shape[:-1]) != 1 or x.shape[-1] == 0 or w.shape[0] != x.shape[-1]:
        return False  # more than one row (a GEMM), nothing to contract, or broadcasting
    if set(kwargs) - {"preferred_element_type"} or kwargs.get("preferred_element_type") not in (
            None, jnp.float32):
        return False  # precision=, out_sharding=, another result type: jnp.einsum's business
    # The backend JAX computes on by default: lowering for another platform from a CPU host
    # (an AOT export at batch 1) would need JAXLM_CPU_MATVEC=0.
    if jax.default_backend() != "cpu":
        return False
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and mesh.size > 1:
        return False
    return available()


def weight_einsum(spec: str, x: jax.Array, w: jax.Array, **kwargs) -> jax.Array:
    """`jnp.einsum(spec, x, w, **kwargs)` for an activation x and a weight w; at batch 1 on CPU
    (see the module docstring) the kernel computes it. Under `jax.vmap` each example is one row,
    so the kernel runs once per example (correct, but a batched call should not be vmapped)."""
    if not applies(spec, x, w, **kwargs):
        return jnp.einsum(spec, x, w, **kwargs)
    k = x.shape[-1]
    y = matvec(x.reshape(k), w.reshape(k, -1))
    return y.reshape(*x.shape[:-1], *w.shape[1:])
