"""The demo's experiment: λ per Fisher type, every method on every seed, the summaries.

:func:`run_demo` returns a JSON-ready dict (and the Fisher tensors the plots need);
:mod:`ewc_fused.demo.report` and :mod:`ewc_fused.demo.plots` write it out.
"""
from __future__ import annotations

import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Union

import torch
from torch import Tensor

from .data import BENCHMARKS, make_benchmark
from .methods import FISHERS, METHODS, MethodSpec, TrainConfig, ema_beta, run_method
from .metrics import all_metrics, mean_std, seen_average
from .sweep import default_lambda, run_search

__all__ = ["DemoConfig", "PRIMARY", "run_demo", "method_specs"]

# The scenario EWC is scored in for λ selection and the headline margins.
PRIMARY = {"permuted": "domain_il", "split": "task_il"}


@dataclass(frozen=True)
class DemoConfig:
    """Everything the demo's result depends on."""

    benchmarks: tuple[str, ...] = BENCHMARKS
    tasks: int = 5
    fishers: tuple[str, ...] = FISHERS                 # the first is the main one (online, reference)
    methods: tuple[str, ...] = METHODS
    lambdas: Union[str, tuple[float, ...]] = "auto"    # "auto" | "default" | candidate values
    seeds: int = 3
    search: str = "grid"
    trials: int = 5
    train: TrainConfig = field(default_factory=TrainConfig)
    threads: int = 1
    progress: bool = True


def method_specs(cfg: DemoConfig, lambdas: dict[str, float]) -> list[MethodSpec]:
    """The runs of one seed, in order (the fused main-Fisher EWC before its reference)."""
    main = cfg.fishers[0]
    specs: list[MethodSpec] = []
    for kind in cfg.methods:
        if kind == "ewc":
            specs += [MethodSpec(f"ewc[{f}]", "ewc", f, lambdas[f]) for f in cfg.fishers]
        elif kind in ("ewc-online", "ewc-reference"):
            specs.append(MethodSpec(f"{kind}[{main}]", kind, main, lambdas[main]))
        else:
            specs.append(MethodSpec(kind, kind))
    return specs


def _fishers_used(cfg: DemoConfig) -> tuple[str, ...]:
    if "ewc" in cfg.methods:
        return cfg.fishers
    if "ewc-online" in cfg.methods or "ewc-reference" in cfg.methods:
        return cfg.fishers[:1]
    return ()


def _n_candidates(cfg: DemoConfig) -> int:
    if cfg.lambdas == "default" or (isinstance(cfg.lambdas, tuple) and len(cfg.lambdas) == 1):
        return 0
    return len(cfg.lambdas) if isinstance(cfg.lambdas, tuple) else cfg.trials


def _summary(runs: dict[int, dict], scenarios: tuple[str, ...]) -> dict[str, Any]:
    seeds = sorted(runs)
    out: dict[str, Any] = {}
    for s in scenarios:
        mats = [runs[k]["R"][s] for k in seeds]
        T = len(mats[0])
        out[s] = {m: mean_std([runs[k]["metrics"][s][m] for k in seeds]) for m in ("avg_acc", "forgetting", "bwt")}
        out[s]["R_mean"] = [[mean_std([M[i][j] for M in mats])["mean"] for j in range(T)] for i in range(T)]
        out[s]["R_std"] = [[mean_std([M[i][j] for M in mats])["std"] for j in range(T)] for i in range(T)]
        curves = [seen_average(M) for M in mats]
        out[s]["seen_avg_mean"] = [mean_std([c[i] for c in curves])["mean"] for i in range(T)]
        out[s]["seen_avg_std"] = [mean_std([c[i] for c in curves])["std"] for i in range(T)]
    out["train_s"] = mean_std([runs[k]["train_s"] for k in seeds])
    out["fisher_s"] = mean_std([runs[k]["fisher_s"] for k in seeds])
    return out


