"""Keep freed host memory in the process, so XLA:CPU's per-call buffers stop page-faulting.

XLA:CPU allocates the temporaries and outputs of every call afresh and frees them afterwards.
glibc hands blocks over 32 MB (and any block of a thread's secondary arena over 64 MB) straight
back to the kernel, so the next call maps them again and faults every 4 KiB page in, zeroed by
the kernel: a train step of the bench config took ~600k page faults, 2.4 GB and ~1 s of kernel
time, every step. Keeping the freed memory in one heap removes them (train step 6.9 s -> 6.1 s on
the bench config; transformers' step in the same process gains as much, since PyTorch allocates
through the same malloc). The cost: the process keeps its peak heap (~4 GB on the bench train
step) instead of returning it between calls.

Three glibc `mallopt` settings, applied before JAX starts its threads (call `keep_freed_memory()`
first thing in a program; the experiments do):
  M_ARENA_MAX 1         every thread allocates from the main heap (a secondary arena maps big
                        blocks on its own whatever the other settings),
  M_MMAP_MAX 0          big blocks come from that heap, not from their own mapping,
  M_TRIM_THRESHOLD -1   a freed heap top is never given back to the kernel.

Used only where it pays: on a CPU-only host (JAX_PLATFORMS=cpu, or no TPU/GPU device files). On a
TPU/GPU host the arrays live on the accelerator, and one arena would serialise the many threads of
an input pipeline. JAXLM_HOST_MALLOC=1 forces it on, =0 off. Not glibc (macOS, musl): a no-op.
"""
from __future__ import annotations

import ctypes
import glob
import os
import platform

M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8  # glibc's malloc.h
ACCELERATOR_DEVICES = ("/dev/accel*", "/dev/vfio/[0-9]*", "/dev/nvidia[0-9]*")  # TPU v4, v5+, GPU
_applied: bool | None = None


def cpu_only_host() -> bool:
    """True when JAX will compute on the host CPU: JAX_PLATFORMS names cpu first, or (unset) no
    TPU or GPU device file exists."""
    platforms = os.environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    return not any(glob.glob(pattern) for pattern in ACCELERATOR_DEVICES)


def keep_freed_memory() -> bool:
    """Apply the settings above once, where they pay (see the module docstring); True if applied.

    Call it before the first JAX computation: threads that have already allocated keep their
    own arena.
    """
    global _applied
    if _applied is None:
        wanted = os.environ.get("JAXLM_HOST_MALLOC", "auto").strip().lower()
        if wanted not in ("auto", "0", "1"):
            raise ValueError(f"JAXLM_HOST_MALLOC must be auto, 0 or 1, got {wanted!r}")
        use = cpu_only_host() if wanted == "auto" else wanted == "1"
        _applied = use and _mallopt_all()
    return _applied


def _mallopt_all() -> bool:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)  # the process's own C library
    # Order matters: the arena limit before anything else allocates on a new thread. mallopt
    # returns 1 on success; the -1 trim threshold is SIZE_MAX once glibc widens it.
    return all(libc.mallopt(param, value) == 1
               for param, value in ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1)))
