"""ZeroQ distilled data (Cai et al., CVPR 2020), used here only to set activation ranges.

``distill_zeroq`` is ZeroQ's own algorithm (per-image statistics, its loss, lr 0.5, 500 iterations), the ``zeroq``
method's; ``distill`` below is the cheaper batch-pooled variant of ``zeroq_lite``. Both share one descent loop.

``distill(model, shape, batch, steps, seed)`` optimizes a batch of inputs, initialised N(0, 1), with Adam so
that, at every BatchNorm of the float model (before folding), the batch statistics of the BN input match
the running statistics:

    loss = sum_BN ||mu_batch - running_mean||_2 + ||sigma_batch - sqrt(running_var + eps)||_2
           + ||mu_input - 0||_2 + ||sigma_input - 1||_2          (the input itself, per channel, as in ZeroQ)

``activation_ranges(folded_model, data)`` then runs the distilled batch through the (BN-folded, prepared)
model and returns per weight layer the [min, max] of its input (or a two-sided percentile), the
``range_override`` of the engine. Nothing else uses the distilled data: weights are quantized exactly as
RTN. Distillation is seeded (``seed``) and cached per (weights, shape, batch, steps, seed, lr), in memory and on
disk (``<REX_CACHE>/zeroq/``).
"""
from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from .cost import _call
from .io import atomic_torch_save

_CACHE: dict = {}


def _weights_key(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        if t.is_floating_point():
            h.update(f"{float(t.double().sum()):.10e}|{float(t.double().abs().sum()):.10e}|{tuple(t.shape)}".encode())
    return h.hexdigest()[:16]


def _batchnorms(model: nn.Module) -> list:
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None]
    if not bns:
        from .errors import NotApplicableError

        raise NotApplicableError("ZeroQ needs a model with BatchNorm layers (their running statistics are the "
                                 "distillation target); this model has none: n/a (no BatchNorm)", reason="no BatchNorm")
    return bns


def _descend(model: nn.Module, x: torch.Tensor, iters: int, bn_term: Callable, input_term: Callable,
             opt: torch.optim.Optimizer, after_step: Callable) -> tuple[Optional[float], Optional[float]]:
    """Optimise the inputs ``x`` of the frozen float model (eval mode, no parameter gradients, both restored):
    loss = sum over BatchNorms of ``bn_term(bn, bn_input)`` + ``input_term(x)``. Returns the first and last
    losses. ``after_step(loss)`` steps the schedule."""
    bns = _batchnorms(model)
    was_training = model.training
    model.eval()
    req = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    terms: list = []
    handles = [m.register_forward_pre_hook(lambda m, args: terms.append(bn_term(m, args[0]))) for m in bns]
    first = last = None
    try:
        for it in range(iters):
            terms.clear()
            opt.zero_grad(set_to_none=True)
            _call(model, x)
            loss = torch.stack(terms).sum() + input_term(x)
            loss.backward()
            opt.step()
            after_step(loss)
            if it == 0:
                first = float(loss.detach())
            last = float(loss.detach())
    finally:
        for h in handles:
            h.remove()
        for p, r in req.items():
            p.requires_grad_(r)
        model.train(was_training)
    return first, last


def _disk_path(key) -> Path:
    """The distilled batch's file in the rex cache (REX_CACHE, default ~/.cache/rex): the key holds the
    weights' hash, the input shape and every setting, so a file is never reused for another model or recipe."""
    from .paths import cache_root

    return cache_root() / "zeroq" / (hashlib.sha256(repr(key).encode()).hexdigest()[:24] + ".pt")


def _cached(key, cache: bool, run: Callable) -> tuple[torch.Tensor, dict]:
    """Memory, then disk, then ``run()``. ZeroQ's own distillation takes minutes even on small inputs; a
    grid asks for the same batch once per bit-width, and a rerun after an interruption should not pay again."""
    if cache and key in _CACHE:
        data, info = _CACHE[key]
        return data.clone(), dict(info, cached=True)
    path = _disk_path(key) if cache else None
    if path is not None and path.is_file():
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            data, info = blob["data"], dict(blob["info"])
            _CACHE[key] = (data.clone(), info)
            return data, dict(info, cached=True)
        except Exception:  # noqa: BLE001 -- a corrupt cache file is recomputed and rewritten, never trusted
            pass
    data, info = run()
    if cache:
        _CACHE[key] = (data.clone(), info)
        try:
            atomic_torch_save({"data": data.clone(), "info": info}, path)
        except OSError:  # an unwritable cache costs time, not the result
            pass
    return data, info


def distill(model: nn.Module, input_shape: tuple, batch: int = 8, steps: int = 200, seed: int = 0, lr: float = 0.2,
            cache: bool = True) -> tuple[torch.Tensor, dict]:
    """Distilled inputs [batch, *input_shape[1:]] for a model with BatchNorm layers, statistics pooled over the
    batch (the cheaper variant; ``distill_zeroq`` is ZeroQ's own). Returns (data, info)."""
    def bn_term(m, a):
        dims = [0] + list(range(2, a.dim()))
        mu = a.mean(dims)  # before the variance: the op order fixes autograd's summation order, hence the bits
        sd = torch.sqrt(a.var(dims, unbiased=False) + m.eps)
        return torch.norm(mu - m.running_mean) + torch.norm(sd - torch.sqrt(m.running_var + m.eps))

    def input_term(x):
        dims = [0] + list(range(2, x.dim()))
        return torch.norm(x.mean(dims)) + torch.norm(x.std(dims) - 1)

    def run():
        _batchnorms(model)
        t0 = time.perf_counter()
        x = torch.randn((batch, *input_shape[1:]), generator=torch.Generator().manual_seed(seed)).requires_grad_(True)
        opt = torch.optim.Adam([x], lr=lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps), eta_min=lr * 0.01)
        first, last = _descend(model, x, steps, bn_term, input_term, opt, lambda loss: sched.step())
        return x.detach(), dict(seconds=time.perf_counter() - t0, steps=steps, batch=batch, seed=seed, lr=lr,
                                loss_first=first, loss_last=last, cached=False)

    return _cached((_weights_key(model), tuple(input_shape[1:]), batch, steps, seed, lr), cache, run)


