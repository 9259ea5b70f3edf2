"""Process set-up for running JAX on CPU hosts, applied by the launchers before JAX starts.

Two settings, each measured on the t5_1_1-small DSS step of benchmarks/train_benchmark.py:

- `keep_buffers_in_heap`: glibc malloc keeps XLA's per-step buffers. On CPU an XLA executable
  allocates its temporaries (1.7 GB for that step) and large outputs afresh on every call; glibc
  serves blocks above its mmap threshold, and any block a worker thread's 64 MB arena cannot hold,
  with a fresh mmap that is unmapped on free, so every step faults its temporaries in page by page:
  about 630,000 minor faults and 1.1 s of system time per step (`getrusage` around 5 steps of mode
  a). With one arena, no mmap and no trimming, freed blocks are reused: 160,000 faults and 0.3 s.
  It applies to the whole process (torch in the same process alike), and only where this process
  can only run JAX on CPU (no TPU or CUDA plugin installed, or JAX_PLATFORMS=cpu): on accelerator
  hosts one arena could serialise a many-threaded input pipeline. DISTILL_SBS_HOST_MALLOC=system
  keeps glibc's defaults. (jemalloc or tcmalloc through LD_PRELOAD would do the same job, but are
  not pip-installable and must be set before the process starts.)
- `fuse_elementwise_in_ynnpack`: XLA's CPU compiler hands elementwise fusions to YNNPACK as it
  already does dots and reductions (`--xla_cpu_experimental_ynn_fusion_type=+eltwise`). XLA's own
  loop emitter writes a fusion whose consumer wants a transposed layout (the gated-GELU backward
  feeding a weight gradient, 8 MB per layer) element by element in the transposed order, at about
  14 ns per element; YNNPACK tiles it. Same step: 2.80 -> 2.00 s (both compiled in one process,
  alternating), gradients equal to the default compilation within 4e-6 relative (L2), a float32
  reassociation. Only XLA's CPU compiler reads the flag (GPU and TPU compilations ignore it). A
  setting of the same flag already in XLA_FLAGS wins:
  `XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=` (empty) restores XLA's default.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import os
import sys

MALLOC_ENV = "DISTILL_SBS_HOST_MALLOC"
YNN_FUSION_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_ACCELERATOR_PLUGINS = ("libtpu", "jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin")

_heap_tuned: bool | None = None


def cpu_only() -> bool:
    """Whether JAX in this process can only use the CPU (decided without initialising JAX)."""
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.strip().lower() == "cpu"
    return not any(importlib.util.find_spec(p) for p in _ACCELERATOR_PLUGINS)


def keep_buffers_in_heap() -> bool:
    """Applies the malloc settings once, before JAX starts its threads; returns whether they
    apply. Threads that already allocated keep their arena."""
    global _heap_tuned
    if _heap_tuned is None:
        _heap_tuned = False
        opted_out = os.environ.get(MALLOC_ENV, "").lower() == "system"
        if not opted_out and sys.platform == "linux" and cpu_only():
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                mallopt = libc.mallopt
            except (OSError, AttributeError):  # not glibc (musl, ...): nothing to tune
                return False
            _heap_tuned = all(
                mallopt(param, value) == 1
                for param, value in (
                    (_M_ARENA_MAX, 1),  # worker threads allocate from the heap too
                    (_M_MMAP_MAX, 0),  # large blocks from the heap, reused after free
                    (_M_TRIM_THRESHOLD, 2**31 - 1),  # never hand the top of the heap back
                )
            )
    return _heap_tuned


def fuse_elementwise_in_ynnpack() -> bool:
    """Adds the YNNPACK elementwise fusion flag to XLA_FLAGS unless XLA_FLAGS sets that flag;
    returns whether the flag now asks for it. XLA reads XLA_FLAGS when JAX creates its first
    backend, so call this before the first computation (importing jax is fine)."""
    flags = os.environ.get("XLA_FLAGS", "")
    if YNN_FUSION_FLAG + "=" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {YNN_FUSION_FLAG}=+eltwise".strip()
        return True
    value = flags.rsplit(YNN_FUSION_FLAG + "=", 1)[1].split(" ", 1)[0]  # the last setting wins
    return "eltwise" in value


def prepare() -> dict[str, bool]:
    """Both settings (an entry point calls this first); which of them apply."""
    return {"malloc": keep_buffers_in_heap(), "ynn_eltwise": fuse_elementwise_in_ynnpack()}
