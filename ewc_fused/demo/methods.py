"""The continual-learning methods of the demo, trained task after task on one benchmark.

Every method trains the same MLP (same initial weights for a seed) with Adam at the
same learning rate, on the same mini-batch order for a (seed, task), and is scored
after each task on every task's data: that gives the accuracy matrices R[i][j].

* ``finetune``: plain ``torch.optim.Adam``, no protection (the lower bound).

Every ``torch.optim.Adam`` here is ``fused=True``, the kernel FusedEWCAdam's torch backend
steps with, so training times compare like with like.
* ``ewc``: :class:`ewc_fused.FusedEWCAdam`, ``consolidate(F, mode="multi")`` after each task,
  with the Fisher of one of :data:`FISHERS`:
  ``exact`` / ``empirical`` / ``sampled`` / ``batch`` from :func:`ewc_fused.estimate_fisher`
  on the task's training data (``batch``: squared gradients of training-size mini-batches),
  ``tracked``: the per-sample Fisher the optimizer accumulates during training
  (``opt.track_fisher(model, per_sample=True)`` with ``fisher_ema`` = :func:`ema_beta`),
  consolidated with ``opt.consolidate()`` and no argument.
* ``ewc-online``: the same optimizer with ``mode="online"`` (F ← decay·F + F_new, θ* ← θ).
* ``ewc-reference``: :class:`ewc_fused.reference.ReferenceEWCAdam` (the penalty through
  autograd, then ``torch.optim.Adam``), consolidating the *same Fisher tensors* the fused
  run computed, at the same λ: the two must agree.
* ``lwf``: Learning without Forgetting: cross-entropy plus α·τ²·KL between the previous
  model's and the current model's softened outputs on the old classes, on the new data.
* ``replay``: a small class-balanced buffer of ``replay_per_task`` training samples per
  past task; each step adds a mini-batch drawn from it.
* ``joint``: after task i, training continues on the union of tasks 0..i (the upper bound).

Split Digits trains one 10-way head with the softmax over all ten classes, so the
same model is scored task-incrementally (argmax within the task's two classes) and
class-incrementally (argmax over all ten).
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as nnf
from torch import Tensor, nn

from ..fisher import estimate_fisher
from ..optimizer import FusedEWCAdam
from ..reference import ReferenceEWCAdam
from .data import Benchmark, Task

__all__ = ["FISHERS", "METHODS", "TrainConfig", "MethodSpec", "RunResult", "make_model", "run_method",
           "evaluate", "ema_beta"]

FISHERS = ("exact", "empirical", "sampled", "batch", "tracked")
METHODS = ("finetune", "ewc", "ewc-online", "ewc-reference", "lwf", "replay", "joint")


@dataclass(frozen=True)
class TrainConfig:
    """Training settings shared by every method."""

    hidden: tuple[int, ...] = (256, 256)
    epochs: int = 5
    batch_size: int = 32
    lr: float = 1e-3
    replay_per_task: int = 20
    lwf_alpha: float = 1.0
    lwf_temperature: float = 2.0
    online_decay: float = 1.0
    fisher_batch: int = 256   # batch size of the per-sample Fisher passes (does not change their value)


@dataclass(frozen=True)
class MethodSpec:
    """One column of the comparison: a method, and for EWC its Fisher and λ."""

    key: str
    kind: str                       # one of METHODS
    fisher: Optional[str] = None    # one of FISHERS for the EWC kinds
    ewc_lambda: Optional[float] = None

    @property
    def label(self) -> str:
        names = {"finetune": "fine-tune (Adam)", "lwf": "LwF", "replay": "replay", "joint": "joint (upper bound)"}
        if self.kind in names:
            return names[self.kind]
        what = {"ewc": "EWC fused", "ewc-online": "online EWC fused", "ewc-reference": "EWC reference"}[self.kind]
        return f"{what} [{self.fisher}]"


@dataclass
class RunResult:
    """What one (method, seed) run produced."""

    R: dict[str, list[list[float]]]             # scenario -> accuracy matrix
    train_s: float                              # time in the training loops
    fisher_s: float                             # time computing Fishers and consolidating
    fishers: list[dict[str, Tensor]] = field(default_factory=list)   # per consolidation (EWC kinds)
    state: dict[str, Tensor] = field(default_factory=dict)           # final weights


def make_model(n_in: int, hidden: tuple[int, ...], n_out: int) -> nn.Sequential:
    """An MLP n_in → hidden… → n_out with ReLUs."""
    layers: list[nn.Module] = []
    width = n_in
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, n_out))
    return nn.Sequential(*layers)


def ema_beta(n_train: int, batch_size: int) -> float:
    """β of the tracked running Fisher: an average over about the last epoch of a task.

    β = 1 − 1/(steps per epoch): after E epochs of the next task an earlier task's
    contribution is down to about e^−E.
    """
    steps = max(2, -(-n_train // batch_size))
    return 1.0 - 1.0 / steps


def evaluate(model: nn.Module, bench: Benchmark, split: str) -> dict[str, list[float]]:
    """Accuracy on every task's ``split`` data, per scenario of the benchmark."""
    out: dict[str, list[float]] = {s: [] for s in bench.scenarios}
    with torch.inference_mode():
        for task in bench.tasks:
            x, y = task.x[split], task.y[split]
            logits = model(x)
            for s in bench.scenarios:
                if s == "task_il":
                    cls = torch.tensor(task.classes)
                    pred = cls[logits[:, cls].argmax(-1)]
                else:
                    pred = logits.argmax(-1)
                out[s].append(float((pred == y).float().mean()))
    return out


