"""Keep freed host memory in the process, so XLA:CPU's per-call buffers stop page-faulting.

XLA:CPU allocates the temporaries and outputs of every call afresh and frees them afterwards.
glibc returns freed blocks over 32 MB to the kernel (they were mapped on their own), and a worker
thread's secondary arena maps anything over 64 MB on its own whatever the settings; the next call
maps them again and the kernel faults every 4 KiB page back in, zeroed. A train step of the bench
config took ~600k page faults, 2.4 GB and ~1 s of kernel time, every step. Keeping the freed memory
in one heap removes them: in a same-process A/B the bench train step went 7.2 s -> 6.3 s, and
transformers' step in that process gained as much, since PyTorch allocates through the same
malloc. The cost is memory: the kept heap fragments, and on the bench train step it settled at
8.1 GB resident (after growing at steps 1 and 6 of 30) against a 3.6 GB peak with the default
allocator. So the benchmarks turn it on by default (`by_default=True`), the training and
generation entry points only when asked (JAXLM_HOST_MALLOC=1).

Three glibc `mallopt` settings:
  M_ARENA_MAX 1         every thread allocates from the main heap (a secondary arena would map
                        big blocks on its own),
  M_MMAP_MAX 0          big blocks come from that heap, not from mappings of their own,
  M_TRIM_THRESHOLD -1   a freed heap top is never given back to the kernel.
The arena limit only steers threads that have not allocated yet, so call `keep_freed_memory()`
first thing, before JAX (or anything else) starts threads: the experiments do. Called later (a
notebook kernel, a pytest-xdist worker) it still helps the main thread's allocations, but a
thread that already owns a secondary arena keeps mapping its big blocks.

By default only where it pays: on a CPU-only host (JAX_PLATFORMS=cpu, or unset and no TPU or GPU
found the way JAX looks for them). On a TPU/GPU host the arrays live on the accelerator, and one
arena would serialise the threads of an input pipeline. JAXLM_HOST_MALLOC=1 forces it on, =0 off
(unset or auto: the caller's default). Not glibc (macOS, musl): nothing is changed.
"""
from __future__ import annotations

import ctypes
import glob
import os
import platform
import sys

M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8  # glibc's malloc.h
# TPUs are PCI devices of Google's vendor id (which gVNIC network cards share, hence the device
# ids: TPU v3, v4, v5p, v5e, v6e, 7x and one unnamed, as jax._src.hardware_utils lists them).
GOOGLE_PCI_VENDOR = "0x1ae0"
TPU_PCI_DEVICES = {"0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076"}
GPU_DEVICE_FILES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg", "/dev/kfd")  # NVIDIA, WSL2, ROCm
_applied: bool | None = None


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def has_tpu() -> bool:
    """A TPU chip on this host's PCI bus."""
    return any(_read(vendor) == GOOGLE_PCI_VENDOR
               and _read(os.path.join(os.path.dirname(vendor), "device")) in TPU_PCI_DEVICES
               for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"))


def cpu_only_host() -> bool:
    """True when JAX will compute on the host CPU: JAX_PLATFORMS names cpu first, or it is unset
    and there is no TPU on the PCI bus and no GPU device file."""
    platforms = os.environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    return not has_tpu() and not any(os.path.exists(f) for f in GPU_DEVICE_FILES)


def keep_freed_memory(*, by_default: bool = True) -> bool:
    """Make the settings above once (see the module docstring); True if they were made (glibc).

    JAXLM_HOST_MALLOC=1 makes them, =0 does not; unset or auto: made on a CPU-only host when
    `by_default`. Raises ValueError for any other JAXLM_HOST_MALLOC.
    """
    global _applied
    if _applied is None:
        wanted = os.environ.get("JAXLM_HOST_MALLOC", "auto").strip().lower()
        if wanted not in ("auto", "0", "1"):
            raise ValueError(f"JAXLM_HOST_MALLOC must be auto, 0 or 1, got {wanted!r}")
        use = (by_default and cpu_only_host()) if wanted == "auto" else wanted == "1"
        _applied = use and _mallopt_all()
    return _applied


def is_glibc() -> bool:
    """Linux with glibc, whose mallopt settings these are."""
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def _mallopt_all() -> bool:
    if not is_glibc():
        return False
    libc = ctypes.CDLL(None)  # the process's own C library
    # glibc widens the -1 trim threshold to SIZE_MAX: never trim (mallopt(3)).
    return all(libc.mallopt(param, value) == 1
               for param, value in ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1)))


def keep_freed_memory_for_cli(*, by_default: bool) -> bool:
    """keep_freed_memory() for a command-line entry point: a bad JAXLM_HOST_MALLOC prints one
    line, `error: ...`, and exits with status 2 instead of a traceback."""
    try:
        return keep_freed_memory(by_default=by_default)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