# ZeroQ's own settings (its repository's classification/distill_data.py and utils/data_utils.py): Adam at lr
# 0.5 for 500 iterations, ReduceLROnPlateau(patience 100, min_lr 1e-4) on the total loss, eps 1e-6 in the
# std, inputs initialised to (randint(0, 255) - 127.5) / 5418.75 (the comment there calls 5418.75 the
# variance of U(-128, 127); it divides by it, so the start is a narrow uniform around 0: kept as is).
ZEROQ_LR, ZEROQ_ITERS, ZEROQ_BATCH, ZEROQ_EPS = 0.5, 500, 32, 1e-6


def per_sample_stats(a: torch.Tensor, eps: float = ZEROQ_EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image, per channel mean and std over the spatial positions: [B, C] each (ZeroQ's statistics; the
    batch is not pooled: every distilled image must look like a BN-normal input on its own)."""
    flat = a.reshape(a.shape[0], a.shape[1], -1)
    return flat.mean(2), torch.sqrt(flat.var(2) + eps)  # unbiased variance, as torch.var's default there


def zeroq_loss(target: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
    """ZeroQ's ``own_loss``: squared L2 distance of the [B, C] statistics to the [C] target, divided by B."""
    return (target - stats).norm() ** 2 / stats.shape[0]


def zeroq_init(shape: tuple, gen: torch.Generator) -> torch.Tensor:
    return (torch.randint(0, 255, shape, generator=gen).float() - 127.5) / 5418.75


def distill_zeroq(model: nn.Module, input_shape: tuple, batch: int = ZEROQ_BATCH, iters: int = ZEROQ_ITERS,
                  seed: int = 0, lr: float = ZEROQ_LR, cache: bool = True) -> tuple[torch.Tensor, dict]:
    """ZeroQ's distillation (Cai et al. 2020), faithful to its code: the input of every BatchNorm of the float
    model (before folding) is matched, image by image, to the BN's running mean and sqrt(var + eps)
    (``per_sample_stats``, ``zeroq_loss``), plus mean 0 / std 1 per image and channel of the input itself;
    Adam at ``lr`` with ReduceLROnPlateau for ``iters`` iterations from ZeroQ's uniform start."""
    def bn_term(m, a):
        mu, sd = per_sample_stats(a)
        return zeroq_loss(m.running_mean, mu) + zeroq_loss(torch.sqrt(m.running_var + ZEROQ_EPS), sd)

    def input_term(x):
        mu, sd = per_sample_stats(x)
        return zeroq_loss(torch.zeros(x.shape[1]), mu) + zeroq_loss(torch.ones(x.shape[1]), sd)

    def run():
        _batchnorms(model)
        t0 = time.perf_counter()
        x = zeroq_init((batch, *input_shape[1:]), torch.Generator().manual_seed(seed)).requires_grad_(True)
        opt = torch.optim.Adam([x], lr=lr)
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, min_lr=1e-4, patience=100)
        first, last = _descend(model, x, iters, bn_term, input_term, opt, lambda loss: sched.step(float(loss.detach())))
        return x.detach(), dict(algorithm="zeroq", seconds=time.perf_counter() - t0, iters=iters, batch=batch,
                                seed=seed, lr=lr, loss_first=first, loss_last=last,
                                lr_last=opt.param_groups[0]["lr"], cached=False)

    return _cached(("zeroq", _weights_key(model), tuple(input_shape[1:]), batch, iters, seed, lr), cache, run)


def activation_ranges(model: nn.Module, data: torch.Tensor, percentile: Optional[float] = None,
                      layer_types=(nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) -> dict[str, tuple[float, float]]:
    """Per weight layer, the range of its input over ``data``: [min, max], or the [100-p, p] percentiles."""
    out: dict = {}
    handles = []

    def pre(name):
        def fn(m, args):
            a = args[0].detach().float().flatten()
            if percentile is None:
                lo, hi = float(a.min()), float(a.max())
            else:
                if a.numel() > 2_000_000:  # quantile has a size limit; a strided subsample is enough
                    a = a[:: a.numel() // 2_000_000 + 1]
                lo = float(torch.quantile(a, 1 - percentile / 100))
                hi = float(torch.quantile(a, percentile / 100))
            prev = out.get(name)
            out[name] = (lo, hi) if prev is None else (min(prev[0], lo), max(prev[1], hi))
        return fn

    for name, m in model.named_modules():
        if isinstance(m, layer_types) and not getattr(m, "_rex_wrapped", False):
            handles.append(m.register_forward_pre_hook(pre(name)))
    try:
        with torch.no_grad():
            _call(model, data)
    finally:
        for h in handles:
            h.remove()
    return out
