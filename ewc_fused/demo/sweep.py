"""Choosing λ per Fisher type on the validation split.

λ belongs to a kind of Fisher: the per-sample Fishers (exact, sampled, empirical,
tracked) and the squared mini-batch gradient Fisher (batch) differ by about the batch
size, and exact differs from empirical by the model's confidence. Each Fisher type therefore has its
own search range, centred on :data:`DEFAULT_LAMBDA`, the best λ measured on a wide
sweep of this demo (see the README's "Demo" section for the sweep that set them).

Searches (each candidate is one EWC run of the whole task sequence, scored by the final
average accuracy on the validation split, on the first seed):

* ``grid``: ``trials`` points evenly spaced in log λ over [centre/10, centre·10];
* ``random``: ``trials`` log-uniform draws over the same range (seeded);
* ``optuna``: Optuna's TPE sampler (Bayesian) over the same range, when optuna is installed.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Callable

import numpy as np

__all__ = ["DEFAULT_LAMBDA", "SEARCHES", "SPAN_DECADES", "default_lambda", "search_range", "grid", "run_search",
           "optuna_available"]

SEARCHES = ("grid", "random", "optuna")
SPAN_DECADES = 1.0   # the search range is centre × 10^[−SPAN, +SPAN]

# Best λ on the validation split (final average accuracy: domain-IL on Permuted, task-IL on Split),
# seed 0, default settings (5 tasks, 5 epochs, MLP 64-256-256-10, batch 32), from a wide sweep
# 10^0 … 10^6 in half-decade steps, rounded to 1 or 3 × 10^k. The README's "Demo" section
# shows that sweep. Split Digits wants ~10-30× more than Permuted: after training on two
# classes the model is confident, and its Fisher is small.
DEFAULT_LAMBDA: dict[str, dict[str, float]] = {
    "permuted": {"exact": 100.0, "empirical": 1000.0, "sampled": 300.0, "batch": 30000.0, "tracked": 300.0},
    "split": {"exact": 3000.0, "empirical": 10000.0, "sampled": 3000.0, "batch": 300000.0, "tracked": 3000.0},
}


def default_lambda(benchmark: str, fisher: str) -> float:
    """The measured default λ of a Fisher type on a benchmark."""
    return DEFAULT_LAMBDA[benchmark][fisher]


def search_range(centre: float) -> tuple[float, float]:
    """[centre/10^SPAN, centre·10^SPAN]."""
    return centre * 10 ** -SPAN_DECADES, centre * 10 ** SPAN_DECADES


def grid(centre: float, points: int) -> list[float]:
    """``points`` values evenly spaced in log λ over :func:`search_range` (the centre alone for 1)."""
    if points == 1:
        return [centre]
    lo, hi = search_range(centre)
    # 12 significant digits: 300, not 300.0000000000001
    return [float(f"{v:.12g}") for v in np.logspace(math.log10(lo), math.log10(hi), points)]


def optuna_available() -> bool:
    """True when optuna imports."""
    try:
        import optuna  # noqa: F401
    except ImportError:
        return False
    return True


def run_search(score: Callable[[float], float], *, search: str, centre: float, trials: int, seed: int,
               candidates: Sequence[float] | None = None) -> dict:
    """Evaluate λ candidates with ``score`` (higher is better); return the chosen λ and every point.

    ``candidates`` (a user's list) overrides ``search``. Ties go to the smaller λ.
    """
    points: list[tuple[float, float]] = []
    if candidates is not None:
        for lam in candidates:
            points.append((float(lam), score(float(lam))))
        used = "list"
    elif search == "grid":
        for lam in grid(centre, trials):
            points.append((lam, score(lam)))
        used = "grid"
    elif search == "random":
        lo, hi = search_range(centre)
        rng = np.random.default_rng(seed)
        for u in rng.uniform(math.log10(lo), math.log10(hi), trials):
            lam = float(10 ** u)
            points.append((lam, score(lam)))
        used = "random"
    elif search == "optuna":
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        lo, hi = search_range(centre)
        study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))

        def objective(trial) -> float:
            lam = trial.suggest_float("lambda", lo, hi, log=True)
            value = score(lam)
            points.append((lam, value))
            return value

        study.optimize(objective, n_trials=trials)
        used = "optuna-tpe"
    else:
        raise ValueError(f"unknown search {search!r}; expected one of {SEARCHES}")
    best = max(points, key=lambda p: (p[1], -p[0]))
    return {"chosen": best[0], "search": used, "points": [{"lambda": lam, "val_score": v} for lam, v in points]}
