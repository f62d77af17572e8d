"""Textbook EWC, the oracle of every test and the "unfused EWC" of every benchmark.

Plain and obvious on purpose: the penalty (λ/2) Σ_t Σ_i F_t,i (θ_i − θ*_t,i)² is
built through autograd in a Python loop over parameters, one term per task, and
its gradient is added by ``backward()`` before ``torch.optim.Adam`` steps. The
Fisher is a loop over single samples. Nothing here is fast.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor, nn

__all__ = ["EWCPenalty", "ReferenceEWCAdam", "per_sample_fisher"]

Key = Union[str, Tensor]


def _named(params: Iterable) -> list[tuple[Optional[str], Tensor]]:
    out = []
    for item in params:
        if isinstance(item, tuple):
            out.append((item[0], item[1]))
        else:
            out.append((None, item))
    return out


class EWCPenalty:
    """The EWC penalty with every task's (F_t, θ*_t) kept separately.

    ``terms[i]`` is the list of (F_t, θ*_t) of parameter i. ``consolidate`` in
    mode "multi" scales the old terms by ``decay`` and appends one; "online"
    merges them into one term F = decay·Σ F_t + F_new anchored at θ now.
    """

    def __init__(self, params: Iterable) -> None:
        self.named = _named(params)
        self.terms: list[list[tuple[Tensor, Tensor]]] = [[] for _ in self.named]

    def _index(self, key: Key) -> int:
        for i, (name, p) in enumerate(self.named):
            if (isinstance(key, str) and key == name) or key is p:
                return i
        raise KeyError(f"unknown parameter {key!r}")

    @torch.no_grad()
    def consolidate(self, fisher: Mapping[Key, Tensor], *, mode: str = "multi", decay: float = 1.0) -> None:
        for key, f in fisher.items():
            i = self._index(key)
            p = self.named[i][1]
            if not p.requires_grad:
                continue
            f = f.detach().to(p.dtype).clone()
            if mode == "multi":
                self.terms[i] = [(fo * decay, a) for fo, a in self.terms[i]]
                self.terms[i].append((f, p.detach().clone()))
            elif mode == "online":
                total = f
                for fo, _ in self.terms[i]:
                    total = total + decay * fo
                self.terms[i] = [(total, p.detach().clone())]
            else:
                raise ValueError(mode)

    def penalty(self, ewc_lambda: Union[float, Callable[[int], float]] = 1.0, only: Optional[set] = None) -> Tensor:
        """(λ/2) Σ_i Σ_t F_t (θ − θ*_t)², through autograd. ``ewc_lambda`` is a float
        or a function of the parameter index; ``only`` limits the sum to those indices."""
        total = torch.zeros(())
        for i, (_, p) in enumerate(self.named):
            if only is not None and i not in only:
                continue
            lam = ewc_lambda(i) if callable(ewc_lambda) else ewc_lambda
            for f, anchor in self.terms[i]:
                total = total + (lam / 2) * (f * (p - anchor) ** 2).sum()
        return total


class ReferenceEWCAdam:
    """``torch.optim.Adam`` stepping task gradient + autograd penalty gradient.

    Usage mirrors :class:`ewc_fused.FusedEWCAdam`: after ``task_loss.backward()``,
    ``step()`` records the running Fisher from the task gradient (if
    ``fisher_ema``), adds the penalty's gradient by ``backward()`` (negated under
    ``maximize`` so the penalty always pulls toward θ*), then steps Adam. As in
    torch, parameters whose ``grad`` is None are not stepped (and get no penalty).
    Param groups may carry their own ``ewc_lambda`` and ``fisher_ema``.
    """

    def __init__(self, params: Any, *, ewc_lambda: float = 1.0, fisher_ema: Optional[float] = None,
                 **adam_kwargs: Any) -> None:
        params = list(params)
        if params and isinstance(params[0], dict):
            groups = [dict(g) for g in params]
        else:
            groups = [{"params": params}]
        for g in groups:
            g.setdefault("ewc_lambda", ewc_lambda)
            g.setdefault("fisher_ema", fisher_ema)
        self.opt = torch.optim.Adam(groups, **adam_kwargs)
        self.groups = self.opt.param_groups
        all_params = []
        for g in self.groups:
            names = g.get("param_names") or [None] * len(g["params"])
            all_params.extend(zip(names, g["params"]))
        self.ewc = EWCPenalty(all_params)
        self.group_of = [gi for gi, g in enumerate(self.groups) for _ in g["params"]]
        self.fisher_run: dict[int, Tensor] = {}
        self.fisher_count: dict[int, int] = {}

    def zero_grad(self) -> None:
        self.opt.zero_grad()

    def _lambda(self, i: int) -> float:
        return self.groups[self.group_of[i]]["ewc_lambda"]

    def penalty(self) -> Tensor:
        return self.ewc.penalty(self._lambda)

    def step(self) -> None:
        with_grad = set()
        for i, (_, p) in enumerate(self.ewc.named):
            if p.grad is None:
                continue
            with_grad.add(i)
            beta = self.groups[self.group_of[i]]["fisher_ema"]
            if beta is not None:
                g2 = p.grad.detach() ** 2
                self.fisher_run[i] = beta * self.fisher_run.get(i, torch.zeros_like(g2)) + (1 - beta) * g2
                self.fisher_count[i] = self.fisher_count.get(i, 0) + 1
        pen = self.ewc.penalty(self._lambda, only=with_grad)
        if pen.requires_grad:
            sign = [(-1.0 if self.groups[self.group_of[i]]["maximize"] else 1.0) for i in range(len(self.ewc.named))]
            grads = torch.autograd.grad(pen, [self.ewc.named[i][1] for i in sorted(with_grad)], allow_unused=True)
            for i, g in zip(sorted(with_grad), grads):
                if g is not None:
                    self.ewc.named[i][1].grad.add_(sign[i] * g)
        self.opt.step()

    def running_fisher(self) -> dict[Key, Tensor]:
        out = {}
        for i, f in self.fisher_run.items():
            name, p = self.ewc.named[i]
            beta = self.groups[self.group_of[i]]["fisher_ema"]
            out[name if name is not None else p] = f / (1 - beta ** self.fisher_count[i])
        return out

    def consolidate(self, fisher: Optional[Mapping[Key, Tensor]] = None, *, mode: str = "multi",
                    decay: float = 1.0) -> None:
        self.ewc.consolidate(self.running_fisher() if fisher is None else fisher, mode=mode, decay=decay)


def per_sample_fisher(
    model: nn.Module,
    data: Iterable,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    *,
    mode: str = "empirical",
) -> dict[str, Tensor]:
    """Diagonal Fisher by a loop over single samples: F = (1/N) Σ_n E[∇ℓ_n²].

    ``data`` yields (inputs, targets) batches with inputs a tensor; ``loss_fn``
    returns per-sample losses. Modes: ``"empirical"`` (gradient at the true
    target), ``"exact"`` (Σ_c p_c ∇ℓ(x, c)² under the model's softmax over the
    last dim), ``"batch"`` (mean over batches of the squared gradient of the
    batch-mean loss). Returns {name: F} for parameters that require grad.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    acc = [torch.zeros_like(p) for p in params]
    count = 0
    for inputs, targets in data:
        if mode == "batch":
            grads = torch.autograd.grad(loss_fn(model(inputs), targets).mean(), params)
            for a, g in zip(acc, grads):
                a += g ** 2
            count += 1
            continue
        for n in range(inputs.shape[0]):
            x, y = inputs[n : n + 1], targets[n : n + 1]
            if mode == "empirical":
                grads = torch.autograd.grad(loss_fn(model(x), y).sum(), params)
                for a, g in zip(acc, grads):
                    a += g ** 2
            elif mode == "exact":
                logits = model(x)
                probs = torch.softmax(logits.detach(), dim=-1)[0]
                for c in range(logits.shape[-1]):
                    yc = torch.full_like(y, c)
                    grads = torch.autograd.grad(loss_fn(model(x), yc).sum(), params)
                    for a, g in zip(acc, grads):
                        a += probs[c] * g ** 2
            else:
                raise ValueError(f"Invalid mode: {mode!r}")
            count += 1
    return {n: a / count for (n, _), a in zip(named, acc)}
