"""Functional EWC-Adam: the one place that picks an implementation.

:func:`ewc_adam` updates lists of tensors in place. Per element::

    g      ← −g if maximize;   g ← g + λ·F·(θ − c)                    (EWC)
    F_run  ← β_F·F_run + (1 − β_F)·s,   s = g² or a given buffer      (running Fisher)
    then coupled (g ← g + wd·θ) or decoupled (θ ← θ(1 − lr·wd)) weight decay, then Adam/AMSGrad.

Backends:

* ``"triton"``: :mod:`ewc_fused.kernels.ewc_adam`, one fused pass over memory.
* ``"torch"``: the penalty gradient with foreach ops over groups of at most
  :data:`GROUP_NUMEL` elements (temporaries bounded by that, or by the largest
  tensor), handed to ``torch.optim.adam.adam`` (its fused kernel where the device
  has one): the same numbers wherever torch runs, and torch's Adam itself for
  tensors without EWC state (bit-identical with the same ``fused``/``foreach`` flags).
"""
from __future__ import annotations

import dataclasses

import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import torch
from torch import Tensor

from .distributed import is_dtensor, local_list

__all__ = ["ewc_adam", "resolve_backend", "triton_available", "interpreter_enabled", "GROUP_NUMEL"]

BACKENDS = ("auto", "triton", "torch")
# Elements per foreach group in the torch backend: bounds its temporaries.
GROUP_NUMEL = 1 << 20
# torch backend on CPU: tensors of at least LARGE_NUMEL elements get their penalty in a scratch of
# CHUNK_NUMEL elements (4 MiB of fp32: it stays in cache between the penalty and Adam).
LARGE_NUMEL = 1 << 16
CHUNK_NUMEL = 1 << 20


@lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when ``triton`` imports (its kernels are imported only on use)."""
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - depends on the install
        return False
    return True


def interpreter_enabled() -> bool:
    """True when the Triton interpreter is on (kernels then run on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map ``"auto"``/``"triton"``/``"torch"`` to the backend used for ``device``.

    ``"auto"`` is triton for CUDA tensors when Triton imports, else torch.
    ``"triton"`` needs CUDA tensors, or CPU tensors with ``TRITON_INTERPRET=1``.
    """
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' needs the triton package: pip install triton")
        if device.type == "cuda" or (device.type == "cpu" and interpreter_enabled()):
            return "triton"
        raise ValueError(
            f"backend='triton' needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1); "
            f"got a parameter on {device}. Use backend='auto' or 'torch'."
        )
    raise ValueError(f"Invalid backend: {backend!r}; expected one of {BACKENDS}")


@dataclass
class Hyper:
    """Per-group scalars of one step."""

    lr: float | Tensor
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    amsgrad: bool
    maximize: bool
    decoupled_weight_decay: bool
    ewc_lambda: float
    fisher_beta: float
    sq_scale: float = 1.0  # the running Fisher takes sq_scale · s when a squared-gradient source s is given
    foreach: Optional[bool] = None
    fused: Optional[bool] = None
    capturable: bool = False


def ewc_adam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    fishers: Optional[list[Tensor]],
    anchors: Optional[list[Tensor]],
    fisher_runs: Optional[list[Tensor]],
    sq_sources: Optional[list[Tensor]],
    hyper: Hyper,
    *,
    backend: str,
    grad_scale: Optional[Tensor] = None,
    found_inf: Optional[Tensor] = None,
) -> None:
    """One EWC-Adam step over one bucket (one device, one parameter dtype).

    ``grad_scale``/``found_inf`` (one-element fp32 tensors on the bucket's device, as
    ``torch.amp.GradScaler`` hands them to a step that unscales): the gradients are
    g / grad_scale (squared-gradient sources / grad_scale²), and a non-zero found_inf
    skips the whole update, step counts and running Fisher included.

    ``fishers``/``anchors`` None: no penalty; ``fisher_runs`` None: no running
    Fisher; ``sq_sources`` None: the running Fisher takes g², else
    ``hyper.sq_scale`` · sq_sources. ``state_steps`` are
    incremented here (once per step), like ``torch.optim.adam.adam`` does.
    DTensors (FSDP2) are updated through their local shards, so each row must
    share the parameter's mesh and placements (``FusedEWCAdam.step`` checks that).
    """
    if not params:
        return
    if any(is_dtensor(p) for p in params):  # FSDP2: elementwise, so exact on local shards
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, fishers, anchors, fisher_runs, sq_sources = (
            local_list(ts) for ts in (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, fishers, anchors,
                                      fisher_runs, sq_sources))
    if backend == "triton" and all(_kernel_compatible(t) for t in _rows(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, fishers, anchors, fisher_runs, sq_sources)):
        _triton_ewc_adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps,
                         fishers, anchors, fisher_runs, sq_sources, hyper, grad_scale, found_inf)
        return
    if found_inf is not None and bool(found_inf.item()):  # host sync: the torch backend's only way to skip
        return
    if grad_scale is not None:  # unscale in place, as GradScaler.unscale_ would have
        inv = 1.0 / float(grad_scale.item())
        torch._foreach_mul_(grads, inv)
        if sq_sources is not None:
            hyper = dataclasses.replace(hyper, sq_scale=hyper.sq_scale * inv * inv)
    _torch_ewc_adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps,
                    fishers, anchors, fisher_runs, sq_sources, hyper)


def _rows(*lists):
    lists = [l for l in lists if l]
    return list(zip(*lists))


def _kernel_compatible(row: tuple[Tensor, ...]) -> bool:
    """The kernel walks flat memory: every tensor must be dense with θ's strides, and it
    stores fp32/fp16/bf16 (float64 rows take the torch path, which keeps float64 math)."""
    if any(t.dtype not in (torch.float32, torch.float16, torch.bfloat16) for t in row):
        return False
    return _dense_layout_shared(row)


def _dense_non_overlapping(t: Tensor) -> bool:
    dims = sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1)
    expected = 1
    for s, n in dims:
        if s != expected:
            return False
        expected *= n
    return True


def _triton_ewc_adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps,
                     fishers, anchors, fisher_runs, sq_sources, h: Hyper, grad_scale=None, found_inf=None) -> None:
    from ewc_fused.kernels.ewc_adam import ewc_adam_

    lr = h.lr
    if isinstance(lr, Tensor) and lr.device != params[0].device:
        lr = lr.to(params[0].device, non_blocking=True)
    torch._foreach_add_(state_steps, 1)
    ewc_adam_(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs if h.amsgrad else None,
        fishers, anchors, fisher_runs, sq_sources, state_steps,
        lr=lr, beta1=h.beta1, beta2=h.beta2, eps=h.eps, weight_decay=h.weight_decay,
        ewc_lambda=h.ewc_lambda, fisher_beta=h.fisher_beta, amsgrad=h.amsgrad,
        maximize=h.maximize, decoupled_weight_decay=h.decoupled_weight_decay, sq_scale=h.sq_scale,
        grad_scale=grad_scale, found_inf=found_inf,
    )
    if found_inf is not None:  # a skipped step does not count (as torch's fused Adam)
        torch._foreach_sub_(state_steps, [found_inf.reshape(())] * len(state_steps))


def _groups_by_numel(n: int, numels: list[int], budget: int = GROUP_NUMEL):
    """Consecutive index ranges whose element count stays within ``budget``."""
    start, total = 0, 0
    for i, k in enumerate(numels):
        if i > start and total + k > budget:
            yield start, i
            start, total = i, 0
        total += k
    if start < n:
        yield start, n


def _match_layout(params: list[Tensor], grads: list[Tensor]) -> list[Tensor]:
    """Gradients laid out like their parameters.

    torch's fused CPU Adam walks θ and g as flat memory, so a channels-last θ
    with a contiguous g silently mixes elements (seen with torch 2.13); a copy
    in θ's layout is made for such pairs only.
    """
    out = list(grads)
    for i, (p, g) in enumerate(zip(params, grads)):
        if g.stride() != p.stride() and p.numel() > 1:
            out[i] = torch.empty_like(p).copy_(g)
    return out


def _dense_layout_shared(row: tuple[Tensor, ...]) -> bool:
    """Every tensor of the row dense and laid out like θ, so flat views correspond."""
    p = row[0]
    if p.is_contiguous():
        return all(t.is_contiguous() for t in row)
    return _dense_non_overlapping(p) and all(t.stride() == p.stride() for t in row)


def _flat(t: Tensor) -> Tensor:
    """The elements of a dense tensor in memory order, as a 1-D view."""
    return t.view(-1) if t.is_contiguous() else t.as_strided((t.numel(),), (1,), t.storage_offset())


def _penalty_adam_chunked(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps,
                          fishers, anchors, lam, work, amsgrad, kw) -> None:
    """torch backend, large dense tensors: g + λF(θ − c) is formed chunk by chunk (at most
    CHUNK_NUMEL elements) in one reused scratch buffer, and torch's Adam steps the matching
    flat views of θ, m, v, so the penalty never allocates a full-size temporary and is still
    in cache when Adam reads it. The same operations as the foreach path: bit-identical.
    Chunks after a tensor's first get copies of its step count taken before any update."""
    from torch.optim.adam import adam

    p_dtype = params[0].dtype
    items = []  # (θ, g, m, v, v̂max, F, c, step) chunk views
    for i, p in enumerate(params):
        n = p.numel()
        flats = [_flat(t) for t in (p, grads[i], exp_avgs[i], exp_avg_sqs[i],
                                    max_exp_avg_sqs[i] if amsgrad else p, fishers[i], anchors[i])]
        for k, s in enumerate(range(0, n, CHUNK_NUMEL)):
            step = state_steps[i] if k == 0 else state_steps[i].clone()
            items.append(tuple(f[s:s + CHUNK_NUMEL] for f in flats) + (step,))
    scratch = torch.empty(min(CHUNK_NUMEL, sum(it[0].numel() for it in items)), dtype=work, device=params[0].device)
    cast = None if work == p_dtype else torch.empty(scratch.numel(), dtype=p_dtype, device=scratch.device)

    def flush(group) -> None:
        pens, off = [], 0
        for th, g, _, _, _, f, c, _ in group:
            b = scratch[off:off + th.numel()]
            torch.sub(th, c, out=b)
            torch.addcmul(g, f, b, value=lam, out=b)
            if cast is not None:
                b = cast[off:off + th.numel()].copy_(b)
            pens.append(b)
            off += th.numel()
        adam([it[0] for it in group], pens, [it[2] for it in group], [it[3] for it in group],
             [it[4] for it in group] if amsgrad else [], [it[7] for it in group], **kw)

    group, used = [], 0
    for it in items:
        if group and used + it[0].numel() > scratch.numel():
            flush(group)
            group, used = [], 0
        group.append(it)
        used += it[0].numel()
    if group:
        flush(group)


def _torch_ewc_adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps,
                    fishers, anchors, fisher_runs, sq_sources, h: Hyper) -> None:
    from torch.optim.adam import adam

    if fisher_runs is not None:
        b = h.fisher_beta
        torch._foreach_mul_(fisher_runs, b)
        if sq_sources is not None:
            torch._foreach_add_(fisher_runs, sq_sources, alpha=(1.0 - b) * h.sq_scale)
        else:
            torch._foreach_addcmul_(fisher_runs, grads, grads, value=1.0 - b)

    use_fused = h.fused
    # torch's fused Adam walks θ, g, m, v as flat memory: all must be dense and share θ's layout
    # (torch 2.13 silently mixes elements otherwise, with fused=True too).
    flat_ok = (
        all(_dense_non_overlapping(p) for p in params)
        and all(t.stride() == p.stride() for ts in (exp_avgs, exp_avg_sqs, max_exp_avg_sqs if h.amsgrad else [])
                for p, t in zip(params, ts))
    )
    if use_fused is None and h.foreach is None:
        # Fused where torch has the kernel for this device and dtype, as optim.Adam(fused=True).
        from torch.optim.optimizer import _get_fused_kernels_supported_devices

        use_fused = (
            params[0].device.type in _get_fused_kernels_supported_devices()
            and params[0].dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64)
            and flat_ok
        )
    elif use_fused and not flat_ok:
        use_fused = False  # fused=True on such layouts: torch's foreach Adam, the same update
    kw = dict(
        foreach=h.foreach, fused=use_fused, capturable=h.capturable,
        decoupled_weight_decay=h.decoupled_weight_decay, amsgrad=h.amsgrad,
        beta1=h.beta1, beta2=h.beta2, lr=h.lr, weight_decay=h.weight_decay,
        eps=h.eps, maximize=h.maximize,
    )
    if fishers is None:
        grads = _match_layout(params, grads)
        adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs if h.amsgrad else [], state_steps, **kw)
        return

    # g + λF(θ − c) (under maximize g − λF(θ − c): adam negates it), computed in the
    # promoted dtype of θ and the EWC state (fp32 for bf16 θ). Large dense tensors: chunk by
    # chunk in a reused cache-sized scratch; the rest: foreach over bounded groups.
    lam = -h.ewc_lambda if h.maximize else h.ewc_lambda
    p_dtype = params[0].dtype
    work = torch.promote_types(p_dtype, fishers[0].dtype)
    rows = _rows(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs if h.amsgrad else [], fishers, anchors)
    # (CPU only: the chunks are sized for a CPU cache; on a GPU they would only multiply launches)
    large = [i for i, r in enumerate(rows) if r[0].numel() >= LARGE_NUMEL and _dense_layout_shared(r)] \
        if params[0].device.type == "cpu" else []
    if large:
        def pick(ts):
            return [ts[i] for i in large]

        _penalty_adam_chunked(
            pick(params), pick(grads), pick(exp_avgs), pick(exp_avg_sqs),
            pick(max_exp_avg_sqs) if h.amsgrad else [], pick(state_steps), pick(fishers), pick(anchors),
            lam, work, h.amsgrad, kw)
        if len(large) == len(params):
            return
        rest = sorted(set(range(len(params))) - set(large))

        def keep(ts):
            return [ts[i] for i in rest]

        params, grads, exp_avgs, exp_avg_sqs = keep(params), keep(grads), keep(exp_avgs), keep(exp_avg_sqs)
        max_exp_avg_sqs = keep(max_exp_avg_sqs) if h.amsgrad else max_exp_avg_sqs
        state_steps, fishers, anchors = keep(state_steps), keep(fishers), keep(anchors)

    def as_work(ts):
        return list(ts) if ts[0].dtype == work else [t.to(work) for t in ts]

    for s, e in _groups_by_numel(len(params), [p.numel() for p in params]):
        diff = torch._foreach_sub(as_work(params[s:e]), as_work(anchors[s:e]))
        pen = torch._foreach_addcmul(as_work(grads[s:e]), as_work(fishers[s:e]), diff, value=lam)
        del diff
        if work != p_dtype:
            pen = [t.to(p_dtype) for t in pen]
        pen = _match_layout(params[s:e], pen)
        adam(
            params[s:e], pen, exp_avgs[s:e], exp_avg_sqs[s:e],
            max_exp_avg_sqs[s:e] if h.amsgrad else [], state_steps[s:e], **kw,
        )
