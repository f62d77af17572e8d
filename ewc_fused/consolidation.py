r"""Consolidation math: many EWC penalties stored exactly in O(1) memory.

For tasks t with Fisher F_t and anchor θ*_t, per element

.. math::
    \sum_t F_t(\theta-\theta^*_t)^2 = F(\theta-c)^2 + K,\qquad
    F=\sum_t F_t,\quad c=\frac{\sum_t F_t\theta^*_t}{F},\quad
    K=\sum_t F_t{\theta^*_t}^2 - F c^2 \ge 0,

so the gradient λF(θ − c) equals the sum of the separate gradients and the
penalty value is exact when the scalar Σ_i K_i is kept. Adding a task (F_n, θ)
to (F_o, c_o) is the stable update

.. math::
    F' = F_o + F_n,\quad c' = \theta + \tfrac{F_o}{F'}(c_o-\theta),\quad
    K' = K + \tfrac{F_o F_n}{F'}(c_o-\theta)^2 .

Online EWC replaces the anchor instead: F' = γF_o + F_n, c' = θ, K' = 0.
The merge is done in float64 and stored in the optimizer's ``ewc_dtype``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def combine(
    theta: Tensor,
    f_new: Tensor,
    f_old: Optional[Tensor],
    c_old: Optional[Tensor],
    k_old: Optional[Tensor],
    *,
    mode: str,
    decay: float,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor]:
    """Return the new (F, c, K) after adding a task with Fisher ``f_new`` at ``theta``.

    F and c keep ``theta``'s memory format in ``dtype``; K is a float64 scalar on the CPU.
    """
    th = theta.to(torch.float64)
    fn = f_new.to(device=theta.device, dtype=torch.float64)
    if f_old is None:
        f = fn
        c = th
        k = torch.zeros((), dtype=torch.float64)
    else:
        fo = f_old.to(torch.float64) * decay
        f = fo + fn
        if mode == "online":
            c = th
            k = torch.zeros((), dtype=torch.float64)
        else:
            co = c_old.to(torch.float64)
            safe = torch.where(f > 0, f, torch.ones_like(f))
            w = torch.where(f > 0, fo / safe, torch.zeros_like(f))
            c = th + w * (co - th)
            k = k_old.to(torch.float64) * decay + (w * fn * (co - th) ** 2).sum().cpu()
    return _like(f, theta, dtype), _like(c, theta, dtype), k


def _like(x: Tensor, theta: Tensor, dtype: torch.dtype) -> Tensor:
    out = torch.empty_like(theta, dtype=dtype, memory_format=torch.preserve_format)
    out.copy_(x)
    return out


def quadratic(theta: Tensor, f: Tensor, c: Tensor, k: Tensor) -> Tensor:
    """Σ_i F_i (θ_i − c_i)² + K as a float64 scalar (the penalty is λ/2 times this)."""
    d = theta.to(torch.float64) - c.to(torch.float64)
    return (f.to(torch.float64) * d * d).sum() + k.to(device=theta.device, dtype=torch.float64)


def check_fisher(f: object, p: Tensor, label: str) -> None:
    """Raise a clear error unless ``f`` is a valid Fisher tensor for parameter ``p``."""
    if not isinstance(f, Tensor):
        raise TypeError(f"Fisher for parameter {label} must be a tensor, got {type(f).__name__}")
    if not f.is_floating_point():
        raise TypeError(f"Fisher for parameter {label} must be floating point, got {f.dtype}")
    if tuple(f.shape) != tuple(p.shape):
        raise ValueError(
            f"Fisher for parameter {label} has shape {tuple(f.shape)}, expected {tuple(p.shape)}"
        )
    if f.device != p.device:
        raise ValueError(f"Fisher for parameter {label} is on {f.device}, but the parameter is on {p.device}")
    if f.numel() == 0:
        return
    if not bool(torch.isfinite(f).all()):
        raise ValueError(f"Fisher for parameter {label} has non-finite values (NaN or inf)")
    if bool((f < 0).any()):
        raise ValueError(f"Fisher for parameter {label} has negative values (min {float(f.min()):.3g})")


def describe(p: Tensor, where: tuple[int, int, Optional[str]]) -> str:
    """A human name for a parameter: its name, or its position and shape."""
    gi, j, name = where
    if name is not None:
        return repr(name)
    return f"{j} of param group {gi} (shape {tuple(p.shape)})"
