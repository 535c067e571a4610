"""Process-wide settings for rex's own entry points (pipeline job, CLI, training, benchmark, tests).

``keep_freed_memory()``: glibc serves every allocation above its mmap threshold (32 MB at most, however it is
tuned) with a fresh ``mmap`` and unmaps it on free. Inference allocates, touches and frees activations of that
size in every layer (MobileNetV2 at batch 64: 100 MB a tensor), so the kernel zero-fills the same amount of
fresh pages again for every layer of every batch. Measured on MobileNetV2, batch 64, one thread, this machine:
81.5 ms per image, two thirds of it system time (20,000 page faults per image), against 20.9 ms with mmap off
and trimming off: freed memory stays in the heap and the next layer reuses it. The arithmetic is unchanged
(PyTorch aligns its CPU buffers itself), so every number is bit-identical; only time moves.

The cost: the heap does not shrink below its peak (a job process's peak is its peak anyway). It is not done on
``import rex``: a library should not change the allocator of a process it is imported into. Call it from your
own script if you evaluate large batches on a CPU. ``REX_MALLOC=system`` turns it off.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from typing import Optional

# glibc's mallopt parameter numbers (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
TRIM_THRESHOLD = 2**31 - 1  # the largest value mallopt takes: never return the top of the heap below 2 GiB free

_KEPT: Optional[bool] = None  # None: keep_freed_memory() not called in this process


def freed_memory_kept() -> bool:
    """Whether this process keeps freed memory (``keep_freed_memory`` was called and took effect); changes
    nothing, for the records."""
    return bool(_KEPT)


def keep_freed_memory() -> bool:
    """Keep freed memory in the heap (glibc: no mmap for large blocks, no trimming). Returns whether it is
    in effect: False on a non-glibc C library, on other systems, or with ``REX_MALLOC=system``."""
    global _KEPT
    if _KEPT is not None:
        return _KEPT
    ok = False
    if os.environ.get("REX_MALLOC", "").lower() != "system" and sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            mallopt = libc.mallopt  # glibc only (musl has none): AttributeError otherwise
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            ok = mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
        except (OSError, AttributeError):
            ok = False
    _KEPT = ok
    return ok
