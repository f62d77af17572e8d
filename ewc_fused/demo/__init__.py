"""``ewc-fused demo``: continual learning on Permuted Digits and Split Digits.

Fine-tuning, EWC through :class:`ewc_fused.FusedEWCAdam` (multi-task and online), the
textbook EWC of :mod:`ewc_fused.reference` on the same Fisher tensors, LwF, replay and
joint training, on the same seeds; EWC with the exact / empirical / sampled / batch /
tracked Fisher side by side; λ chosen per Fisher type on a validation split. Writes
``results.json``, ``report.md`` and PNG figures under ``--out``.

Modules: :mod:`.data` (benchmarks), :mod:`.methods` (training), :mod:`.metrics`,
:mod:`.sweep` (λ search), :mod:`.experiment` (the whole run), :mod:`.report`
(JSON, markdown, atomic writes), :mod:`.plots` (matplotlib, imported lazily).
scikit-learn and matplotlib are needed to run it: ``pip install "ewc-fused[demo]"``.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any, Optional

__all__ = ["add_parser", "run", "parse_lambdas"]

_DEFAULT_OUT = "results"


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _nonneg_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {v}")
    return v


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return v


def _unit_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return v


def parse_lambdas(tokens: list[str]) -> "str | tuple[float, ...]":
    """``auto``, ``default``, or λ values (space- or comma-separated, finite, >= 0).

    Raises ValueError with a message for the user.
    """
    parts = [p for tok in tokens for p in tok.split(",") if p.strip()]
    if not parts:
        raise ValueError("--lambda needs 'auto', 'default' or one or more numbers")
    words = [p.strip().lower() for p in parts]
    if any(w in ("auto", "default") for w in words):
        if len(words) != 1:
            raise ValueError(f"--lambda {words[0] if words[0] in ('auto', 'default') else 'auto'} cannot be "
                             "combined with other values")
        return words[0]
    values = []
    for p in parts:
        try:
            v = float(p)
        except ValueError:
            raise ValueError(f"--lambda: {p!r} is not a number, 'auto' or 'default'") from None
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"--lambda: {p!r} must be a finite number >= 0")
        values.append(v)
    if len(set(values)) != len(values):
        raise ValueError(f"--lambda: repeated values in {values}")
    return tuple(values)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``demo`` subcommand to an argparse subparsers object; return its parser."""
    from .data import BENCHMARKS, MAX_TASKS
    from .methods import FISHERS, METHODS
    from .sweep import SEARCHES

    p = subparsers.add_parser(
        "demo", help="continual-learning demo: Permuted/Split Digits, EWC vs fine-tune, LwF, replay, joint",
        description="Continual learning on scikit-learn's digits: fine-tune, EWC through FusedEWCAdam (multi and "
                    "online) and through the textbook reference, LwF, replay and joint training on the same seeds; "
                    "EWC with each Fisher type; λ chosen per Fisher type on a validation split. Writes results.json, "
                    "report.md and PNG figures under --out.")
    p.add_argument("--benchmark", nargs="+", choices=BENCHMARKS, default=list(BENCHMARKS), metavar="NAME",
                   help=f"benchmarks to run, of {', '.join(BENCHMARKS)} (default: both)")
    p.add_argument("--tasks", type=_positive_int, default=5, metavar="N",
                   help=f"tasks per benchmark (default 5; permuted 2..{MAX_TASKS['permuted']}, "
                        f"split 2..{MAX_TASKS['split']})")
    p.add_argument("--fisher", nargs="+", choices=FISHERS, default=list(FISHERS), metavar="TYPE",
                   help=f"Fisher types for EWC, side by side, of {', '.join(FISHERS)}; the first is the one online "
                        "and reference EWC use (default: all, exact first)")
    p.add_argument("--lambda", dest="lambdas", nargs="+", default=["auto"], metavar="LAMBDA",
                   help="'auto' (default): search λ per Fisher type on the validation split around its measured "
                        "default; 'default': the measured defaults, no search; one number: that λ for every Fisher; "
                        "several numbers: search over them")
    p.add_argument("--search", choices=SEARCHES, default="grid",
                   help="how --lambda auto searches: log grid (default), random log-uniform, or optuna TPE "
                        "(needs optuna)")
    p.add_argument("--trials", type=_positive_int, default=5, metavar="N", help="λ candidates per Fisher type (default 5)")
    p.add_argument("--seeds", type=_positive_int, default=3, metavar="N", help="number of seeds, 0..N-1 (default 3)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), metavar="METHOD",
                   help=f"methods, of {', '.join(METHODS)} (default: all)")
    p.add_argument("--epochs", type=_positive_int, default=5, metavar="N", help="epochs per task (default 5)")
    p.add_argument("--hidden", type=_positive_int, nargs="+", default=[256, 256], metavar="WIDTH",
                   help="hidden layer widths of the MLP (default 256 256)")
    p.add_argument("--batch-size", type=_positive_int, default=32, metavar="N", help="mini-batch size (default 32)")
    p.add_argument("--lr", type=_positive_float, default=1e-3, help="Adam learning rate (default 1e-3)")
    p.add_argument("--replay-per-task", type=_nonneg_int, default=20, metavar="N",
                   help="replay buffer samples kept per task (default 20)")
    p.add_argument("--online-decay", type=_unit_float, default=1.0, metavar="GAMMA",
                   help="online EWC decay γ of earlier Fisher (default 1.0)")
    p.add_argument("--threads", type=_positive_int, default=1, metavar="N",
                   help="torch CPU threads (default 1: fastest for this small MLP)")
    p.add_argument("--out", type=Path, default=Path(_DEFAULT_OUT), metavar="DIR", help="output folder (default results/)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(demo_parser=p)
    return p


def _config(args: argparse.Namespace, parser: argparse.ArgumentParser):
    from .data import MAX_TASKS
    from .experiment import DemoConfig
    from .methods import METHODS, TrainConfig
    from .sweep import optuna_available

    try:
        lambdas = parse_lambdas(args.lambdas)
    except ValueError as e:
        parser.error(str(e))
    benchmarks = tuple(dict.fromkeys(args.benchmark))
    for b in benchmarks:
        if args.tasks < 2 or args.tasks > MAX_TASKS[b]:
            parser.error(f"--tasks {args.tasks}: {b} digits has 2 to {MAX_TASKS[b]} tasks")
    if len(set(args.fisher)) != len(args.fisher):
        parser.error(f"--fisher: repeated Fisher types in {args.fisher}")
    methods = tuple(m for m in METHODS if m in args.methods)    # canonical order: ewc before its reference
    if "ewc-reference" in methods and "ewc" not in methods:
        parser.error("--methods ewc-reference needs ewc too (the reference reuses the fused run's Fisher tensors)")
    if args.search == "optuna" and lambdas == "auto" and not optuna_available():
        parser.error("--search optuna: optuna is not installed (pip install optuna), or use --search grid|random")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out}: exists and is not a folder")
    train = TrainConfig(hidden=tuple(args.hidden), epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                        replay_per_task=args.replay_per_task, online_decay=args.online_decay)
    return DemoConfig(benchmarks=benchmarks, tasks=args.tasks, fishers=tuple(args.fisher), methods=methods,
                      lambdas=lambdas, seeds=args.seeds, search=args.search, trials=args.trials, train=train,
                      threads=args.threads, progress=not args.no_progress)


