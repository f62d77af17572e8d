"""Continual-learning metrics on an accuracy matrix.

``R[i][j]`` is the accuracy on task j's test data after training on tasks 0..i
(T × T, i = row). With T tasks:

* average accuracy   ACC = (1/T) Σ_j R[T−1][j]
* forgetting (Chaudhry et al., 2018)  F = (1/(T−1)) Σ_{j<T−1} max_{l<T−1} R[l][j] − R[T−1][j]
  (the best accuracy task j ever had before the end, minus its final accuracy;
  the max runs over l ≥ j, since R[l][j] for l < j is before j was trained)
* backward transfer (Lopez-Paz & Ranzato, 2017)  BWT = (1/(T−1)) Σ_{j<T−1} R[T−1][j] − R[j][j]
  (negative = forgetting)
"""
from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["average_accuracy", "forgetting", "backward_transfer", "seen_average", "all_metrics", "mean_std"]

Matrix = Sequence[Sequence[float]]


def _check(R: Matrix) -> int:
    T = len(R)
    if T < 1 or any(len(row) != T for row in R):
        raise ValueError(f"accuracy matrix must be square T×T with T >= 1, got rows of lengths {[len(r) for r in R]}")
    return T


def average_accuracy(R: Matrix) -> float:
    """Mean final accuracy over all tasks: (1/T) Σ_j R[T−1][j]."""
    T = _check(R)
    return sum(R[T - 1]) / T


def forgetting(R: Matrix) -> float:
    """Average forgetting over tasks 0..T−2 (0 for a single task)."""
    T = _check(R)
    if T < 2:
        return 0.0
    return sum(max(R[l][j] for l in range(j, T - 1)) - R[T - 1][j] for j in range(T - 1)) / (T - 1)


def backward_transfer(R: Matrix) -> float:
    """BWT = mean over j < T−1 of R[T−1][j] − R[j][j] (0 for a single task)."""
    T = _check(R)
    if T < 2:
        return 0.0
    return sum(R[T - 1][j] - R[j][j] for j in range(T - 1)) / (T - 1)


def seen_average(R: Matrix) -> list[float]:
    """Accuracy averaged over the tasks seen so far, after each task: mean_{j<=i} R[i][j]."""
    T = _check(R)
    return [sum(R[i][: i + 1]) / (i + 1) for i in range(T)]


def all_metrics(R: Matrix) -> dict[str, float]:
    """avg_acc, forgetting and bwt of one accuracy matrix."""
    return {"avg_acc": average_accuracy(R), "forgetting": forgetting(R), "bwt": backward_transfer(R)}


def mean_std(values: Sequence[float]) -> dict[str, float]:
    """Mean and sample standard deviation (ddof = 1; 0 for a single value)."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_std of no values")
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "n": n}
