"""``ewc-fused bench [step|fisher|all|probe]``: run the benchmarks and write JSON, markdown and plots."""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from typing import Any

import torch

__all__ = ["add_parser", "run", "defaults"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``bench`` subcommand to an argparse subparsers object."""
    p = subparsers.add_parser(
        "bench", help="optimizer-step and per-sample Fisher benchmarks",
        description="Time the optimizer step (torch Adam, unfused EWC, FusedEWCAdam) and the per-sample "
                    "Fisher (estimate_fisher, loop, vmap, Opacus, BackPACK, tracked training). Writes "
                    "step.json, fisher.json, results.md and PNG plots under OUT/<device>/ "
                    "(OUT/<device>/quick/ with --quick).")
    p.add_argument("what", nargs="?", choices=("step", "fisher", "all", "probe"), default="all",
                   help="probe: the CPU measurements behind the README's 'What limits the CPU step' "
                        "(not part of all; same as python -m ewc_fused.bench.probe)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda when available, else cpu")
    p.add_argument("--sizes", type=float, nargs="+", default=None, metavar="N",
                   help="parameter counts of the GPT-like stacks (default: 25e6 125e6, plus 1e9 on CUDA; "
                        "25e6 with --quick; 0: none)")
    p.add_argument("--dtypes", nargs="+", choices=("fp32", "bf16"), default=None,
                   help="parameter dtypes (default: fp32 bf16; fp32 with --quick)")
    p.add_argument("--small-tensors", type=int, default=None, metavar="K",
                   help="tensors in the many-small-tensors set, each < 64K elements (default 384; 0: none)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (default 15; 5 with --quick)")
    p.add_argument("--compile", dest="compile_", action=argparse.BooleanOptionalAction, default=None,
                   help="include the torch.compile variants (default: on, off with --quick; CPU compiles "
                        "take 20-130 s each)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory measurements")
    p.add_argument("--quick", action="store_true", help="smaller set: under two minutes on a 2-core CPU")
    p.add_argument("--tiny", action="store_true", help="tiny models for the test suite: checks the "
                   "plumbing, the timings mean nothing")
    p.add_argument("--merge", action="store_true",
                   help="keep the configurations/workloads of the existing JSON in the output directory "
                        "that this run does not measure (to measure in pieces on a shared machine)")
    p.add_argument("--out", default=os.path.join("bench", "results"), help="results root (default bench/results)")
    return p


def defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the options left unset according to --quick / --tiny and the device."""
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("ewc-fused bench: --device cuda but torch.cuda.is_available() is False")
    small = args.quick or args.tiny
    if args.sizes is None:
        args.sizes = [2e5] if args.tiny else [25e6] if args.quick else (
            [25e6, 125e6, 1e9] if args.device == "cuda" else [25e6, 125e6])
    if args.dtypes is None:
        args.dtypes = ["fp32"] if small else ["fp32", "bf16"]
    if args.small_tensors is None:
        args.small_tensors = 8 if args.tiny else 384
    if args.repeats is None:
        args.repeats = 1 if args.tiny else 5 if args.quick else 15
    if args.compile_ is None:
        args.compile_ = not small
    return args


def run(args: argparse.Namespace) -> int:
    """Run what ``args`` asks for; print the markdown report; return an exit code."""
    from . import report
    from .fisher import run_fisher
    from .step import run_step

    if args.what == "probe":
        from .probe import main as probe_main

        if args.device not in (None, "cpu"):
            raise SystemExit("ewc-fused bench probe: it measures the CPU step (--device cpu)")
        argv = ["--out", args.out] + (["--params", str(args.sizes[0])] if args.sizes else [])
        argv += (["--repeats", str(args.repeats)] if args.repeats else [])
        argv += ([] if args.compile_ is None else ["--compile" if args.compile_ else "--no-compile"])
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        return probe_main(argv)
    args = defaults(args)
    # known, harmless, once per call: Opacus' and BackPACK's hooks on inputs that need no grad
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    # vmap over the sequence model's attention: torch 2.13 has no batching rule for CPU SDPA and says
    # so on every call; the vmap row's time includes that fallback
    warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet implemented "
                            "the batching rule")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sub = "tiny" if args.tiny else "quick" if args.quick else ""
    out_dir = os.path.join(args.out, device.type, sub) if sub else os.path.join(args.out, device.type)
    t0 = time.perf_counter()
    step = fisher = None
    if args.what in ("step", "all"):
        step = run_step(device, args.sizes, args.dtypes, args.small_tensors, args.repeats, args.compile_,
                        memory=args.memory, copy_bytes=1 << 24 if args.tiny else None)
    if args.what in ("fisher", "all"):
        mode = "tiny" if args.tiny else "quick" if args.quick else "full"
        fisher = run_fisher(device, mode, args.repeats, memory=args.memory)
    for r in (step, fisher):
        if r is not None:
            r["args"] = {k: v for k, v in vars(args).items() if k not in ("func",)}
            r["wall_s"] = time.perf_counter() - t0
    paths = report.write_all(out_dir, step, fisher, merge_old=args.merge)
    with open(paths["results.md"]) as f:
        print(f.read())
    print(f"wrote {', '.join(sorted(paths.values()))} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return 0
