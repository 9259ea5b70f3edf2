"""glibc malloc settings for CPU-only training: keep XLA's per-step buffers in the heap.

On CPU, an XLA executable allocates its temporaries (1.7 GB per t5_1_1-small DSS step) and its
large outputs afresh on every call. glibc serves blocks above its mmap threshold, and any block
a worker thread's 64 MB arena cannot hold, with a fresh mmap that is unmapped on free, so every
step faults its temporaries in page by page: about 630,000 minor faults and 1.1 s of system time
per step (`getrusage` around 5 steps of benchmarks/train_benchmark.py mode a). With one arena, no
mmap and no trimming, freed blocks are reused by the next step: 160,000 faults and 0.3 s.

The settings apply to the whole process (torch in the same process benefits alike) and only when
this process can only run JAX on CPU (no TPU or CUDA plugin installed, or JAX_PLATFORMS=cpu):
on accelerator hosts one arena could serialise a many-threaded input pipeline. Set
DISTILL_SBS_HOST_MALLOC=system to keep glibc's defaults. jemalloc or tcmalloc through LD_PRELOAD
would do the same job, but they are not pip-installable and must be set before the process starts.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import os
import sys

ENV = "DISTILL_SBS_HOST_MALLOC"
# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_ACCELERATOR_PLUGINS = ("libtpu", "jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin")

_applied: bool | None = None


def cpu_only() -> bool:
    """Whether JAX in this process can only use the CPU (decided without initialising JAX)."""
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.strip().lower() == "cpu"
    return not any(importlib.util.find_spec(p) for p in _ACCELERATOR_PLUGINS)


def keep_buffers_in_heap() -> bool:
    """Applies the settings once, before JAX starts its threads; returns whether they apply.

    Call it at the top of an entry point: threads that already allocated keep their arena."""
    global _applied
    if _applied is None:
        _applied = False
        if os.environ.get(ENV, "").lower() != "system" and sys.platform == "linux" and cpu_only():
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                mallopt = libc.mallopt
            except (OSError, AttributeError):  # not glibc (musl, ...): nothing to tune
                return False
            _applied = all(
                mallopt(param, value) == 1
                for param, value in (
                    (_M_ARENA_MAX, 1),  # worker threads allocate from the heap too
                    (_M_MMAP_MAX, 0),  # large blocks from the heap, reused after free
                    (_M_TRIM_THRESHOLD, 2**31 - 1),  # never hand the top of the heap back
                )
            )
    return _applied
