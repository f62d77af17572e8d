"""Per-sample Fisher tracked during training, folded into the optimizer step.

:meth:`FusedEWCAdam.track_fisher` installs the hooks of :func:`ewc_fused.estimate_fisher`
on the *training* forward/backward: a forward hook saves each module's input X
(a detached view of what autograd saves anyway) and puts a tensor hook on its
output; the ordinary ``loss.backward()`` then hands that hook G = ∂loss/∂Y, and
the module's rule adds Σ_n (per-sample gradient)² to a buffer S, e.g. for Linear

    S_W += c · Σ_n (G_nᵀ X_n)²,   c = N² if loss = mean_n ℓ_n ("mean"), 1 if Σ_n ℓ_n ("sum")

(the c undoes the 1/N of a mean-reduced loss, so every term is a per-sample
gradient ∇ℓ_n squared). ``step()`` then uses s = S / N_seen in place of g² in

    F_run ← β·F_run + (1 − β)·s

in the same pass that updates θ (the division rides on the 1 − β scalar), so the
running Fisher is the EMA of the per-sample Fisher of the batches seen. Several
backward passes before one step (gradient accumulation) add up; N_seen counts
the samples of every backward that reached the hooks.
"""
from __future__ import annotations

import contextlib
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map

from . import distributed as _dist
from .fisher import _ESTIMATING, _RULES, _Hooked, _batch_size, _collect

__all__ = ["FisherTracker"]

LOSS_REDUCTIONS = ("mean", "sum")


class _Call:
    """One forward call of a hooked module awaiting its output gradients."""

    __slots__ = ("args", "kwargs", "grads", "metas", "is_tensor")

    def __init__(self, args: Any, kwargs: Any, leaves: list[Tensor], is_tensor: bool) -> None:
        self.args, self.kwargs, self.is_tensor = args, kwargs, is_tensor
        self.metas = [(o.shape, o.dtype, o.device) for o in leaves]
        self.grads: list[Optional[Tensor]] = [None] * len(leaves)


class _Group:
    """Every call of one module in one forward pass: squared only once all gradients
    are in, since a per-sample gradient sums over a module's calls."""

    __slots__ = ("hooked", "fid", "n", "calls", "remaining", "started")

    def __init__(self, hooked: _Hooked, fid: int, n: int) -> None:
        self.hooked, self.fid, self.n = hooked, fid, n
        self.calls: list[_Call] = []
        self.remaining = 0
        self.started = False


