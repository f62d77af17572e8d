"""Writing the demo's results: atomic file writes, the JSON and the markdown report."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .._atomic import atomic_write_bytes, atomic_write_text

__all__ = ["atomic_write_bytes", "atomic_write_text", "write_json", "markdown", "summary_tables", "SCENARIO_NAMES"]

SCENARIO_NAMES = {"domain_il": "domain-incremental", "task_il": "task-incremental", "class_il": "class-incremental"}


def write_json(results: dict[str, Any], path: Path) -> None:
    """The results as indented JSON (non-finite floats are refused)."""
    atomic_write_text(path, json.dumps(results, indent=1, allow_nan=False, ensure_ascii=False) + "\n")


def _pm(stat: dict[str, float], scale: float = 100.0, digits: int = 1) -> str:
    return f"{stat['mean'] * scale:.{digits}f} ± {stat['std'] * scale:.{digits}f}"


def _lam(v: Any) -> str:
    """λ with 3 significant digits, without exponents between 100 and 10⁶."""
    if v is None:
        return "–"
    if 100 <= v < 1e6:
        return f"{round(v, 2 - int(math.floor(math.log10(v)))):.0f}"
    return f"{v:.3g}"


def summary_tables(results: dict[str, Any]) -> str:
    """The headline tables (methods, Fisher variants, fused vs reference), in markdown."""
    lines: list[str] = []
    n_seeds = results["config"]["seeds"]
    for bname, b in results["benchmarks"].items():
        scen = b["scenarios"]
        methods = b["methods"]
        title = {"permuted": "Permuted Digits", "split": "Split Digits"}.get(bname, bname)
        lines.append(f"### {title} ({len(b['tasks'])} tasks, {n_seeds} seed{'s' if n_seeds > 1 else ''}, "
                     f"mean ± std over seeds, accuracy in %)")
        lines.append("")
        head = "| method | Fisher | λ |"
        sep = "|---|---|---|"
        for s in scen:
            short = {"domain_il": "", "task_il": " task-IL", "class_il": " class-IL"}[s]
            head += f" avg acc{short} | forgetting{short} | BWT{short} |"
            sep += "---|---|---|"
        head += " train s | Fisher s |"
        sep += "---|---|"
        lines += [head, sep]
        main_rows = [k for k, m in methods.items() if not (m["kind"] == "ewc" and k != _main_ewc_key(b))]
        fisher_rows = [k for k, m in methods.items() if m["kind"] == "ewc" and k != _main_ewc_key(b)]
        for key in main_rows + fisher_rows:
            m = methods[key]
            s_ = m["summary"]
            row = f"| {m['label']} | {m['fisher'] or '–'} | {_lam(m['lambda'])} |"
            for s in scen:
                row += f" {_pm(s_[s]['avg_acc'])} | {_pm(s_[s]['forgetting'])} | {_pm(s_[s]['bwt'])} |"
            row += f" {s_['train_s']['mean']:.2f} | {s_['fisher_s']['mean']:.3f} |"
            lines.append(row)
        lines.append("")
        cmp_ = b["comparisons"]
        if cmp_["fused_vs_reference"]:
            lines.append("Fused vs reference EWC (same Fisher tensors, same λ), per seed:")
            lines.append("")
            lines.append("| seed | " + " | ".join(f"fused {SCENARIO_NAMES[s]}" for s in scen) + " | "
                         + " | ".join(f"reference {SCENARIO_NAMES[s]}" for s in scen)
                         + " | max difference (points) | max abs weight difference |")
            lines.append("|---|" + "---|" * (2 * len(scen) + 2))
            for c in cmp_["fused_vs_reference"]:
                diff = max(abs(c[s]["diff_points"]) for s in scen)
                lines.append(f"| {c['seed']} | " + " | ".join(f"{100 * c[s]['fused']:.2f}" for s in scen) + " | "
                             + " | ".join(f"{100 * c[s]['reference']:.2f}" for s in scen)
                             + f" | {diff:.2f} | {c['max_abs_weight_diff']:.2e} |")
            lines.append("")
        main_key = _main_ewc_key(b)
        margins = [c for c in cmp_["ewc_vs_finetune"] if c["method"] == main_key]
        if margins:
            parts = []
            for s in scen:
                vals = [c[s] for c in margins]
                parts.append(f"{SCENARIO_NAMES[s]}: {_fmt_list(vals)} points (min {min(vals):+.1f})")
            lines.append(f"EWC fused [{methods[main_key]['fisher']}] minus fine-tune, average accuracy per seed: "
                         + "; ".join(parts) + ".")
            lines.append("")
    return "\n".join(lines)


def _fmt_list(vals: list[float]) -> str:
    return ", ".join(f"{v:+.1f}" for v in vals)


def _main_ewc_key(b: dict[str, Any]) -> str | None:
    for key, m in b["methods"].items():
        if m["kind"] in ("ewc-online", "ewc-reference"):
            return f"ewc[{m['fisher']}]" if f"ewc[{m['fisher']}]" in b["methods"] else None
    for key, m in b["methods"].items():
        if m["kind"] == "ewc":
            return key
    return None


def markdown(results: dict[str, Any], figures: dict[str, list[str]]) -> str:
    """The full report: settings, tables, λ selection, Fisher magnitudes, figures."""
    cfg = results["config"]
    tr = cfg["train"]
    env = results["environment"]
    out = ["# ewc-fused continual-learning demo", ""]
    out.append(f"Seeds {cfg['seed_list']}; {cfg['tasks']} tasks; MLP 64-{'-'.join(map(str, tr['hidden']))}-10; "
               f"{tr['epochs']} epochs per task, batch {tr['batch_size']}, Adam lr {tr['lr']:g}; "
               f"replay {tr['replay_per_task']} samples per task; LwF α={tr['lwf_alpha']:g}, τ={tr['lwf_temperature']:g}; "
               f"online EWC decay {tr['online_decay']:g}.")
    out.append(f"torch {env['torch']} on {env['machine']}, {env['torch_threads']} thread(s); total wall time "
               f"{results['wall_s']:.1f} s.")
    out.append("")
    out.append("Average accuracy = mean final accuracy over all tasks; forgetting = mean over earlier tasks of "
               "(best accuracy before the last task − final accuracy); BWT = mean of (final − just-trained) accuracy. "
               "Train s and Fisher s: seconds per run in the training loops and in Fisher estimation + consolidation "
               "(the tracked Fisher's cost is inside training; the reference reuses the fused run's Fisher, so its "
               "Fisher s is consolidation only). Times are wall-clock on a shared machine: noisy.")
    out.append("")
    out.append(summary_tables(results))
    for bname, b in results["benchmarks"].items():
        out.append(f"### λ per Fisher type ({bname})")
        out.append("")
        out.append("| Fisher | chosen λ | how | candidates: val score (%) | trace of the Fisher after task 1, first seed |")
        out.append("|---|---|---|---|---|")
        for f, info in b["lambda"].items():
            pts = ", ".join(f"{_lam(p['lambda'])}: {100 * p['val_score']:.1f}" for p in info["points"]) or "–"
            trace = b["fisher_task0"].get(f, {}).get("trace")
            kind = f" (fisher_ema β={info['fisher_ema']:.3f})" if "fisher_ema" in info else ""
            out.append(f"| {f}{kind} | {_lam(info['chosen'])} | {info['search']} | {pts} | "
                       f"{'–' if trace is None else f'{trace:.3g}'} |")
        out.append("")
        if b["lambda"]:
            any_info = next(iter(b["lambda"].values()))
            out.append(f"Scored on: {any_info['scored_on']}.")
            out.append("")
    if figures:
        out.append("## Figures")
        out.append("")
        for bname, files in figures.items():
            for f in files:
                out.append(f"![{f}]({f})")
                out.append("")
    return "\n".join(out)

