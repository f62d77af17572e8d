"""Command line: ``ewc-fused example`` and ``ewc-fused demo`` (also ``python -m ewc_fused ...``; the demo is
:mod:`ewc_fused.demo`).

The example trains a small MLP on task A, then on task B (the same classes seen
through a fixed permutation of the input features), once with plain Adam and
once with FusedEWCAdam after consolidating an empirical per-sample Fisher
(:func:`ewc_fused.estimate_fisher`), and
prints task-A accuracy before and after task B. Synthetic data, CPU, seconds.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Optional, Sequence

import torch
from torch import nn

from . import __version__
from .optimizer import FusedEWCAdam
from .fisher import estimate_fisher


def make_tasks(n_train: int = 2000, n_test: int = 1000, dim: int = 16, classes: int = 10, seed: int = 0):
    """Task A: Gaussian class clusters; task B: fresh samples with permuted features."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=g) * 1.2
    perm = torch.randperm(dim, generator=g)

    def sample(n, permute=False):
        y = torch.randint(classes, (n,), generator=g)
        x = centers[y] + torch.randn(n, dim, generator=g)
        return (x[:, perm] if permute else x), y

    task_a = (sample(n_train), sample(n_test))
    task_b = (sample(n_train, True), sample(n_test, True))
    return task_a, task_b


def accuracy(model: nn.Module, data) -> float:
    x, y = data
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean())


def train(model: nn.Module, opt: torch.optim.Optimizer, data, epochs: int, batch: int = 64, seed: int = 0) -> None:
    x, y = data
    g = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(epochs):
        order = torch.randperm(x.shape[0], generator=g)
        for i in range(0, x.shape[0], batch):
            idx = order[i : i + batch]
            opt.zero_grad()
            loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()


def run_example(ewc_lambda: float = 500.0, epochs: int = 5, seed: int = 0, out=sys.stdout) -> dict:
    """Train A then B with and without EWC; return the accuracies."""
    (a_train, a_test), (b_train, b_test) = make_tasks(seed=seed)
    results = {}
    for label, lam in (("Adam (no EWC)", 0.0), (f"FusedEWCAdam (λ={ewc_lambda:g})", ewc_lambda)):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(a_train[0].shape[1], 128), nn.ReLU(), nn.Linear(128, int(a_train[1].max()) + 1))
        opt = FusedEWCAdam(model.named_parameters(), lr=1e-3, ewc_lambda=lam)
        train(model, opt, a_train, epochs, seed=seed)
        acc_a_before = accuracy(model, a_test)
        t0 = time.perf_counter()
        batches = [(a_train[0][i : i + 100], a_train[1][i : i + 100]) for i in range(0, 500, 100)]
        fisher = estimate_fisher(model, batches, nn.CrossEntropyLoss(reduction="none"), mode="empirical")
        opt.consolidate(fisher)
        t_fisher = time.perf_counter() - t0
        train(model, opt, b_train, epochs, seed=seed + 1)
        results[label] = dict(a_before=acc_a_before, a_after=accuracy(model, a_test), b=accuracy(model, b_test),
                              fisher_s=t_fisher)
    print(f"{'':32s} {'task A before B':>16s} {'task A after B':>15s} {'task B':>7s}", file=out)
    for label, r in results.items():
        print(f"{label:32s} {r['a_before']:16.3f} {r['a_after']:15.3f} {r['b']:7.3f}", file=out)
    print("(empirical per-sample Fisher from 500 task-A samples, estimate_fisher; λ belongs to that Fisher)",
          file=out)
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="ewc-fused", description="EWC fused into the Adam step.")
    parser.add_argument("--version", action="version", version=f"ewc-fused {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("example", help="two-task example: task-A accuracy with and without EWC")
    ex.add_argument("--lambda", dest="ewc_lambda", type=float, default=500.0, help="EWC λ (default 500)")
    ex.add_argument("--epochs", type=int, default=5, help="epochs per task (default 5)")
    ex.add_argument("--seed", type=int, default=0)
    from . import demo as _demo  # light: the demo imports scikit-learn/matplotlib only when it runs
    _demo.add_parser(sub)
    from .bench import cli as _bench  # light: imports the benchmarks only when it runs
    _bench.add_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "bench":
        return _bench.run(args)
    if args.command == "demo":
        return _demo.run(args)
    if args.command == "example":
        if args.ewc_lambda < 0 or args.epochs < 1:
            parser.error("--lambda must be >= 0 and --epochs >= 1")
        run_example(args.ewc_lambda, args.epochs, args.seed)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
