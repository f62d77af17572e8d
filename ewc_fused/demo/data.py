"""Digits continual-learning benchmarks: Permuted Digits and Split Digits.

scikit-learn's bundled digits (1797 images of 8×8 pixels, 10 classes), one fixed
stratified split (60 % train, 20 % validation, 20 % test, ``random_state=0``),
standardised per pixel with the training split's mean and standard deviation (floored at
one grey level, so that the nearly blank border pixels are not blown up).

* **Permuted Digits** (domain-incremental, one 10-way head): task 0 is the
  original images, task t > 0 the same images under a fixed pixel permutation
  (drawn once from ``numpy.random.default_rng(PERMUTATION_SEED)``).
* **Split Digits**: task t holds classes (2t, 2t+1). One 10-way head; the
  task-incremental accuracy takes the argmax within the task's two classes, the
  class-incremental accuracy over all ten.

The benchmark is the same for every seed; seeds change the initial weights and
the order of the mini-batches.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

__all__ = ["Task", "Benchmark", "BENCHMARKS", "MAX_TASKS", "load_digits_split", "make_benchmark"]

BENCHMARKS = ("permuted", "split")
MAX_TASKS = {"permuted": 20, "split": 5}
SPLIT_SEED = 0
PERMUTATION_SEED = 1234
N_PIXELS = 64
N_CLASSES = 10


@dataclass
class Task:
    """One task: its data per split and the classes it contains."""

    name: str
    classes: tuple[int, ...]
    x: dict[str, Tensor]           # "train" / "val" / "test" -> (N, 64) float32
    y: dict[str, Tensor]           # "train" / "val" / "test" -> (N,) int64
    permutation: Tensor | None = None   # Permuted Digits: input pixel i is original pixel permutation[i]


@dataclass
class Benchmark:
    """A sequence of tasks and the accuracy scenarios it is scored in."""

    name: str
    tasks: list[Task]
    scenarios: tuple[str, ...]     # "domain_il" | "task_il" | "class_il"
    n_classes: int = N_CLASSES
    info: dict = field(default_factory=dict)


def load_digits_split() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The fixed stratified train/val/test split, standardised with train statistics."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = x.astype(np.float64)
    x_train, x_rest, y_train, y_rest = train_test_split(
        x, y, test_size=0.4, stratify=y, random_state=SPLIT_SEED)
    x_val, x_test, y_val, y_test = train_test_split(
        x_rest, y_rest, test_size=0.5, stratify=y_rest, random_state=SPLIT_SEED)
    mean = x_train.mean(0)
    std = x_train.std(0)
    # Floor at one grey level (of 16): the border pixels are almost always 0 (std down to 0.02), and
    # dividing by that would turn their rare ink into inputs of several hundred.
    std = np.maximum(std, 1.0)
    out = {}
    for split, (xs, ys) in {"train": (x_train, y_train), "val": (x_val, y_val), "test": (x_test, y_test)}.items():
        out[split] = (((xs - mean) / std).astype(np.float32), ys.astype(np.int64))
    return out


def _tensors(data: dict[str, tuple[np.ndarray, np.ndarray]], rows: dict[str, np.ndarray] | None = None,
             perm: np.ndarray | None = None) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    xs, ys = {}, {}
    for split, (x, y) in data.items():
        if rows is not None:
            x, y = x[rows[split]], y[rows[split]]
        if perm is not None:
            x = x[:, perm]
        xs[split] = torch.from_numpy(np.ascontiguousarray(x))
        ys[split] = torch.from_numpy(np.ascontiguousarray(y))
    return xs, ys


def make_benchmark(name: str, n_tasks: int) -> Benchmark:
    """Build Permuted Digits or Split Digits with ``n_tasks`` tasks."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; expected one of {BENCHMARKS}")
    if not 2 <= n_tasks <= MAX_TASKS[name]:
        raise ValueError(f"{name} digits has 2 to {MAX_TASKS[name]} tasks, got {n_tasks}")
    data = load_digits_split()
    tasks: list[Task] = []
    if name == "permuted":
        rng = np.random.default_rng(PERMUTATION_SEED)
        for t in range(n_tasks):
            perm = np.arange(N_PIXELS) if t == 0 else rng.permutation(N_PIXELS)
            xs, ys = _tensors(data, perm=perm)
            tasks.append(Task(f"perm{t}", tuple(range(N_CLASSES)), xs, ys, torch.from_numpy(perm)))
        return Benchmark(name, tasks, ("domain_il",),
                         info={"permutation_seed": PERMUTATION_SEED, "task0": "identity"})
    for t in range(n_tasks):
        classes = (2 * t, 2 * t + 1)
        rows = {split: np.isin(y, classes) for split, (_, y) in data.items()}
        xs, ys = _tensors(data, rows=rows)
        tasks.append(Task(f"{classes[0]}/{classes[1]}", classes, xs, ys))
    return Benchmark(name, tasks, ("task_il", "class_il"))
