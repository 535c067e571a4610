"""Scoped torch thread count for the quantization math.

Quantizing a model is thousands of small element-wise ops (round, clamp, abs-max over one weight
matrix). Measured on a loaded 2-core machine (all-MiniLM-L6-v2, W4 K=2, cProfile): 23.5 s with 2 torch
threads against 2.0 s with 1 thread in the same process, and MobileNetV2 K=4 greedy 17-19 s against
2.4-3.5 s (issue 14). Each op is too short to amortise waking and joining an OpenMP team, and when the
other core is busy every op waits for a descheduled worker. So the engine runs its math single-threaded
inside :func:`quant_threads`, which always restores the caller's setting (evaluation keeps its threads).

``REX_QUANT_THREADS`` (environment, a positive integer) overrides the count, e.g. for a large model on an
idle many-core node.
"""
from __future__ import annotations

import contextlib
import os

import torch

from ..errors import ConfigError

ENV = "REX_QUANT_THREADS"


def quant_thread_count() -> int:
    """Threads for the quantization math: ``REX_QUANT_THREADS`` or 1."""
    raw = os.environ.get(ENV)
    if raw is None or raw.strip() == "":
        return 1
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        raise ConfigError(f"{ENV}={raw!r} is not a positive integer; unset it (1 thread) or set e.g. {ENV}=1")
    return n


@contextlib.contextmanager
def quant_threads(n: int | None = None):
    """Run the block with ``n`` torch intra-op threads (default :func:`quant_thread_count`), then restore."""
    n = quant_thread_count() if n is None else n
    prev = torch.get_num_threads()
    if n == prev:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)
