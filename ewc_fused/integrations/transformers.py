"""Hugging Face ``Trainer`` integration: EWC across tasks with :class:`~ewc_fused.FusedEWCAdam`.

One callback for the whole sequence of tasks; at the end of every ``train()`` it
consolidates (anchors the current weights with their Fisher), so the next task is
trained with the penalty::

    from ewc_fused.integrations.transformers import EWCCallback, ewc_optimizer

    ewc = EWCCallback(fisher="estimate")                  # or "running" (needs fisher_ema)
    opt = ewc_optimizer(model, lr=1e-3, ewc_lambda=100.0)  # trainable parameters only
    Trainer(model, args, train_dataset=task_a, optimizers=(opt, None), callbacks=[ewc]).train()
    Trainer(model, args, train_dataset=task_b, optimizers=(opt, None), callbacks=[ewc]).train()

With ``optimizer_cls_and_kwargs=(FusedEWCAdamW, {...})`` each Trainer builds a new
optimizer; the callback then carries the consolidated tasks into it. With PEFT only
the trainable (adapter) parameters are in the optimizer, so only they get EWC state.
The penalty's gradient is added inside the step, after the Trainer clipped the task
gradient (``max_grad_norm``), so it is never clipped. The EWC state lives in the
optimizer's state dict: save the optimizer with the checkpoint to keep it.

Needs ``transformers`` (``pip install "ewc-fused[hf]"``).
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from functools import partial
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

try:
    from transformers import TrainerCallback
except ImportError as e:  # pragma: no cover - depends on the install
    raise ImportError(
        "ewc_fused.integrations.transformers needs transformers: pip install 'ewc-fused[hf]'") from e

from ..fisher import MODES, estimate_fisher
from ..optimizer import FusedEWCAdam

__all__ = ["EWCCallback", "ewc_optimizer", "per_sample_loss", "unwrap_optimizer"]

_CONSOLIDATED = ("ewc_fisher", "ewc_anchor", "ewc_const")
# The Trainer's rule (Trainer.get_decay_parameter_names): no weight decay on these.
_NO_DECAY_PATTERNS = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]


def unwrap_optimizer(optimizer: Any) -> FusedEWCAdam:
    """The :class:`FusedEWCAdam` inside Accelerate's ``AcceleratedOptimizer`` wrapper(s)."""
    opt = optimizer
    for _ in range(8):
        if isinstance(opt, FusedEWCAdam):
            return opt
        inner = getattr(opt, "optimizer", None)
        if inner is None or inner is opt:
            break
        opt = inner
    raise TypeError(
        f"EWCCallback needs the Trainer's optimizer to be a FusedEWCAdam, got {type(optimizer).__name__}; pass "
        "optimizers=(ewc_optimizer(model, ...), None) or optimizer_cls_and_kwargs=(FusedEWCAdamW, {...}) "
        "to the Trainer")


def ewc_optimizer(
    model: nn.Module,
    *,
    lr: float = 5e-5,
    weight_decay: float = 0.0,
    ewc_lambda: float = 1.0,
    fisher_ema: Optional[float] = None,
    decoupled_weight_decay: bool = True,
    **kwargs: Any,
) -> FusedEWCAdam:
    """A FusedEWCAdam(W) over the model's trainable parameters, named, grouped as the Trainer groups them.

    Weight decay goes to every trainable parameter except biases and normalisation
    weights (the Trainer's own rule). With PEFT only the adapters (and
    ``modules_to_save``) are trainable, so only they are optimised and carry EWC
    state. ``decoupled_weight_decay=True`` (default) is AdamW, as the Trainer's default.
    Other keyword arguments go to :class:`FusedEWCAdam`.
    """
    from transformers.trainer_pt_utils import get_parameter_names

    decay = set(get_parameter_names(model, [nn.LayerNorm], _NO_DECAY_PATTERNS))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("ewc_optimizer: the model has no trainable parameters (none with requires_grad=True)")
    groups = [{"params": [(n, p) for n, p in named if n in decay], "weight_decay": weight_decay},
              {"params": [(n, p) for n, p in named if n not in decay], "weight_decay": 0.0}]
    return FusedEWCAdam([g for g in groups if g["params"]], lr=lr, ewc_lambda=ewc_lambda, fisher_ema=fisher_ema,
                        decoupled_weight_decay=decoupled_weight_decay, **kwargs)


