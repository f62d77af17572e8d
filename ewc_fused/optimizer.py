"""FusedEWCAdam / FusedEWCAdamW: Adam with the EWC penalty fused into the step."""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Optional, Union

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from . import consolidation as _cons
from . import distributed as _dist
from .functional import BACKENDS, Hyper, ewc_adam, resolve_backend
from .tracker import LOSS_REDUCTIONS, FisherTracker

__all__ = ["FusedEWCAdam", "FusedEWCAdamW"]

FisherMapping = Mapping[Union[str, Tensor], Tensor]
NONFINITE = ("propagate", "skip", "raise")
EWC_STATE_KEYS = ("ewc_fisher", "ewc_anchor", "ewc_const", "fisher_ema", "fisher_ema_step")
_EWC_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class FusedEWCAdam(torch.optim.Adam):
    r"""Adam (or AdamW) with Elastic Weight Consolidation fused into the step.

    The loss being minimised is

    .. math::
        L(\theta) = L_\text{task}(\theta) + \sum_t \frac{\lambda}{2}\sum_i F_{t,i}(\theta_i-\theta^*_{t,i})^2

    and the penalty's gradient never goes through autograd: ``step()`` uses, per
    element, with ``g`` the task gradient in ``p.grad``

    .. code-block:: text

        F_run ← β·F_run + (1−β)·g²         if fisher_ema = β: the task gradient's g² (or the tracked
                                           per-sample Σ_n g_n² / N), bias-corrected on read
        g     ← −g                         if maximize (the penalty still pulls toward θ*)
        g     ← g + λ·F·(θ − c)            F = Σ_t F_t, c = Σ_t F_t θ*_t / F   (exact, O(1) memory)
        g ← g + wd·θ  (Adam)   or   θ ← θ·(1 − lr·wd)  (decoupled, AdamW)
        m ← β₁m + (1−β₁)g;  v ← β₂v + (1−β₂)g²;  v̂ ← max(v̂, v) if amsgrad
        θ ← θ − lr/(1−β₁ᵗ) · m / (√v/√(1−β₂ᵗ) + ε)

    Until :meth:`consolidate` is called it is ``torch.optim.Adam`` (same
    arguments, param groups and state keys; results equal to 1e-6 relative, and
    bit-identical on the torch backend with the same ``fused``/``foreach`` flags). On CUDA with Triton the
    whole update is one kernel pass that reads θ, g, m, v, F, c once and writes
    θ, m, v once; elsewhere a PyTorch backend computes the same numbers.

    Args:
        params, lr, betas, eps, weight_decay, amsgrad, maximize, foreach,
            capturable, fused, decoupled_weight_decay: as ``torch.optim.Adam``.
            ``foreach``/``fused`` choose torch's Adam implementation in the torch
            backend; ``differentiable=True`` is not supported.
        ewc_lambda: λ of the penalty above (per param group, may change like ``lr``).
        fisher_ema: β of the running Fisher (per param group); ``None`` = off.
        ewc_dtype: storage dtype of F, c and F_run (arithmetic is fp32).
        backend: ``"auto"`` (triton on CUDA when available, else torch),
            ``"triton"`` or ``"torch"``.
        nonfinite: what a step does with inf/NaN gradients: ``"propagate"`` (as
            ``torch.optim.Adam``: no check, no extra pass), ``"skip"`` (the whole
            update is skipped, step count, moments and running Fisher included;
            counted in ``skipped_steps``) or ``"raise"`` (FloatingPointError naming the
            parameters, nothing updated). Both checks cost one read of the gradients.
            Under ``torch.amp.GradScaler`` the scaler's own check skips such steps.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: Union[float, Tensor] = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: Optional[bool] = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: Optional[bool] = None,
        decoupled_weight_decay: bool = False,
        ewc_lambda: float = 1.0,
        fisher_ema: Optional[float] = None,
        ewc_dtype: torch.dtype = torch.float32,
        backend: str = "auto",
        nonfinite: str = "propagate",
    ) -> None:
        if differentiable:
            raise NotImplementedError(
                "FusedEWCAdam does not support differentiable=True: its fused step is not "
                "differentiable. Use torch.optim.Adam with the penalty in the loss "
                "(ewc_fused.reference) for higher-order optimisation."
            )
        if ewc_dtype not in _EWC_DTYPES:
            raise ValueError(f"Invalid ewc_dtype: {ewc_dtype}; expected one of {_EWC_DTYPES}")
        if backend not in BACKENDS:
            raise ValueError(f"Invalid backend: {backend!r}; expected one of {BACKENDS}")
        if nonfinite not in NONFINITE:
            raise ValueError(f"Invalid nonfinite: {nonfinite!r}; expected one of {NONFINITE}")
        self.nonfinite = nonfinite
        self._ewc_defaults = {"ewc_lambda": ewc_lambda, "fisher_ema": fisher_ema}
        self._check_ewc_group(self._ewc_defaults, where="")
        self.ewc_dtype = ewc_dtype
        self.backend = backend
        super().__init__(
            params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
            foreach=foreach, maximize=maximize, capturable=capturable,
            differentiable=False, fused=fused, decoupled_weight_decay=decoupled_weight_decay,
        )
        self.defaults.update(self._ewc_defaults)
        # GradScaler hands step() grad_scale/found_inf (attributes) instead of unscaling:
        # the kernel divides g by the scale and skips the whole update on inf/NaN.
        self._step_supports_amp_scaling = True
        self._skipped: Optional[Tensor] = None  # device count of steps skipped by nonfinite="skip"
        self._sq_grads: dict[Tensor, Tensor] = {}
        self._tracker: Optional[FisherTracker] = None

    # ------------------------------------------------------------------ param groups

    @staticmethod
    def _check_ewc_group(group: Mapping[str, Any], where: str) -> None:
        lam = group["ewc_lambda"]
        if isinstance(lam, Tensor) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam < 0:
            raise ValueError(f"Invalid ewc_lambda{where}: {lam!r} (must be a finite float >= 0)")
        beta = group["fisher_ema"]
        if beta is not None and (
            isinstance(beta, Tensor) or not isinstance(beta, (int, float)) or not 0.0 <= beta < 1.0
        ):
            raise ValueError(f"Invalid fisher_ema{where}: {beta!r} (must be None or a float in [0, 1))")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        for k, v in self._ewc_defaults.items():
            param_group.setdefault(k, v)
        where = f" in param group {len(self.param_groups)}"
        self._check_ewc_group(param_group, where)
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        for i, p in enumerate(params):
            if isinstance(p, Tensor) and torch.is_complex(p):
                raise ValueError(
                    f"FusedEWCAdam does not support complex parameters (parameter {i}{where}, "
                    f"dtype {p.dtype}); pass torch.view_as_real(p) views or use torch.optim.Adam."
                )
        super().add_param_group(param_group)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for k, v in getattr(self, "_ewc_defaults", {"ewc_lambda": 1.0, "fisher_ema": None}).items():
                group.setdefault(k, v)

    # ------------------------------------------------------------------ helpers

    def _owned(self) -> dict[Tensor, tuple[int, int, Optional[str]]]:
        """Parameter → (group index, index in group, name or None)."""
        out = {}
        for gi, group in enumerate(self.param_groups):
            names = group.get("param_names")
            for j, p in enumerate(group["params"]):
                out[p] = (gi, j, names[j] if names is not None else None)
        return out

    def _key(self, p: Tensor, name: Optional[str]):
        return name if name is not None else p

    def _label(self, p: Tensor, gi: int, j: int) -> str:
        names = self.param_groups[gi].get("param_names")
        return _cons.describe(p, (gi, j, names[j] if names is not None else None))

    def _backend_for(self, p: Tensor) -> str:
        return resolve_backend(self.backend, p.device)

    def _init_state(self, group: Mapping[str, Any], p: Tensor) -> dict[str, Tensor]:
        """Lazily create or normalise torch's Adam state (keys as in torch.optim.Adam).

        The step count lives on the parameter's device: the triton kernel and torch's
        fused/capturable Adam read it there (torch's foreach Adam copes too).
        """
        state = self.state[p]
        want = p.device
        if len(state) == 0 or "exp_avg" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=want)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        elif not torch.is_tensor(state["step"]) or state["step"].device != want:
            state["step"] = torch.as_tensor(float(state["step"]), dtype=torch.float32).to(want)
        if group["amsgrad"] and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if group["fisher_ema"] is not None and "fisher_ema" not in state:
            state["fisher_ema"] = torch.zeros_like(p, dtype=self.ewc_dtype, memory_format=torch.preserve_format)
            state["fisher_ema_step"] = torch.zeros((), dtype=torch.float64, device=self._count_device(group, p))
        elif "fisher_ema_step" in state and state["fisher_ema_step"].device != self._count_device(group, p):
            state["fisher_ema_step"] = state["fisher_ema_step"].to(self._count_device(group, p))
        return state

    @staticmethod
    def _count_device(group: Mapping[str, Any], p: Tensor) -> torch.device:
        """Where the running-Fisher step count lives: the CPU, or θ's device when the
        group is capturable (a CUDA graph must be able to increment it)."""
        return p.device if group["capturable"] else torch.device("cpu")

    # ------------------------------------------------------------------ step

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        """Perform one EWC-Adam step (see the class docstring for the update)."""
        (getattr(self, "_accelerator_graph_capture_health_check", None) or self._cuda_graph_capture_health_check)()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        # Validate everything before any state changes; resolve each device's backend once.
        backends: dict[torch.device, str] = {}
        for gi, group in enumerate(self.param_groups):
            self._check_ewc_group(group, f" in param group {gi}")
            for j, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(
                        "FusedEWCAdam does not support sparse gradients, please consider SparseAdam instead"
                    )
                if _dist.is_dtensor(p):  # FSDP2: the step runs on local shards placed alike
                    _dist.check_step(p, self.state.get(p, {}), lambda: self._label(p, gi, j))
                if p.device not in backends:
                    backends[p.device] = self._backend_for(p)
        tracker = self._tracker
        if tracker is not None:
            tracker._check_ready()
        try:
            self._fused_step(backends, tracker)
        except BaseException:
            # nothing of this step's per-sample sums may leak into the next one
            self._sq_grads = {}
            if tracker is not None:
                tracker._reset()
            raise
        return loss

    def _fused_step(self, backends: dict[torch.device, str], tracker: Optional[FisherTracker]) -> None:
        """step() after validation: the buckets' fused updates."""
        grad_scale = getattr(self, "grad_scale", None)  # set by GradScaler.step around this call
        found_inf = getattr(self, "found_inf", None)
        if found_inf is None and self.nonfinite != "propagate":
            if self.nonfinite == "raise" and _capturing():
                raise RuntimeError("nonfinite='raise' reads a flag on the host, which a CUDA graph cannot capture; "
                                   "use nonfinite='skip' (no host sync) for captured steps")
            found_inf = self._find_nonfinite()  # raises for nonfinite="raise", before any change
        if found_inf is not None:  # a 0/1 flag (GradScaler sums its per-device flags)
            found_inf = (found_inf > 0).to(torch.float32)
        per_device: dict[torch.device, tuple] = {}

        def scaling(dev: torch.device) -> tuple[Optional[Tensor], Optional[Tensor]]:
            if dev not in per_device:
                per_device[dev] = tuple(
                    None if t is None else t.to(dev, torch.float32, non_blocking=True).reshape(1)
                    for t in (grad_scale, found_inf))
            return per_device[dev]

        ema_skip = None  # host value of found_inf, read only if a running Fisher needs it
        sq, sq_scale = self._sq_grads, 1.0
        self._sq_grads = {}
        if tracker is not None:
            unscaled_by = None
            if tracker.per_sample and hasattr(self, "found_inf") and grad_scale is None:
                # GradScaler after unscale_: the gradients are unscaled, the tracked sums are not
                if tracker.scaler is None or getattr(tracker.scaler, "_scale", None) is None:
                    raise RuntimeError(
                        "track_fisher: GradScaler.unscale_ was called before step(), so the tracked per-sample "
                        "sums must be unscaled too: pass the scaler, opt.track_fisher(model, scaler=scaler)")
                unscaled_by = tracker.scaler._scale
            tracked, sq_scale = tracker._take(unscaled_by=unscaled_by)
            sq = {**sq, **tracked} if tracked else sq

        for group in self.param_groups:
            buckets: dict[tuple, list] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self._init_state(group, p)
                has_ewc = "ewc_fisher" in state and group["ewc_lambda"] != 0
                has_ema = group["fisher_ema"] is not None
                use_sq = has_ema and p in sq
                key = (p.device, p.dtype, has_ewc, has_ema, use_sq, backends[p.device])
                buckets.setdefault(key, []).append(p)
            for (_, _, has_ewc, has_ema, use_sq, backend), ps in buckets.items():
                states = [self.state[p] for p in ps]
                beta1, beta2 = group["betas"]
                ewc_adam(
                    ps, [p.grad for p in ps],
                    [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                    [s["max_exp_avg_sq"] for s in states] if group["amsgrad"] else [],
                    [s["step"] for s in states],
                    [s["ewc_fisher"] for s in states] if has_ewc else None,
                    [s["ewc_anchor"] for s in states] if has_ewc else None,
                    [s["fisher_ema"] for s in states] if has_ema else None,
                    [sq[p] for p in ps] if use_sq else None,
                    Hyper(
                        lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                        weight_decay=group["weight_decay"], amsgrad=group["amsgrad"],
                        maximize=group["maximize"], decoupled_weight_decay=group["decoupled_weight_decay"],
                        ewc_lambda=float(group["ewc_lambda"]),
                        fisher_beta=float(group["fisher_ema"]) if has_ema else 0.0,
                        sq_scale=sq_scale if use_sq else 1.0,
                        foreach=group["foreach"], fused=group["fused"], capturable=group["capturable"],
                    ),
                    backend=backend,
                    grad_scale=scaling(ps[0].device)[0],
                    found_inf=scaling(ps[0].device)[1],
                )
                if has_ema:
                    counts = [s["fisher_ema_step"] for s in states]
                    fi = scaling(ps[0].device)[1]
                    if fi is None:
                        torch._foreach_add_(counts, 1)
                    elif counts[0].device == fi.device:  # capturable: no host sync
                        torch._foreach_add_(counts, [(1 - fi).reshape(()).to(torch.float64)] * len(counts))
                    else:
                        if ema_skip is None:
                            ema_skip = bool(found_inf.item())  # host sync (the count lives on the CPU)
                        if not ema_skip:
                            torch._foreach_add_(counts, 1)
        if tracker is not None:
            tracker._reset()
        if found_inf is not None and not hasattr(self, "found_inf"):  # our own check (no host sync)
            if self._skipped is None:
                self._skipped = torch.zeros_like(found_inf)
            self._skipped.add_(found_inf)

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for non-finite gradients with ``nonfinite="skip"`` (reading it syncs)."""
        return 0 if self._skipped is None else int(self._skipped.item())

    def _find_nonfinite(self) -> Optional[Tensor]:
        """found_inf (1.0 if any gradient holds inf/NaN) on the first gradient's device;
        for ``nonfinite="raise"`` raises naming the parameters instead."""
        grads = [(p, gi, j) for gi, group in enumerate(self.param_groups)
                 for j, p in enumerate(group["params"]) if p.grad is not None]
        if not grads:
            return None
        found = None
        for p, _, _ in grads:
            g = p.grad.to_local() if _dist.is_dtensor(p.grad) else p.grad
            bad = torch.logical_not(torch.isfinite(g).all()).float().reshape(1)
            found = bad if found is None else found + bad.to(found.device)
        if self.nonfinite == "raise" and bool(found.item()):
            names = [self._label(p, gi, j) for p, gi, j in grads
                     if not bool(torch.isfinite(p.grad.to_local() if _dist.is_dtensor(p.grad) else p.grad).all())]
            raise FloatingPointError(
                f"non-finite gradient (inf or NaN) in {', '.join(names[:5])}"
                f"{f' and {len(names) - 5} more' if len(names) > 5 else ''}; nothing was updated "
                "(nonfinite='raise'; 'skip' skips such steps)")
        return found

    def _set_squared_grads(self, sq_grads: Mapping[Tensor, Tensor]) -> None:
        """Give the next step a per-parameter squared-gradient source for the running
        Fisher (e.g. Σ_n g_n² from per-sample hooks) in place of g²; used once."""
        owned = self._owned()
        for p, s in sq_grads.items():
            if p not in owned:
                raise ValueError("squared-gradient buffer given for a parameter this optimizer does not own")
            if s.shape != p.shape or s.device != p.device:
                raise ValueError(f"squared-gradient buffer of shape {tuple(s.shape)} on {s.device} "
                                 f"for a parameter of shape {tuple(p.shape)} on {p.device}")
        self._sq_grads = dict(sq_grads)

    def track_fisher(
        self,
        model: torch.nn.Module,
        per_sample: bool = True,
        loss_reduction: str = "mean",
        *,
        backend: Optional[str] = None,
        process_group: Any = None,
        accumulation_steps: int = 1,
        scaler: Any = None,
    ) -> FisherTracker:
        """Accumulate the running Fisher from per-sample gradients during training.

        Hooks on ``model`` (those of :func:`ewc_fused.estimate_fisher`) make every
        ``loss.backward()`` also leave Σ_n (∇ℓ_n)² per parameter, without forming
        per-sample gradients; the next :meth:`step` folds s = Σ_n (∇ℓ_n)² / N into
        F_run ← β·F_run + (1 − β)·s in the same pass that updates θ. So the running
        Fisher is the EMA of the per-sample (empirical) Fisher of the batches seen,
        and :meth:`consolidate` with no argument anchors with it.

        Args:
            model: the module whose forward the training loop calls; its trainable
                parameters in groups with ``fisher_ema`` set are tracked.
            per_sample: ``False`` keeps g² of the mini-batch gradient (what
                ``fisher_ema`` does without a tracker) and installs no hooks.
            loss_reduction: how the backward loss reduces the per-sample losses ℓ_n
                of its batch (sample dimension first): ``"mean"`` (mean_n ℓ_n, as
                ``nn.CrossEntropyLoss()`` over a batch) or ``"sum"``.
            backend: for the Linear kernels; defaults to the optimizer's.
            accumulation_steps: K when every micro-batch's loss is divided by K for
                gradient accumulation (the per-sample gradients are scaled back by K).
            scaler: the ``torch.amp.GradScaler``, needed only if ``scaler.unscale_(opt)``
                is called before ``scaler.step(opt)`` (e.g. to clip gradients).
            process_group: data-parallel group whose ranks see different samples: each
                step sums Σ_n (∇ℓ_n)² and N over its ranks (one all-reduce; every rank
                steps). ``None``: DDP's group when ``model`` is DistributedDataParallel,
                the mesh of FSDP2 (DTensor) parameters on one 1-D mesh, else none (so
                pass it when tracking ``ddp_model.module``).

        Returns:
            A :class:`~ewc_fused.tracker.FisherTracker`; ``remove()`` (or leaving a
            ``with`` block) removes every hook and leaves the model exactly as it was.
            One tracker per optimizer at a time.
        """
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"track_fisher: model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(per_sample, bool):
            raise TypeError(f"track_fisher: per_sample must be a bool, got {per_sample!r}")
        if loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(f"track_fisher: Invalid loss_reduction: {loss_reduction!r}; expected one of {LOSS_REDUCTIONS}")
        backend = self.backend if backend is None else backend
        if backend not in BACKENDS:
            raise ValueError(f"track_fisher: Invalid backend: {backend!r}; expected one of {BACKENDS}")
        if isinstance(accumulation_steps, bool) or not isinstance(accumulation_steps, int) or accumulation_steps < 1:
            raise ValueError(f"track_fisher: accumulation_steps must be a positive int, got {accumulation_steps!r}")
        if scaler is not None and not hasattr(scaler, "_scale"):
            raise TypeError(f"track_fisher: scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
        if self._tracker is not None:
            raise RuntimeError("track_fisher: this optimizer already has a tracker; remove() it first")
        owned = self._owned()
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        tracked = {p: n for n, p in trainable
                   if p in owned and self.param_groups[owned[p][0]]["fisher_ema"] is not None}
        if not tracked:
            if not any(p in owned for _, p in trainable):
                raise ValueError("track_fisher: none of the model's trainable parameters is in this optimizer")
            raise ValueError(
                "track_fisher: none of the model's parameters is in a param group with fisher_ema set; "
                "pass fisher_ema=β (e.g. 0.99) to the optimizer or to the group")
        group = _dist.tracked_fisher_group(model, process_group) if per_sample else None
        self._tracker = FisherTracker(self, model, tracked, per_sample=per_sample,
                                      loss_reduction=loss_reduction, backend=backend, process_group=group,
                                      accumulation_steps=accumulation_steps, scaler=scaler)
        return self._tracker

    # ------------------------------------------------------------------ EWC API

    @torch.no_grad()
    def consolidate(
        self, fisher: Optional[FisherMapping] = None, *, mode: str = "multi", decay: float = 1.0
    ) -> None:
        """End a task: anchor the current weights with their Fisher information.

        Args:
            fisher: maps each Parameter (or its name, when the optimizer was built
                from named parameters) to a non-negative, finite tensor of the
                parameter's shape and device. ``None`` takes the bias-corrected
                running Fisher of the groups with ``fisher_ema`` set.
            mode: ``"multi"``: add this task's penalty to the earlier ones,
                Σ_t (λ/2) F_t (θ − θ*_t)², kept exactly in O(1) memory as F = Σ F_t,
                c = Σ F_t θ*_t / F and a constant. ``"online"``: F ← decay·F + F_new,
                θ* ← θ (online EWC, one anchor).
            decay: in [0, 1]; multiplies the earlier tasks' Fisher (both modes).

        Parameters missing from ``fisher`` keep their earlier EWC state; frozen
        parameters (``requires_grad=False``) are skipped. Everything is
        validated before any state changes.
        """
        if mode not in ("multi", "online"):
            raise ValueError(f"Invalid mode: {mode!r}; expected 'multi' or 'online'")
        if isinstance(decay, Tensor) or not isinstance(decay, (int, float)) or not 0.0 <= decay <= 1.0:
            raise ValueError(f"Invalid decay: {decay!r} (must be a float in [0, 1])")
        if fisher is None:
            fisher = self.running_fisher()
            if not fisher:
                raise ValueError(
                    "consolidate() without a fisher uses the running Fisher, but no parameter has one: "
                    "set fisher_ema=β (e.g. 0.99) and take steps first, or pass fisher=..."
                )
        resolved = self._resolve_fisher(fisher)
        sharded = [(p, f) for p, f, _ in resolved if isinstance(f, _dist.ShardedFisher)]
        if sharded:  # FSDP2: the shards' values are checked, on every rank together, before any change
            _dist.check_sharded(sharded, _cons.check_fisher)
        updates = []
        for p, f_new, gi in resolved:
            # Adam's state too, so that a checkpoint taken now loads into torch.optim.Adam.
            state = self._init_state(self.param_groups[gi], p)
            if isinstance(f_new, _dist.ShardedFisher):  # K comes back as this rank's part of the sum
                new = _dist.combine_sharded(p, f_new.local, state, mode=mode, decay=float(decay), dtype=self.ewc_dtype)
            else:
                new = _cons.combine(
                    p.detach(), f_new,
                    state.get("ewc_fisher"), state.get("ewc_anchor"), state.get("ewc_const"),
                    mode=mode, decay=float(decay), dtype=self.ewc_dtype,
                )
            updates.append((state, new))
        if sharded:  # K of a sharded parameter: the sum of its shards' parts (a collective)
            parts = [(p, new[2]) for (p, f, _), (_, new) in zip(resolved, updates) if isinstance(f, _dist.ShardedFisher)]
            totals = iter(_dist.sum_over_shards(parts))
            updates = [(st, (new[0], new[1], next(totals)) if isinstance(f, _dist.ShardedFisher) else new)
                       for (_, f, _), (st, new) in zip(resolved, updates)]
        for state, new in updates:
            state["ewc_fisher"], state["ewc_anchor"], state["ewc_const"] = new

    def _resolve_fisher(self, fisher: FisherMapping) -> list[tuple[Tensor, Tensor, int]]:
        """Validate ``fisher`` entirely; return (parameter, Fisher, group index) per entry."""
        if not isinstance(fisher, Mapping):
            raise TypeError(f"fisher must be a mapping from parameters or names to tensors, got {type(fisher).__name__}")
        owned = self._owned()
        by_name = {name: p for p, (_, _, name) in owned.items() if name is not None}
        out: dict[Tensor, Tensor] = {}
        for key, f in fisher.items():
            if isinstance(key, str):
                if key not in by_name:
                    hint = ("this optimizer was built without parameter names; key the fisher by Parameter"
                            if not by_name else f"known names: {sorted(by_name)[:8]}{' ...' if len(by_name) > 8 else ''}")
                    raise KeyError(f"fisher has an entry for unknown parameter name {key!r} ({hint})")
                p, label = by_name[key], repr(key)
            elif isinstance(key, Tensor):
                if key not in owned:
                    raise ValueError(
                        f"fisher has a tensor for a parameter this optimizer does not own "
                        f"(shape {tuple(key.shape)}, dtype {key.dtype})"
                    )
                p, label = key, _cons.describe(key, owned[key])
            else:
                raise TypeError(f"fisher keys must be parameter names or Parameters, got {type(key).__name__}")
            if not p.requires_grad:
                continue
            if _dist.is_dtensor(p):  # FSDP2: this rank's shard; its values are checked in consolidate()
                f = _dist.fisher_shard(f, p, label)
            else:
                _cons.check_fisher(f, p, label)
            if p in out:
                raise ValueError(f"fisher has two entries for parameter {label}")
            out[p] = f
        return [(p, f, owned[p][0]) for p, f in out.items()]

    @torch.no_grad()
    def running_fisher(self) -> dict[Union[str, Tensor], Tensor]:
        """Bias-corrected running Fisher F_run / (1 − βᵏ) per parameter that has one
        (keys: names when built from named parameters, else Parameters)."""
        out: dict[Union[str, Tensor], Tensor] = {}
        for p, (gi, _, name) in self._owned().items():
            state = self.state.get(p, {})
            beta = self.param_groups[gi]["fisher_ema"]
            if "fisher_ema" not in state or beta is None:
                continue
            k = float(state["fisher_ema_step"])
            if k == 0:
                continue
            corr = 1.0 - beta ** k
            f_run = state["fisher_ema"]  # fp32 at least; float64 when ewc_dtype is float64
            out[self._key(p, name)] = f_run.to(torch.promote_types(f_run.dtype, torch.float32)) / corr
        return out

    @torch.no_grad()
    def ewc_penalty(self) -> Tensor:
        """Σ_groups (λ/2) Σ_t Σ_i F_t,i (θ_i − θ*_t,i)², exactly, as a float32 tensor (no grad).

        With DTensor (FSDP2) parameters this is a collective: every rank gets the global value.
        """
        total = torch.zeros((), dtype=torch.float64)
        device = None
        sharded: list[tuple[Tensor, Tensor]] = []
        for group in self.param_groups:
            lam = float(group["ewc_lambda"])
            for p in group["params"]:
                state = self.state.get(p, {})
                if "ewc_fisher" not in state:
                    continue
                device = device or p.device
                if _dist.is_dtensor(p):  # FSDP2: this rank's part, summed over the shards below
                    sharded.append((p, 0.5 * lam * _dist.quadratic_part(p, state)))
                    continue
                q = _cons.quadratic(p.detach(), state["ewc_fisher"], state["ewc_anchor"], state["ewc_const"])
                total += 0.5 * lam * q.cpu()
        if sharded:
            total += sum(_dist.sum_over_shards(sharded))
        dev = device or (self.param_groups[0]["params"][0].device if self.param_groups and self.param_groups[0]["params"] else "cpu")
        return total.to(device=dev, dtype=torch.float32)

    def reset_ewc(self) -> None:
        """Forget every consolidated task and the running Fisher (Adam state is kept)."""
        for state in self.state.values():
            for k in EWC_STATE_KEYS:
                state.pop(k, None)
        self._sq_grads = {}

    # ------------------------------------------------------------------ checkpoints

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load torch.optim.Adam's or FusedEWCAdam's state dict.

        EWC state is checked against the parameters' shapes before anything changes,
        and kept in ``ewc_dtype`` on the parameter's device (torch's loader would cast
        it to the parameter dtype).
        """
        state_dict = state_dict.copy()  # as torch: hooks may replace keys, never in the caller's dict
        # torch's pre/post hooks run here, around the whole load, so they see the EWC state too.
        pre_hooks, post_hooks = self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks
        for hook in list(pre_hooks.values()):
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        groups = self.param_groups
        saved_groups = state_dict["param_groups"]
        if len(groups) != len(saved_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        id_map: dict[Any, Tensor] = {}
        for gi, (g, sg) in enumerate(zip(groups, saved_groups)):
            if len(g["params"]) != len(sg["params"]):
                raise ValueError(
                    "loaded state dict contains a parameter group that doesn't match the size of optimizer's group"
                )
            names, saved_names = g.get("param_names"), sg.get("param_names")
            if names is not None and saved_names is not None and list(names) != list(saved_names):
                j = next(j for j, (a, b) in enumerate(zip(saved_names, names)) if a != b)
                raise ValueError(
                    f"loaded state dict names parameter {j} of param group {gi} {saved_names[j]!r}, but this "
                    f"optimizer's is {names[j]!r} (state of another model?); optimizer left unchanged. To load it by "
                    "position anyway, delete 'param_names' from the saved param groups")
            id_map.update(zip(sg["params"], g["params"]))
        ewc_parts: dict[Tensor, dict[str, Tensor]] = {}
        rest_state: dict[Any, dict[str, Any]] = {}
        for pid, st in state_dict["state"].items():
            p = id_map.get(pid)
            if p is None:
                continue
            for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "ewc_fisher", "ewc_anchor", "fisher_ema"):
                if k in st and tuple(st[k].shape) != tuple(p.shape):
                    raise ValueError(
                        f"loaded state dict has {k} of shape {tuple(st[k].shape)} for a parameter of shape "
                        f"{tuple(p.shape)} (state of another model?); optimizer left unchanged"
                    )
            part = {k: st[k] for k in EWC_STATE_KEYS if k in st}
            for together in (("ewc_fisher", "ewc_anchor", "ewc_const"), ("fisher_ema", "fisher_ema_step")):
                present = [k for k in together if k in part]
                if present and len(present) != len(together):
                    raise ValueError(
                        f"loaded state dict has {present} without {sorted(set(together) - set(present))} "
                        f"for a parameter of shape {tuple(p.shape)}; optimizer left unchanged"
                    )
            f = part.get("ewc_fisher")
            if isinstance(f, Tensor) and not _dist.is_dtensor(f) and f.numel() and (
                    not bool(torch.isfinite(f).all()) or bool((f < 0).any())):
                raise ValueError(
                    f"loaded state dict has a Fisher (ewc_fisher) with NaN, inf or negative values for a parameter "
                    f"of shape {tuple(p.shape)} (a corrupt checkpoint?); optimizer left unchanged")
            ewc_parts[p] = part
            rest_state[pid] = {k: v for k, v in st.items() if k not in EWC_STATE_KEYS}
            if _dist.is_dtensor(p):  # FSDP2: moments, F, c, F_run placed like the parameter (full tensors sharded)
                for d in (part, rest_state[pid]):
                    d.update({k: _dist.shard_like(v, p, f"loaded {k} for a DTensor parameter of shape {tuple(p.shape)}")
                              for k, v in d.items() if k in _dist.PARAM_SHAPED_STATE and isinstance(v, Tensor)})
        self._optimizer_load_state_dict_pre_hooks = type(pre_hooks)()
        self._optimizer_load_state_dict_post_hooks = type(post_hooks)()
        try:
            super().load_state_dict({"state": rest_state, "param_groups": saved_groups})
        finally:
            self._optimizer_load_state_dict_pre_hooks = pre_hooks
            self._optimizer_load_state_dict_post_hooks = post_hooks
        owned = self._owned()
        for p, part in ewc_parts.items():
            st = self.state[p]
            for k, v in part.items():
                if k in ("ewc_fisher", "ewc_anchor", "fisher_ema"):
                    st[k] = v.to(device=p.device, dtype=self.ewc_dtype)
                elif k == "fisher_ema_step":
                    dev = self._count_device(self.param_groups[owned[p][0]], p)
                    st[k] = v.to(device=dev, dtype=torch.float64).clone()
                else:
                    st[k] = v.to(dtype=torch.float64).clone()
        for hook in list(post_hooks.values()):
            hook(self)


class FusedEWCAdamW(FusedEWCAdam):
    """:class:`FusedEWCAdam` with decoupled weight decay (``torch.optim.AdamW``)."""

    def __init__(self, params: ParamsT, lr: Union[float, Tensor] = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, **kwargs: Any) -> None:
        kwargs.setdefault("decoupled_weight_decay", True)
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, **kwargs)