def _max_abs_diff(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _pixel_importance(fisher: dict[str, Tensor]) -> list[float]:
    """Fisher of the first layer's weights (``0.weight`` of :func:`~ewc_fused.demo.methods.make_model`) summed over its
    outputs, per input pixel of task 0 (task 0 is unpermuted: input i is image pixel i)."""
    return [float(v) for v in fisher["0.weight"].sum(0)]


def run_demo(cfg: DemoConfig) -> tuple[dict[str, Any], dict[str, dict[str, dict[str, Tensor]]]]:
    """Run the whole demo. Returns (results, fishers) with fishers[benchmark][fisher type]
    the task-0 Fisher of the first seed (for the heatmaps)."""
    t_start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    seeds = list(range(cfg.seeds))
    used = _fishers_used(cfg)
    n_cand = _n_candidates(cfg)
    n_specs = len(method_specs(cfg, {f: 1.0 for f in cfg.fishers}))
    total = len(cfg.benchmarks) * (len(used) * n_cand + len(seeds) * n_specs)
    bar = _progress(total, cfg.progress)
    results: dict[str, Any] = {
        "config": _config_dict(cfg),
        "environment": {
            "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "machine": platform.machine(), "torch_threads": cfg.threads,
        },
        "benchmarks": {},
    }
    fishers_out: dict[str, dict[str, dict[str, Tensor]]] = {}
    try:
        for bname in cfg.benchmarks:
            t_bench = time.perf_counter()
            bench = make_benchmark(bname, cfg.tasks)
            primary = PRIMARY[bname]

            # λ per Fisher type
            lam_info: dict[str, dict[str, Any]] = {}
            for f in used:
                centre = default_lambda(bname, f)
                if cfg.lambdas == "default":
                    info = {"chosen": centre, "search": "default", "points": []}
                elif isinstance(cfg.lambdas, tuple) and len(cfg.lambdas) == 1:
                    info = {"chosen": cfg.lambdas[0], "search": "given", "points": []}
                else:
                    def score(lam: float, f: str = f) -> float:
                        bar.set_description(f"{bname} λ sweep [{f}] λ={lam:.3g}")
                        r = run_method(MethodSpec(f"sweep[{f}]", "ewc", f, lam), bench, cfg.train, seeds[0],
                                       split="val")
                        bar.update(1)
                        return all_metrics(r.R[primary])["avg_acc"]
                    info = run_search(score, search=cfg.search, centre=centre, trials=cfg.trials, seed=seeds[0],
                                      candidates=cfg.lambdas if isinstance(cfg.lambdas, tuple) else None)
                info.update(fisher=f, measured_default=centre, scored_on=f"val {primary} average accuracy, seed {seeds[0]}")
                if f == "tracked":
                    info["fisher_ema"] = ema_beta(bench.tasks[0].x["train"].shape[0], cfg.train.batch_size)
                lam_info[f] = info
            lambdas = {f: float(lam_info[f]["chosen"]) for f in used}

            # every method on every seed
            specs = method_specs(cfg, lambdas)
            runs: dict[str, dict[int, dict]] = {s.key: {} for s in specs}
            main = cfg.fishers[0]
            comparisons: dict[str, list[dict]] = {"fused_vs_reference": [], "ewc_vs_finetune": []}
            fishers_out[bname] = {}
            for seed in seeds:
                states: dict[str, dict[str, Tensor]] = {}
                main_fishers: Optional[list[dict[str, Tensor]]] = None
                for spec in specs:
                    bar.set_description(f"{bname} {spec.key} seed {seed}")
                    keep = spec.kind == "ewc" and (spec.fisher == main or seed == seeds[0])
                    r = run_method(spec, bench, cfg.train, seed, keep_fishers=keep,
                                   fishers=main_fishers if spec.kind == "ewc-reference" else None)
                    bar.update(1)
                    if spec.kind == "ewc" and spec.fisher == main:
                        main_fishers = r.fishers
                    if spec.kind == "ewc" and seed == seeds[0] and r.fishers:
                        fishers_out[bname][spec.fisher] = r.fishers[0]
                    states[spec.key] = r.state
                    runs[spec.key][seed] = {
                        "R": r.R, "metrics": {s: all_metrics(M) for s, M in r.R.items()},
                        "train_s": r.train_s, "fisher_s": r.fisher_s,
                    }
                ref_key, fused_key = f"ewc-reference[{main}]", f"ewc[{main}]"
                if ref_key in runs and fused_key in runs:
                    fa, ra = runs[fused_key][seed]["metrics"], runs[ref_key][seed]["metrics"]
                    comparisons["fused_vs_reference"].append({
                        "seed": seed, "fisher": main, "lambda": lambdas[main],
                        **{s: {"fused": fa[s]["avg_acc"], "reference": ra[s]["avg_acc"],
                               "diff_points": 100 * (fa[s]["avg_acc"] - ra[s]["avg_acc"])} for s in bench.scenarios},
                        "max_abs_weight_diff": _max_abs_diff(states[fused_key], states[ref_key]),
                    })
                if "finetune" in runs:
                    for key in runs:
                        if key.startswith("ewc"):
                            comparisons["ewc_vs_finetune"].append({
                                "seed": seed, "method": key,
                                **{s: 100 * (runs[key][seed]["metrics"][s]["avg_acc"]
                                             - runs["finetune"][seed]["metrics"][s]["avg_acc"])
                                   for s in bench.scenarios}})
            spec_by_key = {s.key: s for s in specs}
            results["benchmarks"][bname] = {
                "scenarios": list(bench.scenarios), "primary_scenario": primary,
                "tasks": [{"name": t.name, "classes": list(t.classes), "n_train": int(t.y["train"].shape[0]),
                           "n_val": int(t.y["val"].shape[0]), "n_test": int(t.y["test"].shape[0])} for t in bench.tasks],
                "info": bench.info, "lambda": lam_info,
                "methods": {
                    key: {"label": spec_by_key[key].label, "kind": spec_by_key[key].kind,
                          "fisher": spec_by_key[key].fisher, "lambda": spec_by_key[key].ewc_lambda,
                          "seeds": {str(s): v for s, v in by_seed.items()},
                          "summary": _summary(by_seed, bench.scenarios)}
                    for key, by_seed in runs.items()},
                "comparisons": comparisons,
                "fisher_task0": {
                    f: {"trace": float(sum(float(v.sum()) for v in F.values())),
                        "pixel_importance": _pixel_importance(F)}
                    for f, F in fishers_out[bname].items()},
                "wall_s": time.perf_counter() - t_bench,
            }
    finally:
        bar.close()
        torch.set_num_threads(threads)
    results["wall_s"] = time.perf_counter() - t_start
    return results, fishers_out


def _config_dict(cfg: DemoConfig) -> dict[str, Any]:
    d = asdict(cfg)
    d["lambdas"] = cfg.lambdas if isinstance(cfg.lambdas, str) else list(cfg.lambdas)
    d["seed_list"] = list(range(cfg.seeds))
    return d


class _NoBar:
    def update(self, n: int = 1) -> None: ...
    def set_description(self, desc: str) -> None: ...
    def close(self) -> None: ...


def _progress(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return _NoBar()
    return tqdm(total=total, unit="run", file=sys.stderr, dynamic_ncols=True)