def _per_sample_ce(outputs: Tensor, targets: Tensor) -> Tensor:
    return nnf.cross_entropy(outputs, targets, reduction="none")


def _balanced_subset(y: Tensor, k: int, gen: torch.Generator) -> Tensor:
    """Indices of k samples spread evenly over the classes present in y."""
    classes = torch.unique(y)
    picks = []
    for i, c in enumerate(classes.tolist()):
        rows = torch.nonzero(y == c).squeeze(1)
        want = k // len(classes) + (1 if i < k % len(classes) else 0)
        picks.append(rows[torch.randperm(len(rows), generator=gen)[:want]])
    return torch.cat(picks)


def _fisher(model: nn.Module, task: Task, mode: str, cfg: TrainConfig, seed: int, t: int) -> dict[str, Tensor]:
    x, y = task.x["train"], task.y["train"]
    bs = cfg.batch_size if mode == "batch" else cfg.fisher_batch
    batches = [(x[i:i + bs], y[i:i + bs]) for i in range(0, x.shape[0], bs)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(10_000 * seed + 100 + t)   # "sampled" draws labels from torch's global RNG
        return estimate_fisher(model, batches, _per_sample_ce, mode=mode, progress=False)


def run_method(
    spec: MethodSpec,
    bench: Benchmark,
    cfg: TrainConfig,
    seed: int,
    *,
    split: str = "test",
    fishers: Optional[list[dict[str, Tensor]]] = None,
    keep_fishers: bool = False,
) -> RunResult:
    """Train ``spec`` on the benchmark's tasks in order; score on ``split`` after each task.

    ``fishers`` (``ewc-reference`` only) are the Fisher tensors to consolidate after each
    task, normally those of the fused run on the same seed. ``keep_fishers`` returns the
    Fishers this run consolidated. Deterministic for a seed; the caller's RNG is untouched.
    """
    if spec.kind not in METHODS:
        raise ValueError(f"unknown method {spec.kind!r}")
    is_ewc = spec.kind in ("ewc", "ewc-online", "ewc-reference")
    if is_ewc and (spec.fisher not in FISHERS or spec.ewc_lambda is None):
        raise ValueError(f"{spec.key}: EWC needs a Fisher type in {FISHERS} and a λ")
    if spec.kind == "ewc-reference" and (fishers is None or len(fishers) < len(bench.tasks) - 1):
        raise ValueError("ewc-reference needs the fused run's Fisher tensors for every task but the last")
    tasks = bench.tasks
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = make_model(tasks[0].x["train"].shape[1], cfg.hidden, bench.n_classes)

    tracked = is_ewc and spec.fisher == "tracked" and spec.kind != "ewc-reference"
    handle = None
    if spec.kind in ("ewc", "ewc-online"):
        beta = ema_beta(tasks[0].x["train"].shape[0], cfg.batch_size) if tracked else None
        opt: torch.optim.Optimizer | ReferenceEWCAdam = FusedEWCAdam(
            model.named_parameters(), lr=cfg.lr, ewc_lambda=float(spec.ewc_lambda), fisher_ema=beta)
        if tracked:   # hooks add Σ_n (∇ℓ_n)² to each backward; step() folds it into the running Fisher
            handle = opt.track_fisher(model, per_sample=True, loss_reduction="mean")
    elif spec.kind == "ewc-reference":
        opt = ReferenceEWCAdam(model.named_parameters(), ewc_lambda=float(spec.ewc_lambda), lr=cfg.lr, fused=True)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=True)

    R: dict[str, list[list[float]]] = {s: [] for s in bench.scenarios}
    train_s = fisher_s = 0.0
    kept: list[dict[str, Tensor]] = []
    buffer_x: list[Tensor] = []
    buffer_y: list[Tensor] = []
    teacher: Optional[nn.Module] = None
    old_classes: list[int] = []
    try:
        for t, task in enumerate(tasks):
            if spec.kind == "joint":
                x = torch.cat([tk.x["train"] for tk in tasks[: t + 1]])
                y = torch.cat([tk.y["train"] for tk in tasks[: t + 1]])
            else:
                x, y = task.x["train"], task.y["train"]
            gen = torch.Generator().manual_seed(10_000 * seed + t)       # same batch order for every method
            replay_gen = torch.Generator().manual_seed(10_000 * seed + 5_000 + t)
            mem_x = torch.cat(buffer_x) if buffer_x else None
            mem_y = torch.cat(buffer_y) if buffer_y else None
            old_idx = torch.tensor(old_classes, dtype=torch.long)

            t0 = time.perf_counter()
            model.train()
            for _ in range(cfg.epochs):
                order = torch.randperm(x.shape[0], generator=gen)
                for i in range(0, x.shape[0], cfg.batch_size):
                    idx = order[i:i + cfg.batch_size]
                    xb, yb = x[idx], y[idx]
                    if mem_x is not None:                      # replay
                        ridx = torch.randint(mem_x.shape[0], (min(cfg.batch_size, mem_x.shape[0]),),
                                             generator=replay_gen)
                        xb, yb = torch.cat([xb, mem_x[ridx]]), torch.cat([yb, mem_y[ridx]])
                    opt.zero_grad()
                    logits = model(xb)
                    loss = nnf.cross_entropy(logits, yb)
                    if teacher is not None:                    # LwF
                        tau = cfg.lwf_temperature
                        with torch.no_grad():
                            soft = torch.softmax(teacher(xb)[:, old_idx] / tau, -1)
                        log_p = torch.log_softmax(logits[:, old_idx] / tau, -1)
                        loss = loss + cfg.lwf_alpha * tau * tau * nnf.kl_div(log_p, soft, reduction="batchmean")
                    loss.backward()
                    opt.step()
            model.eval()
            train_s += time.perf_counter() - t0

            if is_ewc and t < len(tasks) - 1:
                t0 = time.perf_counter()
                mode = "multi" if spec.kind != "ewc-online" else "online"
                decay = cfg.online_decay if mode == "online" else 1.0
                if spec.kind == "ewc-reference":
                    fisher = fishers[t]
                    opt.consolidate(fisher, mode=mode, decay=decay)
                elif tracked:
                    fisher = opt.running_fisher() if keep_fishers else {}
                    opt.consolidate(mode=mode, decay=decay)   # no argument: the optimizer's own Fisher
                else:
                    fisher = _fisher(model, task, spec.fisher, cfg, seed, t)
                    opt.consolidate(fisher, mode=mode, decay=decay)
                fisher_s += time.perf_counter() - t0
                if keep_fishers:
                    kept.append({k: v.detach().clone() for k, v in fisher.items()})
            if spec.kind == "replay" and cfg.replay_per_task > 0:
                pick = _balanced_subset(task.y["train"], cfg.replay_per_task,
                                        torch.Generator().manual_seed(10_000 * seed + 9_000 + t))
                buffer_x.append(task.x["train"][pick])
                buffer_y.append(task.y["train"][pick])
            if spec.kind == "lwf":
                teacher = copy.deepcopy(model).eval()
                for p in teacher.parameters():
                    p.requires_grad_(False)
                old_classes = sorted(set(old_classes) | set(task.classes))

            row = evaluate(model, bench, split)
            for s in bench.scenarios:
                R[s].append(row[s])
    finally:
        if handle is not None:
            handle.remove()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return RunResult(R, train_s, fisher_s, kept, state)