class FisherTracker:
    """Handle of a Fisher tracker; :meth:`remove` detaches it from the model and the optimizer.

    Created by :meth:`FusedEWCAdam.track_fisher`; not meant to be built directly.
    """

    def __init__(self, optimizer: Any, model: nn.Module, params: dict[Tensor, str], *,
                 per_sample: bool, loss_reduction: str, backend: str, process_group: Any = None) -> None:
        self.optimizer = optimizer
        self.process_group = process_group  # DDP/FSDP2: the per-sample sums are summed over its ranks
        self.model = model
        self.per_sample = per_sample
        self.loss_reduction = loss_reduction
        self.backend = backend
        self._params = params  # tracked Parameter -> name in the model
        self._handles: list[Any] = []
        self._bufs: dict[str, dict[str, Tensor]] = {}
        self._pending: dict[tuple[int, int], _Group] = {}
        self._fid = 0
        self._counted: set[int] = set()
        self.samples = 0
        self.removed = False
        self._busy = False
        if not per_sample:
            return
        hooked, _ = _collect(model, per_sample=True)
        self._hooked = []
        for h in hooked:
            own = {k: p for k, p in h.params.items() if p in params}
            if not own:
                continue
            h.params = own
            self._hooked.append(h)
            self._bufs[h.path] = {k: torch.zeros(p.shape, dtype=torch.float32, device=p.device)
                                  for k, p in own.items()}
        self._by_param = {p: self._bufs[h.path][k] for h in self._hooked for k, p in h.params.items()}
        self._handles.append(model.register_forward_pre_hook(self._on_model_forward))
        for h in self._hooked:
            self._handles.append(h.module.register_forward_hook(
                lambda m, a, k, o, h=h: self._on_forward(h, a, k, o), with_kwargs=True))

    # ------------------------------------------------------------------ hooks
    def _on_model_forward(self, module: nn.Module, args: Any) -> None:
        self._fid += 1

    def _on_forward(self, h: _Hooked, args: Any, kwargs: Any, output: Any) -> None:
        if not torch.is_grad_enabled() or _ESTIMATING[0] or self._busy:
            return  # evaluation, a pass of estimate_fisher (it has its own hooks), or our own rule
        leaves = [o for o in tree_flatten(output)[0] if isinstance(o, Tensor)]
        live = [i for i, o in enumerate(leaves) if o.requires_grad]
        if not live:
            return
        key = (id(h), self._fid)
        group = self._pending.get(key)
        if group is None:
            group = self._pending[key] = _Group(h, self._fid, _batch_size((args, kwargs), self._fid))
        detach = lambda t: t.detach() if isinstance(t, Tensor) else t  # noqa: E731
        call = _Call(tree_map(detach, args), tree_map(detach, kwargs), leaves, isinstance(output, Tensor))
        group.calls.append(call)
        group.remaining += len(live)
        for i in live:
            # Registered before any in-place op on the output, so it sees ∂loss/∂Y itself.
            leaves[i].register_hook(lambda g, group=group, call=call, i=i: self._on_grad(group, call, i, g))

    def _on_grad(self, group: _Group, call: _Call, i: int, g: Tensor) -> None:
        if self.removed or self._pending.get((id(group.hooked), group.fid)) is not group:
            return  # removed, or a second backward through an already-counted forward
        if not group.started:
            group.started = True
            if group.fid not in self._counted:
                self._counted.add(group.fid)
                self.samples += group.n
        call.grads[i] = g.detach()
        group.remaining -= 1
        if group.remaining == 0:
            self._finish(group)

    def _finish(self, group: _Group) -> None:
        del self._pending[(id(group.hooked), group.fid)]
        h = group.hooked
        calls = []
        for c in group.calls:
            if all(g is None for g in c.grads):
                continue
            if h.kind != "generic":
                if not c.is_tensor:
                    raise ValueError(f"module {h.desc} returned a non-tensor output, expected a tensor")
                calls.append((c.args, c.kwargs, c.grads[0]))
            else:  # outputs that got no gradient contribute zeros
                calls.append((c.args, c.kwargs, [
                    g if g is not None else torch.zeros(shape, dtype=dt, device=dev)
                    for g, (shape, dt, dev) in zip(c.grads, c.metas)]))
        if not calls:
            return
        scale = float(group.n) ** 2 if self.loss_reduction == "mean" else 1.0
        self._busy = True  # the generic rule calls the module again: not a training forward
        try:
            with torch.no_grad() if h.kind != "generic" else contextlib.nullcontext():
                _RULES[h.kind](h, calls, group.n, self._bufs[h.path], self.backend, scale)
        finally:
            self._busy = False

    # ------------------------------------------------------------------ optimizer side
    def _check_ready(self) -> None:
        """Raise (before the step mutates anything) if tracked gradients exist but no
        backward pass reached the hooks since the last step."""
        if not self.per_sample or self.samples > 0 or self._pending_started():
            return
        with_grad = [name for p, name in self._params.items() if p.grad is not None]
        if with_grad:
            raise RuntimeError(
                f"track_fisher: parameter '{with_grad[0]}' has a gradient but no backward pass through the "
                "tracked model reached the Fisher hooks since the last step (was the forward run under "
                "torch.no_grad(), or was the model called through another module?)")

    def _pending_started(self) -> bool:
        return any(g.started for g in self._pending.values())

    def _take(self) -> tuple[dict[Tensor, Tensor], float]:
        """Finish pending modules; return ({param: S}, 1/N_seen) for this step."""
        for group in list(self._pending.values()):
            if group.started:
                self._finish(group)
        self._pending.clear()
        if self.per_sample and self.process_group is not None:  # every rank, every step: Σ over ranks
            self.samples = _dist.all_reduce_tracked_(list(self._by_param.values()), self.samples, self.process_group)
        if not self.per_sample or self.samples == 0:
            return {}, 1.0
        sq = dict(self._by_param)
        if self.process_group is not None:  # FSDP2: each rank keeps its shard of the (now global) sums
            sq = {p: _dist.shard_like(s, p, f"the tracked Fisher of {self._params[p]!r}") if _dist.is_dtensor(p) else s
                  for p, s in sq.items()}
        return sq, 1.0 / self.samples

    def _reset(self) -> None:
        """After the step: empty the buffers and the sample count."""
        self._pending.clear()
        self._counted.clear()
        self.samples = 0
        if self.per_sample and self._by_param:
            torch._foreach_zero_(list(self._by_param.values()))

    def remove(self) -> None:
        """Remove every hook; the model is left exactly as before tracking."""
        for hd in self._handles:
            hd.remove()
        self._handles.clear()
        self._pending.clear()
        self._bufs.clear()
        self._by_param = {}
        self.removed = True
        if getattr(self.optimizer, "_tracker", None) is self:
            self.optimizer._tracker = None

    def __enter__(self) -> "FisherTracker":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "removed" if self.removed else f"{len(self._params)} parameters"
        return (f"FisherTracker({state}, per_sample={self.per_sample}, "
                f"loss_reduction={self.loss_reduction!r}, samples_since_step={self.samples})")