def per_sample_loss(outputs: Any, labels: Tensor, *, shift: bool = False, ignore_index: int = -100) -> Tensor:
    """Per-sample losses, shape (N,), from a Hugging Face model's outputs, for :func:`estimate_fisher`.

    * integer labels (N,) with logits (N, C): cross-entropy per sample (sequence classification);
    * integer labels (N, T) with logits (N, T, V): cross-entropy summed over the tokens of each
      sample, ``ignore_index`` tokens contributing nothing; ``shift=True`` predicts token t+1
      from position t (causal language models);
    * float labels: squared error summed per sample (regression).
    """
    logits = outputs["logits"] if isinstance(outputs, Mapping) else getattr(outputs, "logits", outputs)
    if not isinstance(logits, Tensor) or not isinstance(labels, Tensor):
        raise TypeError("per_sample_loss needs outputs with tensor logits and tensor labels")
    n = logits.shape[0]
    if labels.is_floating_point():
        diff = logits.float().reshape(labels.shape) - labels.float()
        return diff.square().reshape(n, -1).sum(1)
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    if logits.dim() != labels.dim() + 1 or logits.shape[:-1] != labels.shape:
        raise ValueError(f"per_sample_loss: logits of shape {tuple(logits.shape)} do not match labels of shape "
                         f"{tuple(labels.shape)} (expected logits = labels' shape + (classes,))")
    ce = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                                     reduction="none", ignore_index=ignore_index)
    return ce.reshape(n, -1).sum(1)


def _is_causal_lm(model: nn.Module) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set()
    for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        names.update(v if isinstance(v, (tuple, list)) else [v])
    return type(base).__name__ in names


def _pairs(data: Iterable, label: str, device: torch.device) -> Iterator[tuple[dict[str, Any], Tensor]]:
    """Trainer batches (dicts holding the labels) as the (inputs, targets) pairs estimate_fisher reads."""
    for i, batch in enumerate(data):
        if not isinstance(batch, Mapping) or label not in batch:
            raise ValueError(f"EWCCallback: batch {i} must be a dict with a {label!r} entry (the Trainer's format), "
                             f"got {type(batch).__name__}{' with keys ' + str(sorted(batch)) if isinstance(batch, Mapping) else ''}")
        moved = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
        yield {k: v for k, v in moved.items() if k != label}, moved[label]


