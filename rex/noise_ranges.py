"""SQuant's activation ranges (protocol ``act_range='noise'``): no data, one batch of uniform noise images.

SQuant (github.com/clevercool/SQuant, quant_modules.py ``_init_quant_para``) runs ``torch.rand`` images (256 of
them, values in [0, 1), not normalised) through the model once and sets each layer input's per-tensor range
from the tensor it sees: alpha = sigma x std, with the std of the positive entries for a non-negative input
(range [0, alpha]) and, for a signed input, sigma x std / 1.25 over all entries (range [-alpha, alpha]); below
6 bits alpha is clipped at the batch maximum. The statistics are accumulated here in float64 over chunks of
the batch (the numbers of one pass over all 256, with less memory).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .errors import ConfigError

NOISE_BATCH = 256  # SQuant's batch_size default, the size of its one noise batch
CHUNK = 32


def _empty() -> dict:
    return dict(n=0, s=0.0, ss=0.0, nz=0, lo=math.inf, hi=-math.inf)


ROW = 1024  # reductions run per row of this many entries in float32, the rows' results are summed in float64


def _rows(a: torch.Tensor) -> list[torch.Tensor]:
    k = a.numel() // ROW * ROW
    return [t for t in (a[:k].view(-1, ROW), a[k:].view(1, -1)) if t.numel()]


def _sum_sumsq(a: torch.Tensor) -> tuple[float, float]:
    """Sum and sum of squares of a flat float32 tensor, to about 1e-9 relative, in two fast passes: a float32
    dot or norm over the whole map (tens of millions of entries) is off by up to 1e-3, enough to move a range."""
    s = ss = 0.0
    for r in _rows(a):
        s += float(r.sum(1).double().sum())
        ss += float(torch.linalg.vector_norm(r, dim=1).double().square().sum())
    return s, ss


def _accumulate(st: dict, x: torch.Tensor) -> None:
    """Add one tensor's count, sum, sum of squares, count of non-zero entries and extremes. A non-negative
    input's positive entries are its non-zero ones, so their sums are the tensor's (SQuant uses them only
    when the whole input is non-negative; a signed one takes the std of all entries)."""
    a = x.detach().float().reshape(-1)
    if not a.numel():
        return
    lo, hi = torch.aminmax(a)
    s, ss = _sum_sumsq(a)
    st["n"] += a.numel()
    st["s"] += s
    st["ss"] += ss
    st["nz"] += int(torch.count_nonzero(a))
    st["lo"] = min(st["lo"], float(lo))
    st["hi"] = max(st["hi"], float(hi))


def _std(n: int, s: float, ss: float) -> float:
    """Unbiased std (torch.std's) from count, sum and sum of squares; nan below two entries."""
    if n < 2:
        return math.nan
    return math.sqrt(max(ss - s * s / n, 0.0) / (n - 1))


def noise_input_stats(model: nn.Module, input_shape: tuple, names: list, batch: int = NOISE_BATCH,
                      seed: int = 0, chunk: int = CHUNK) -> dict[str, dict]:
    """Per layer in ``names``, the statistics of its input over ``batch`` uniform-noise images of shape
    ``input_shape[1:]`` (a fixed seed: the same noise every time)."""
    from .transforms import get_module

    stats = {n: _empty() for n in names}
    handles = []
    for name in names:
        def hook(m, args, name=name):
            if args and isinstance(args[0], torch.Tensor):
                _accumulate(stats[name], args[0])
        handles.append(get_module(model, name).register_forward_pre_hook(hook))
    gen = torch.Generator().manual_seed(seed)
    try:
        with torch.no_grad():
            done = 0
            while done < batch:
                k = min(chunk, batch - done)
                model(torch.rand((k, *input_shape[1:]), generator=gen))
                done += k
    finally:
        for h in handles:
            h.remove()
    return stats


def squant_range(st: dict, sigma: float, bits: Optional[int]) -> Optional[tuple[float, float]]:
    """SQuant's range of one input from its noise statistics (None when the input never had two values)."""
    if st["n"] == 0:
        return None
    signed = st["lo"] < 0
    std = _std(st["n"], st["s"], st["ss"]) if signed else _std(st["nz"], st["s"], st["ss"])
    if not std > 0:
        return None
    alpha = sigma * std / 1.25 if signed else sigma * std
    if bits is not None and bits < 6:  # SQuant: "for small bit, need clip"
        alpha = min(alpha, st["hi"])
    if not alpha > 0:
        return None
    return (-alpha, alpha) if signed else (0.0, alpha)


def noise_shape(example_input) -> tuple:
    if not isinstance(example_input, torch.Tensor) or example_input.dim() < 2:
        raise ConfigError("act_range='noise' (SQuant's protocol) feeds uniform noise images: it needs a single "
                          "image tensor as example_input (e.g. 1x3x224x224); use act_range='bn' for this model")
    return tuple(example_input.shape)
