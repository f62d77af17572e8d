"""Per-sample Fisher tracked during training, folded into the optimizer step.

:meth:`FusedEWCAdam.track_fisher` installs the hooks of :func:`ewc_fused.estimate_fisher`
on the *training* forward/backward: a forward hook saves each module's input X
(a detached view of what autograd saves anyway) and puts a tensor hook on its
output; the ordinary ``loss.backward()`` then hands that hook G = ∂loss/∂Y, and at
the end of the backward pass each module's rule adds Σ_n (per-sample gradient)² to a
buffer S, e.g. for Linear

    S_W += c · Σ_n (G_nᵀ X_n)²,   c = (N·K)² if loss = mean_n ℓ_n / K ("mean"), K² if Σ_n ℓ_n / K ("sum")

(c undoes the 1/N of a mean-reduced loss and the 1/K of gradient accumulation, so
every term is a per-sample gradient ∇ℓ_n squared). ``step()`` then uses s = S / N_seen
in place of g² in

    F_run ← β·F_run + (1 − β)·s

in the same pass that updates θ (the division rides on the 1 − β scalar), so the
running Fisher is the EMA of the per-sample Fisher of the batches seen.

A backward pass is one batch: all calls of a module whose gradients meet in one
backward are the same N samples (their gradients add up before squaring, e.g. a
model applied twice to one batch); N is the batch size of the tracked model's call
(of the module's own input when the model is not called as a whole). Several backward
passes before one step (gradient accumulation) add up, and N_seen counts each pass's
N. Limits: only the first backward through a forward counts (retain_graph and a second
loss are not added), and every backward that reaches the hooks counts as a batch,
``torch.autograd.grad`` probes included (wrap those in :meth:`FisherTracker.paused`).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from functools import partial
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map

from . import distributed as _dist
from .fisher import _RULES, _Hooked, _batch_size, _collect, _estimating

__all__ = ["FisherTracker"]

LOSS_REDUCTIONS = ("mean", "sum")


def _in_backward() -> bool:
    """True inside an autograd backward pass (e.g. a checkpoint's recomputation)."""
    return torch._C._current_autograd_node() is not None


class _Call:
    """One forward call of a hooked module awaiting its output gradients."""

    __slots__ = ("hooked", "n", "args", "kwargs", "grads", "metas", "is_tensor", "touched", "done")

    def __init__(self, hooked: _Hooked, n: int, args: Any, kwargs: Any, leaves: list[Tensor], is_tensor: bool) -> None:
        self.hooked, self.n, self.args, self.kwargs, self.is_tensor = hooked, n, args, kwargs, is_tensor
        self.metas = [(o.shape, o.dtype, o.device) for o in leaves]
        self.grads: list[Optional[Tensor]] = [None] * len(leaves)
        self.touched = self.done = False

    def release(self) -> None:
        """Drop the saved inputs and gradients (the tensor hooks may outlive the call)."""
        self.args = self.kwargs = None
        self.grads = []
        self.done = True


class FisherTracker:
    """Handle of a Fisher tracker; :meth:`remove` detaches it from the model and the optimizer.

    Created by :meth:`FusedEWCAdam.track_fisher`; not meant to be built directly.
    """

    def __init__(self, optimizer: Any, model: nn.Module, params: dict[Tensor, str], *,
                 per_sample: bool, loss_reduction: str, backend: str, process_group: Any = None,
                 accumulation_steps: int = 1, scaler: Any = None) -> None:
        self.optimizer = optimizer
        self.process_group = process_group  # DDP/FSDP2: the per-sample sums are summed over its ranks
        self.model = model
        self.per_sample = per_sample
        self.loss_reduction = loss_reduction
        self.accumulation_steps = accumulation_steps
        self.scaler = scaler
        self.backend = backend
        self._params = params  # tracked Parameter -> name in the model
        self._handles: list[Any] = []
        self._bufs: dict[str, dict[str, Tensor]] = {}
        self._by_param: dict[Tensor, Tensor] = {}
        self._calls: list[_Call] = []  # recorded calls whose gradients have not all arrived
        self._touched: list[_Call] = []  # calls that got gradients in the running backward pass
        self._queued = False  # end-of-backward callback queued for the running pass
        self._root_n: Optional[int] = None
        self.samples = 0
        self.removed = False
        self._busy = False
        self._paused = 0
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
        self._handles.append(model.register_forward_pre_hook(self._on_model_forward, with_kwargs=True))
        self._handles.append(model.register_forward_hook(self._after_model_forward))
        for h in self._hooked:
            self._handles.append(h.module.register_forward_hook(
                lambda m, a, k, o, h=h: self._on_forward(h, a, k, o), with_kwargs=True))

    @contextlib.contextmanager
    def paused(self) -> Iterator["FisherTracker"]:
        """Forwards and backward passes inside this block are not tracked (e.g. a
        ``torch.autograd.grad`` gradient penalty, or an evaluation with grad enabled)."""
        self._paused += 1
        try:
            yield self
        finally:
            self._paused -= 1

    # ------------------------------------------------------------------ hooks
    def _active(self) -> bool:
        return (torch.is_grad_enabled() and not self._busy and not self._paused and not self.removed
                and not _estimating() and not _in_backward())

    def _on_model_forward(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        if self._active():
            try:
                self._root_n = _batch_size((args, kwargs), 0)
            except ValueError:
                self._root_n = None

    def _after_model_forward(self, module: nn.Module, args: Any, output: Any) -> None:
        self._root_n = None

    def _on_forward(self, h: _Hooked, args: Any, kwargs: Any, output: Any) -> None:
        # Not during evaluation, estimate_fisher, our own rules, paused blocks, or a recomputation.
        if not self._active():
            return
        leaves = [o for o in tree_flatten(output)[0] if isinstance(o, Tensor)]
        live = [i for i, o in enumerate(leaves) if o.requires_grad and o.grad_fn is not None]
        if not live:
            return
        n = self._root_n if self._root_n is not None else _batch_size((args, kwargs), 0)
        detach = lambda t: t.detach() if isinstance(t, Tensor) else t  # noqa: E731
        call = _Call(h, n, tree_map(detach, args), tree_map(detach, kwargs), leaves, isinstance(output, Tensor))
        self._calls.append(call)
        for i in live:
            # Registered before any in-place op on the output, so it sees ∂loss/∂Y itself.
            leaves[i].register_hook(partial(self._on_grad, call, i))

    def _on_grad(self, call: _Call, i: int, g: Tensor) -> None:
        if call.done or self.removed or self._paused:
            return  # a later backward through a counted forward, or not tracked
        call.grads[i] = g.detach()
        if not call.touched:
            call.touched = True
            self._touched.append(call)
        if not self._queued:
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._end_pass)

    def _end_pass(self) -> None:
        """End of a backward pass: square the per-sample gradients of every module it reached."""
        self._queued = False
        touched, self._touched = self._touched, []
        if not touched:
            return
        try:
            by_module: dict[tuple[int, int], list[_Call]] = {}
            for c in touched:
                by_module.setdefault((id(c.hooked), c.n), []).append(c)
            for calls in by_module.values():
                self._square(calls)
            self.samples += max(c.n for c in touched)
        finally:
            done = {id(c) for c in touched}
            self._calls = [c for c in self._calls if id(c) not in done]
            for c in touched:
                c.release()

    def _square(self, calls: list[_Call]) -> None:
        h, n = calls[0].hooked, calls[0].n
        rows = []
        for c in calls:
            if h.kind != "generic":
                if not c.is_tensor:
                    raise ValueError(f"module {h.desc} returned a non-tensor output, expected a tensor")
                if c.grads[0] is not None:
                    rows.append((c.args, c.kwargs, c.grads[0]))
            else:  # outputs that got no gradient contribute zeros
                rows.append((c.args, c.kwargs, [
                    g if g is not None else torch.zeros(shape, dtype=dt, device=dev)
                    for g, (shape, dt, dev) in zip(c.grads, c.metas)]))
        if not rows:
            return
        k = float(self.accumulation_steps)
        scale = (float(n) * k) ** 2 if self.loss_reduction == "mean" else k * k
        self._busy = True  # the generic rule calls the module again: not a training forward
        try:
            with torch.no_grad() if h.kind != "generic" else contextlib.nullcontext():
                _RULES[h.kind](h, rows, n, self._bufs[h.path], self.backend, scale)
        finally:
            self._busy = False

    # ------------------------------------------------------------------ optimizer side
    def _check_ready(self) -> None:
        """Raise (before the step mutates anything) if tracked gradients exist but no
        backward pass reached the hooks since the last step."""
        if not self.per_sample or self.samples > 0 or self._touched:
            return
        with_grad = [name for p, name in self._params.items() if p.grad is not None]
        if with_grad:
            raise RuntimeError(
                f"track_fisher: parameter '{with_grad[0]}' has a gradient but no backward pass through the "
                "tracked model reached the Fisher hooks since the last step (was the forward run under "
                "torch.no_grad() or tracker.paused()?)")

    def _take(self, *, unscaled_by: Optional[Tensor] = None) -> tuple[dict[Tensor, Tensor], float]:
        """Return ({param: S}, 1/N_seen) for this step (S summed over ranks under DDP/FSDP2).

        ``unscaled_by``: the loss scale of gradients that GradScaler.unscale_ already
        divided; S was formed from scaled output gradients and is divided by its square."""
        if self._touched:  # a pass whose end-of-backward callback has not run (should not happen)
            self._end_pass()
        self._calls.clear()
        if self.per_sample and self.process_group is not None:  # every rank, every step: Σ over ranks
            self.samples = _dist.all_reduce_tracked_(list(self._by_param.values()), self.samples, self.process_group)
        if not self.per_sample or self.samples == 0:
            return {}, 1.0
        if unscaled_by is not None:
            inv = unscaled_by.reciprocal().square()
            for b in self._by_param.values():
                b.mul_(inv.to(b.device))
        sq = dict(self._by_param)
        if self.process_group is not None:  # FSDP2: each rank keeps its shard of the (now global) sums
            sq = {p: _dist.shard_like(s, p, f"the tracked Fisher of {self._params[p]!r}") if _dist.is_dtensor(p) else s
                  for p, s in sq.items()}
        return sq, 1.0 / self.samples

    def _reset(self) -> None:
        """After the step (or a refused one): empty the buffers and the sample count."""
        for c in self._calls + self._touched:
            c.release()
        self._calls, self._touched = [], []
        self.samples = 0
        if self.per_sample and self._by_param:
            torch._foreach_zero_(list(self._by_param.values()))

    def remove(self) -> None:
        """Remove every hook; the model is left exactly as before tracking."""
        for hd in self._handles:
            hd.remove()
        self._handles.clear()
        for c in self._calls + self._touched:
            c.release()
        self._calls, self._touched = [], []
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
        return (f"FisherTracker({state}, per_sample={self.per_sample}, loss_reduction={self.loss_reduction!r}, "
                f"accumulation_steps={self.accumulation_steps}, samples_since_step={self.samples})")