def run(args: argparse.Namespace, out=None) -> int:
    """Run the demo for parsed ``demo`` arguments; print the tables; return the exit code."""
    out = out or sys.stdout
    parser: Optional[argparse.ArgumentParser] = getattr(args, "demo_parser", None)
    if parser is None:
        parser = add_parser(argparse.ArgumentParser(prog="ewc-fused").add_subparsers())
    cfg = _config(args, parser)
    try:
        import matplotlib  # noqa: F401
        import sklearn  # noqa: F401
    except ImportError as e:
        print(f"ewc-fused demo needs scikit-learn and matplotlib: pip install \"ewc-fused[demo]\" ({e})",
              file=sys.stderr)
        return 1
    from .experiment import run_demo
    from .plots import write_plots
    from .report import atomic_write_text, markdown, summary_tables, write_json

    results, fishers = run_demo(cfg)
    args.out.mkdir(parents=True, exist_ok=True)
    figures = write_plots(results, fishers, args.out, cfg.fishers[0])
    results["figures"] = figures
    write_json(results, args.out / "results.json")
    atomic_write_text(args.out / "report.md", markdown(results, figures) + "\n")
    print(summary_tables(results), file=out)
    print(f"wall time {results['wall_s']:.1f} s; wrote {args.out / 'results.json'}, {args.out / 'report.md'} and "
          f"{sum(len(v) for v in figures.values())} PNG figures", file=out)
    return 0