class EWCCallback(TrainerCallback):
    """Consolidates at the end of every ``Trainer.train()``, so the next task is trained with EWC.

    Args:
        fisher: ``"estimate"``: :func:`estimate_fisher` over ``data`` (default: the
            Trainer's train dataloader of the task just finished); ``"running"``: the
            optimizer's running Fisher (the optimizer needs ``fisher_ema``).
        data: batches for ``"estimate"`` (dicts as the Trainer's collator makes them).
        loss_fn: per-sample loss for ``"estimate"``; default :func:`per_sample_loss`
            (shifted for causal language models).
        max_samples: samples for ``"estimate"`` (per rank when distributed).
        fisher_mode: ``mode`` of :func:`estimate_fisher` (``"empirical"``, ``"exact"``, ...).
        consolidate_mode, decay: ``mode`` and ``decay`` of :meth:`FusedEWCAdam.consolidate`.
        process_group: for ``"estimate"`` under DDP: the ranks whose samples make up the
            Fisher; default: the whole world when torch.distributed is initialised.
        estimate_kwargs: further keyword arguments of :func:`estimate_fisher`.

    The model is put in ``eval()`` mode for the estimate (no dropout) and restored.
    ``consolidations`` counts the tasks consolidated so far.
    """

    def __init__(
        self,
        fisher: str = "estimate",
        *,
        data: Optional[Iterable] = None,
        loss_fn: Optional[Callable[[Any, Any], Tensor]] = None,
        max_samples: Optional[int] = None,
        fisher_mode: str = "empirical",
        consolidate_mode: str = "multi",
        decay: float = 1.0,
        process_group: Any = None,
        estimate_kwargs: Optional[Mapping[str, Any]] = None,
    ) -> None:
        if fisher not in ("estimate", "running"):
            raise ValueError(f"EWCCallback: Invalid fisher: {fisher!r}; expected 'estimate' or 'running'")
        if fisher_mode not in MODES:
            raise ValueError(f"EWCCallback: Invalid fisher_mode: {fisher_mode!r}; expected one of {MODES}")
        if consolidate_mode not in ("multi", "online"):
            raise ValueError(f"EWCCallback: Invalid consolidate_mode: {consolidate_mode!r}; expected 'multi' or 'online'")
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay <= 1.0:
            raise ValueError(f"EWCCallback: Invalid decay: {decay!r} (must be a float in [0, 1])")
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"EWCCallback: loss_fn must be callable, got {type(loss_fn).__name__}")
        self.fisher, self.data, self.loss_fn, self.max_samples = fisher, data, loss_fn, max_samples
        self.fisher_mode, self.consolidate_mode, self.decay = fisher_mode, consolidate_mode, float(decay)
        self.process_group = process_group
        self.estimate_kwargs = dict(estimate_kwargs or {})
        self.consolidations = 0
        self._ewc_state: dict[Tensor, dict[str, Tensor]] = {}

    # ------------------------------------------------------------------ Trainer events
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        """Check the set-up before any step; carry earlier tasks into a new optimizer."""
        opt = unwrap_optimizer(optimizer)
        if self.fisher == "running" and all(g.get("fisher_ema") is None for g in opt.param_groups):
            raise ValueError("EWCCallback(fisher='running') needs a running Fisher: build the optimizer with "
                             "fisher_ema=β (e.g. 0.99), or use fisher='estimate'")
        owned = {p for g in opt.param_groups for p in g["params"]}
        if model is not None and not any(p in owned for p in model.parameters() if p.requires_grad):
            raise ValueError("EWCCallback: none of the model's trainable parameters is in the optimizer")
        for p, st in self._ewc_state.items():
            if p in owned and "ewc_fisher" not in opt.state.get(p, {}):
                opt.state[p].update({k: v.to(dtype=opt.ewc_dtype, copy=True) if k != "ewc_const" else v.clone()
                                     for k, v in st.items()})

    def on_train_end(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs):
        self.consolidate(model, optimizer, train_dataloader, label_names=getattr(args, "label_names", None))

    # ------------------------------------------------------------------ API
    def consolidate(self, model: nn.Module, optimizer: Any, data: Optional[Iterable] = None, *,
                    label_names: Optional[list[str]] = None) -> None:
        """Consolidate now (what ``on_train_end`` does): estimate or take the Fisher, then
        ``optimizer.consolidate``. ``data`` is used when the callback has no ``data`` of its own."""
        opt = unwrap_optimizer(optimizer)
        if self.fisher == "running":
            opt.consolidate(mode=self.consolidate_mode, decay=self.decay)
        else:
            fisher = self.estimate(model, self.data if self.data is not None else data, label_names)
            owned = {p for g in opt.param_groups for p in g["params"]}
            by_param = {p: fisher[n] for n, p in model.named_parameters() if n in fisher and p in owned}
            opt.consolidate(by_param, mode=self.consolidate_mode, decay=self.decay)
        self._ewc_state = {p: {k: st[k] for k in _CONSOLIDATED} for p, st in opt.state.items()
                           if "ewc_fisher" in st}
        self.consolidations += 1

    def estimate(self, model: nn.Module, data: Optional[Iterable],
                 label_names: Optional[list[str]] = None) -> dict[str, Tensor]:
        """The Fisher of ``model`` over ``data`` ({parameter name: F}), in eval mode."""
        import torch.distributed as dist

        if data is None:
            raise ValueError("EWCCallback(fisher='estimate') has no data: pass data=..., or let the Trainer "
                             "hand over its train dataloader (on_train_end)")
        labels = list(label_names) if label_names else ["labels"]
        if len(labels) != 1:
            raise ValueError(f"EWCCallback: one label column is supported, got label_names={labels}; "
                             "pass loss_fn and data yielding what it needs")
        loss_fn = self.loss_fn or partial(per_sample_loss, shift=_is_causal_lm(model))
        group = self.process_group
        if group is None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            group = dist.group.WORLD
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        try:
            return estimate_fisher(model, _pairs(data, labels[0], device), loss_fn, mode=self.fisher_mode,
                                   max_samples=self.max_samples, progress=False, process_group=group,
                                   **self.estimate_kwargs)
        finally:
            model.train(was_training)
