"""Keep freed memory in the process heap on a CPU (glibc's `mallopt`), so big tensors stop costing page faults.

A CPU forward allocates and frees the same large activations over and over (a packed step of 64 streams x 64
tokens: 4,096 x 1,536 MLP outputs, 1,024 x 49,152 logits). glibc serves every allocation above its mmap
threshold (dynamic, at most 32 MiB) with a fresh `mmap`, and returns the free top of its heap to the system above
its trim threshold, so such tensors come back as new pages: zero-filled by the kernel, one page fault per 4 KiB,
every forward. Measured on one thread (2026-12-06, Intel Xeon with AMX): allocating and writing 100 MiB 32 ms by
default, 7 ms from the kept heap; a SmolLM2 step of 64 streams x 40-64 tokens, bf16, 430 -> 712 tokens/s, fp32
274 -> 355 (`docs/results.md` 4.8).

`keep_freed_memory()` raises both thresholds (`mmap_threshold`, `trim_threshold`), so allocations up to 1 GiB
come from the heap and freed memory stays there for the next forward. The price: the process keeps its peak
heap resident (its RSS no longer falls back after a large forward; the peak itself does not grow). It is a
process-wide setting, applied once by `model.loader.load_model` on a CPU (`model.heap: keep`, the default;
`system` leaves glibc's defaults), and a no-op without glibc (musl, macOS): the reason is returned and logged.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Literal

import structlog

log = structlog.get_logger(__name__)

M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 30  # allocations up to 1 GiB come from the heap
TRIM_THRESHOLD = 2**31 - 1  # free heap top kept up to 2 GiB (mallopt takes an int)

Heap = Literal["keep", "system"]
_applied: list[str] = []  # what this process did, once


def keep_freed_memory(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD) -> str:
    """Raise glibc's mmap and trim thresholds for this process; returns what was done (or why nothing was),
    logged once. Idempotent."""
    if _applied:
        return _applied[0]
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
        gnu = libc.gnu_get_libc_version
    except (OSError, AttributeError, TypeError):
        outcome = f"system allocator kept: no glibc mallopt in {name or 'the C library'}"
    else:
        gnu.restype = ctypes.c_char_p
        version = gnu().decode()
        mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        ok_trim = mallopt(M_TRIM_THRESHOLD, trim_threshold)
        ok_mmap = mallopt(M_MMAP_THRESHOLD, mmap_threshold)
        if ok_trim and ok_mmap:
            outcome = (f"glibc {version}: freed memory kept in the heap (mmap threshold {mmap_threshold >> 20} MiB, "
                       f"trim threshold {trim_threshold >> 20} MiB)")
        else:
            outcome = f"glibc {version} refused mallopt (trim: {ok_trim}, mmap: {ok_mmap}): system allocator kept"
    _applied.append(outcome)
    log.info("heap", outcome=outcome)
    return outcome


def apply_heap(heap: Heap) -> str:
    """`model.heap`: `keep` -> `keep_freed_memory()`, `system` -> glibc's defaults (nothing done)."""
    if heap == "keep":
        return keep_freed_memory()
    if heap == "system":
        return "system allocator (model.heap: system)"
    raise ValueError(f"model.heap: expected keep or system, got {heap!r}")
