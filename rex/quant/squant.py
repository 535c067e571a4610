"""SQuant rounding (Guo et al., ICLR 2022, "SQuant: On-the-Fly Data-Free Quantization via Diagonal Hessian
Approximation"), as a rounding rule ``fn(scaled, qmin, qmax) -> rounded float tensor`` for
:class:`rex.quant.WeightQuantizer` (``rounding=squant_round``).

``scaled`` is the weight divided by its scale (plus the zero point), shape ``C_out x C_in x k...`` (a 2-d
Linear weight is ``C_out x C_in`` with 1-element kernels). The rounding error of an element is
``e = q - scaled``. Three stages, all vectorized (no Python loop over elements, kernels or channels):

- E (element): round to nearest, |e| <= 1/2 per element.
- K (kernel): for every kernel (one output channel, one input channel, the kh*kw elements) with error sum
  S, flip ``n = round(|S|)`` roundings in the direction ``-sign(S)``: the n elements whose error has the
  sign of S and the largest magnitude (their error becomes e - sign(S), of magnitude 1 - |e| <= 1/2 more
  than needed). Afterwards |S_kernel| <= 1/2. Elements that cannot move (at the grid edge) are skipped.
- C (channel): for every output channel with error sum S_c, flip ``n_c = round(|S_c|)`` roundings, at most
  one per kernel: every kernel offers its best candidate (the element with the largest error of the sign
  of its own kernel sum, which is the last element flipped when the kernel stage overshot, or the next one
  when it undershot: the "progressive" flip of the paper), only kernels whose sum has the sign of S_c
  qualify, and the n_c with the largest candidate error are flipped. Afterwards |S_channel| <= 1/2 and,
  because a kernel moves by at most one flip, |S_kernel| <= 1 for the kernels used (<= 1/2 for the
  others), |e| < 1 per element.

This is the algorithm of the paper (its reference code flips with the same priorities); the
implementation here is our own, in pure PyTorch. ``stages`` selects "e", "ek", "ec" or "ekc" (default,
SQuant-E/K/C ablations).
"""
from __future__ import annotations

import torch

STAGES = ("e", "ek", "ec", "ekc")


def _flip_groups(q: torch.Tensor, e: torch.Tensor, qmin: int, qmax: int) -> None:
    """One SQuant stage on groups along the last dim: q, e are [G, L] views (modified in place)."""
    s = e.sum(-1)  # [G]
    n = torch.round(s.abs())  # flips needed per group (ties to even: exactly 0.5 needs no flip)
    if not bool((n > 0).any()):
        return
    sign = torch.sign(s).unsqueeze(-1)  # direction of the excess; flips move q by -sign
    room = torch.where(sign > 0, q > qmin, q < qmax)
    cand = (e * sign > 0) & room
    prio = torch.where(cand, e.abs(), torch.full_like(e, -1.0))
    kmax = min(int(n.max()), e.shape[-1])
    order = torch.topk(prio, kmax, dim=-1).indices  # only the kmax best per group are ever flipped
    rank_ok = torch.arange(kmax, device=e.device).unsqueeze(0) < n.unsqueeze(-1)
    take = torch.zeros_like(cand)
    take.scatter_(-1, order, rank_ok)
    take &= cand
    step = -sign * take.to(q.dtype)
    q += step
    e += step


def _channel_stage(q: torch.Tensor, e: torch.Tensor, qmin: int, qmax: int) -> None:
    """Channel stage on [C, K, L] (C output channels, K kernels of L elements), in place, <= 1 flip per kernel."""
    c, k, l = e.shape
    sk = e.sum(-1)  # [C, K] kernel sums
    sc = sk.sum(-1)  # [C] channel sums
    n = torch.round(sc.abs())
    if not bool((n > 0).any()):
        return
    sign_c = torch.sign(sc)  # [C]
    sign_k = torch.sign(sk)  # [C, K]
    # each kernel's candidate: the element with the largest error of the sign of the channel sum
    room = torch.where(sign_c.view(c, 1, 1) > 0, q > qmin, q < qmax)
    elem_ok = (e * sign_c.view(c, 1, 1) > 0) & room
    elem_prio = torch.where(elem_ok, e.abs(), torch.full_like(e, -1.0))
    best_prio, best_idx = elem_prio.max(-1)  # [C, K]
    kernel_ok = (sign_k == sign_c.view(c, 1)) & (best_prio >= 0)
    kprio = torch.where(kernel_ok, best_prio, torch.full_like(best_prio, -1.0))
    kmax = min(int(n.max()), k)
    order = torch.topk(kprio, kmax, dim=-1).indices
    rank_ok = torch.arange(kmax, device=e.device).unsqueeze(0) < n.unsqueeze(-1)
    take = torch.zeros_like(kernel_ok)
    take.scatter_(-1, order, rank_ok)
    take &= kernel_ok  # [C, K]
    step = torch.zeros_like(e)
    step.scatter_(-1, best_idx.unsqueeze(-1), (-sign_c.view(c, 1) * take.to(e.dtype)).unsqueeze(-1))
    q += step
    e += step


def squant_round(scaled: torch.Tensor, qmin: int, qmax: int, stages: str = "ekc") -> torch.Tensor:
    """SQuant rounding of a scaled weight (C_out x C_in x ...), returns the rounded float tensor on [qmin, qmax]."""
    if stages not in STAGES:
        raise ValueError(f"SQuant stages must be one of {STAGES}, got {stages!r}")
    x = scaled.detach()
    q = torch.clamp(torch.round(x), qmin, qmax)
    if x.dim() < 2 or x.numel() == 0:
        return q
    dtype = torch.float64  # error sums over large channels stay exact enough
    xd = x.to(dtype)
    qd = q.to(dtype)
    c, cin = x.shape[0], x.shape[1]
    qv = qd.reshape(c, cin, -1)
    ev = qv - xd.reshape(c, cin, -1)
    if "k" in stages and qv.shape[-1] > 1:
        qk, ek = qv.reshape(c * cin, -1), ev.reshape(c * cin, -1)
        _flip_groups(qk, ek, qmin, qmax)
    if "c" in stages:
        _channel_stage(qv, ev, qmin, qmax)
    return qv.reshape(x.shape).to(scaled.dtype)


def make_squant_rounding(stages: str = "ekc"):
    """A rounding function with the given stages, for ``WeightQuantizer(rounding=...)``."""
    if stages not in STAGES:
        raise ValueError(f"SQuant stages must be one of {STAGES}, got {stages!r}")

    def fn(scaled: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
        return squant_round(scaled, qmin, qmax, stages)

    fn.__name__ = f"squant_{stages}"
    return fn


def rounding_sums(q: torch.Tensor, scaled: torch.Tensor) -> dict:
    """Max |error| per element, per kernel sum and per output-channel sum (for tests and reports)."""
    e = (q.double() - scaled.double())
    c, cin = e.shape[0], e.shape[1] if e.dim() > 1 else 1
    ev = e.reshape(c, cin, -1)
    return dict(element=float(ev.abs().max()), kernel=float(ev.sum(-1).abs().max()),
                channel=float(ev.reshape(c, -1).sum(-1).abs().max()))
