"""ZeroQ distilled data (Cai et al., CVPR 2020), used here only to set activation ranges.

``distill(model, shape, batch, steps, seed)`` optimizes a batch of inputs, initialised N(0, 1), with Adam so
that, at every BatchNorm of the float model (before folding), the batch statistics of the BN input match
the running statistics:

    loss = sum_BN ||mu_batch - running_mean||_2 + ||sigma_batch - sqrt(running_var + eps)||_2
           + ||mu_input - 0||_2 + ||sigma_input - 1||_2          (the input itself, per channel, as in ZeroQ)

``activation_ranges(folded_model, data)`` then runs the distilled batch through the (BN-folded, prepared)
model and returns per weight layer the [min, max] of its input (or a two-sided percentile), the
``range_override`` of the engine. Nothing else uses the distilled data: weights are quantized exactly as
RTN. Distillation is seeded (``seed``) and cached in memory per (weights, shape, batch, steps, seed, lr).
"""
from __future__ import annotations

import hashlib
import time
from typing import Optional

import torch
from torch import nn

from .cost import _call

_CACHE: dict = {}


def _weights_key(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        if t.is_floating_point():
            h.update(f"{float(t.double().sum()):.10e}|{float(t.double().abs().sum()):.10e}|{tuple(t.shape)}".encode())
    return h.hexdigest()[:16]


def distill(model: nn.Module, input_shape: tuple, batch: int = 8, steps: int = 200, seed: int = 0, lr: float = 0.2,
            cache: bool = True, log_every: int = 0) -> tuple[torch.Tensor, dict]:
    """Distilled inputs [batch, *input_shape[1:]] for a model with BatchNorm layers. Returns (data, info)."""
    key = (_weights_key(model), tuple(input_shape[1:]), batch, steps, seed, lr)
    if cache and key in _CACHE:
        data, info = _CACHE[key]
        return data.clone(), dict(info, cached=True)
    t0 = time.perf_counter()
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None]
    if not bns:
        from .errors import ConfigError

        raise ConfigError("ZeroQ needs a model with BatchNorm layers (their running statistics are the distillation "
                          "target); this model has none")
    was_training = model.training
    model.eval()
    req = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, *input_shape[1:]), generator=gen).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps), eta_min=lr * 0.01)
    losses: list = []

    def hook(m, args):
        a = args[0]
        dims = [0] + list(range(2, a.dim()))
        mu = a.mean(dims)
        sd = torch.sqrt(a.var(dims, unbiased=False) + m.eps)
        losses.append(torch.norm(mu - m.running_mean) + torch.norm(sd - torch.sqrt(m.running_var + m.eps)))

    handles = [m.register_forward_pre_hook(hook) for m in bns]
    history = []
    try:
        for step in range(steps):
            losses.clear()
            opt.zero_grad(set_to_none=True)
            _call(model, x)
            dims = [0] + list(range(2, x.dim()))
            in_loss = torch.norm(x.mean(dims)) + torch.norm(x.std(dims) - 1)
            loss = torch.stack(losses).sum() + in_loss
            loss.backward()
            opt.step()
            sched.step()
            if step == 0 or step == steps - 1 or (log_every and step % log_every == 0):
                history.append((step, float(loss.detach())))
    finally:
        for h in handles:
            h.remove()
        for p, r in req.items():
            p.requires_grad_(r)
        model.train(was_training)
    data = x.detach()
    info = dict(seconds=time.perf_counter() - t0, steps=steps, batch=batch, seed=seed, lr=lr,
                loss_first=history[0][1] if history else None, loss_last=history[-1][1] if history else None,
                cached=False)
    if cache:
        _CACHE[key] = (data.clone(), info)
    return data, info


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
    key = ("zeroq", _weights_key(model), tuple(input_shape[1:]), batch, iters, seed, lr)
    if cache and key in _CACHE:
        data, info = _CACHE[key]
        return data.clone(), dict(info, cached=True)
    bns = _batchnorms(model)
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    req = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    x = zeroq_init((batch, *input_shape[1:]), gen).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, min_lr=1e-4, patience=100)
    terms: list = []

    def hook(m, args):
        mu, sd = per_sample_stats(args[0])
        terms.append(zeroq_loss(m.running_mean, mu) + zeroq_loss(torch.sqrt(m.running_var + ZEROQ_EPS), sd))

    handles = [m.register_forward_pre_hook(hook) for m in bns]
    history = []
    try:
        for it in range(iters):
            terms.clear()
            opt.zero_grad(set_to_none=True)
            _call(model, x)
            mu, sd = per_sample_stats(x)
            loss = torch.stack(terms).sum() + zeroq_loss(torch.zeros(x.shape[1]), mu) + \
                zeroq_loss(torch.ones(x.shape[1]), sd)
            loss.backward()
            opt.step()
            sched.step(float(loss.detach()))
            if it in (0, iters - 1):
                history.append(float(loss.detach()))
    finally:
        for h in handles:
            h.remove()
        for p, r in req.items():
            p.requires_grad_(r)
        model.train(was_training)
    data = x.detach()
    info = dict(algorithm="zeroq", seconds=time.perf_counter() - t0, iters=iters, batch=batch, seed=seed, lr=lr,
                loss_first=history[0] if history else None, loss_last=history[-1] if history else None,
                lr_last=opt.param_groups[0]["lr"], cached=False)
    if cache:
        _CACHE[key] = (data.clone(), info)
    return data, info


def _batchnorms(model: nn.Module) -> list:
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None]
    if not bns:
        from .errors import ConfigError

        raise ConfigError("ZeroQ needs a model with BatchNorm layers (their running statistics are the distillation "
                          "target); this model has none: n/a (no BatchNorm)")
    return bns


def activation_ranges(model: nn.Module, data: torch.Tensor, percentile: Optional[float] = None,
                      layer_types=(nn.Conv2d, nn.Linear)) -> dict[str, tuple[float, float]]:
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
