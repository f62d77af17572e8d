"""Benchmark outputs: raw JSON, a markdown report and PNG plots in one directory."""
from __future__ import annotations

import io
import json
import math
import os
from typing import Any, Optional

from ewc_fused._atomic import atomic_write_bytes, atomic_write_text

__all__ = ["write_json", "load_json", "markdown", "merge", "plot_step", "plot_fisher", "write_all"]

MIB = 2**20


def _save_png(fig: Any, path: str) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, dpi=110, format="png")
    atomic_write_bytes(path, buf.getvalue())


def write_json(data: dict[str, Any], path: str) -> None:
    atomic_write_text(path, json.dumps(data, indent=1))


def load_json(path: str) -> Optional[dict[str, Any]]:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _f(x: Optional[float], fmt: str = ".1f", suffix: str = "") -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:{fmt}}{suffix}"


def _ms(x: float) -> str:
    return f"{x:.3f}" if x < 1 else f"{x:.2f}" if x < 10 else f"{x:.1f}"


def _env_lines(env: dict[str, Any]) -> list[str]:
    versions = ", ".join(f"{k} {env[k]}" for k in ("torch", "triton", "ewc_fused", "opacus", "backpack", "python")
                         if env.get(k))
    lines = [f"- Device: {env['device']}" + (f", CUDA {env['cuda']}" if env.get("cuda") else ""),
             f"- Versions: {versions}",
             f"- Started {env['time']}"]
    if env.get("loadavg_start"):
        end = env.get("loadavg_end")
        lines.append(f"- Load average (1/5/15 min) at start {'/'.join(f'{x:.2f}' for x in env['loadavg_start'])}"
                     + (f", at end {'/'.join(f'{x:.2f}' for x in end)}" if end else ""))
    lines.append(f"- Peak extra memory: {env['memory_method']}")
    return lines


def _when(block: dict[str, Any]) -> str:
    if "started" not in block:
        return ""
    load = ""
    if block.get("load1_start") is not None:
        load = f"; 1-minute load average {block['load1_start']:.2f} at the start, {block['load1_end']:.2f} at the end"
    return f"Measured {block['started']} to {block['ended'][-8:]}{load}."


def step_markdown(step: dict[str, Any]) -> list[str]:
    bw = step["copy_bandwidth"]
    lines = ["## Optimizer step", "", *_env_lines(step["env"]),
             f"- Copy bandwidth (`dst.copy_(src)`, {bw['bytes'] / 2 / MIB:.0f} MiB fp32): {bw['gb_per_s']:.1f} GB/s",
             f"- λ = {step['lambda']}, lr = {step['lr']}, running Fisher β = {step['fisher_ema']}; gradients preset, "
             "only the optimizer work is timed; median of repeats after warm-up.",
             "- GB/s: the variant's byte floor (7 accesses per element for Adam, 9 with EWC or AMSGrad, 11 with the "
             "running Fisher) divided by its time. adam_fused_amsgrad is torch's own one-pass kernel moving as many "
             "bytes as fused EWC-Adam: the control for what 9 accesses cost on this device. % of Adam: that over "
             "fused Adam's GB/s, i.e. how close the variant comes to its byte floor at the bandwidth torch's fused Adam reaches (100% = floor/Adam floor × "
             "Adam's time). The copy bandwidth counts 2 accesses per element; with write-allocate a CPU moves "
             "3, so Adam's GB/s can exceed it.",
             "- Peak extra: transient memory during one steady step (the second: state created by the first "
             "is not transient) above what was allocated before it; state: what the optimizer keeps besides θ "
             "and g.",
             "- Timing: every variant steps the same shared tensors, in rounds with other variants so that all see "
             "the same load. Unmarked rows ran interleaved (one step of every eager variant per round). Rows "
             "marked * ran in rounds with fused Adam only (torch.compile variants, and configurations too large "
             "to hold every variant at once); their × columns use the fused-Adam median of their own rounds "
             "(adam_fused's own row pools all its rounds).", ""]
    for c in step["configs"]:
        lines += [f"### {c['name']}: {c['params'] / 1e6:.1f}M parameters in {c['tensors']} tensors "
                  f"(largest {c['max_tensor']:,} elements)", "", _when(c), "",
                  "| variant | EWC state | ms/step | min | max | × fused Adam | × autograd EWC | GB/s | "
                  "% of Adam | peak extra MiB | state MiB |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        notes = []
        for name, r in c["results"].items():
            if "error" in r:
                lines.append(f"| {name} | | error | | | | | | | | |")
                notes.append(f"{name}: {r['error']}")
                continue
            state = (r["ewc_dtype"] or "") + (" + F_run" if r.get("ema") else "") if r.get("ewc_dtype") else "–"
            pk = r.get("peak_extra_bytes")
            adam_bw = c["results"].get("adam_fused", {}).get("gb_per_s")
            star = "*" if r.get("timing") == "paired" else ""
            lines.append(
                f"| {name}{star} | {state} | {_ms(r['median_ms'])} | {_ms(r['min_ms'])} | {_ms(r['max_ms'])} | "
                f"{_f(r.get('vs_adam_fused'), '.2f', '×')} | {_f(r.get('vs_ewc_autograd'), '.2f', '×')} | "
                f"{r['gb_per_s']:.1f} | {_f(100 * r['gb_per_s'] / adam_bw if adam_bw else None, '.0f', '%')} | "
                f"{_f(pk / MIB if pk is not None else None)} | {r['state_bytes'] / MIB:.0f} |")
            if "compile_s" in r:
                notes.append(f"{name}: compile + first step {r['compile_s']:.1f} s (inductor caches disabled), "
                             "not in the timings")
        lines += [""] + [f"- {n}" for n in notes] + ([""] if notes else [])
    return lines


def fisher_markdown(fisher: dict[str, Any]) -> list[str]:
    lines = ["## Per-sample Fisher", "", *_env_lines(fisher["env"]),
             "- Empirical Fisher (mean of per-sample squared gradients). Fisher rows: time for all batches relative "
             "to `plain` (forward + backward of the batch-mean loss). Training rows: relative to `train_plain` "
             "(forward, backward, `torch.optim.Adam(fused=True)` step per batch).",
             "- Extra vs base: peak memory of the call minus the base row's. Rel. err: max over tensors of "
             "max|F − F_loop| / max|F_loop| (the tracked step: its running Fisher after one step against the "
             "loop's Fisher of that batch).",
             "- All methods of a workload ran interleaved: set up first, then timed in rounds (one call of each "
             "per round); the slow ones sat out the second half of the rounds.", ""]
    for w in fisher["workloads"]:
        lines += [f"### {w['name']} (T = {w['tokens']}): {w['desc']}; {w['params'] / 1e6:.2f}M parameters", "",
                  _when(w), "",
                  "| method | ms | min | max | × base | peak MiB | extra vs base MiB | rel. err |",
                  "|---|---|---|---|---|---|---|---|"]
        notes = []
        for name, r in w["results"].items():
            if "skipped" in r or "error" in r:
                what = "skipped" if "skipped" in r else "error"
                lines.append(f"| {name} | {what} | | | | | | |")
                notes.append(f"{name}: {r.get('skipped') or r.get('error')}")
                continue
            pk, ex = r.get("peak_extra_bytes"), r.get("extra_vs_base_bytes")
            err = r.get("max_rel_err")
            cov = ""
            if r.get("covered") is not None and r["covered"] < r["tensors"]:
                cov = f" ({r['covered']}/{r['tensors']} tensors)"
                notes.append(f"{name}: covers {r['covered']} of {r['tensors']} parameter tensors (LayerNorm "
                             "has no BackPACK extension); its cost is that of the covered ones")
            lines.append(
                f"| {name} | {_ms(r['median_ms'])} | {_ms(r['min_ms'])} | {_ms(r['max_ms'])} | "
                f"{_f(r.get('vs_base'), '.2f', '×')} | {_f(pk / MIB if pk is not None else None)} | "
                f"{_f(ex / MIB if ex is not None else None, '+.1f')} | {_f(err, '.1e')}{cov} |")
        lines += [""] + [f"- {n}" for n in notes] + ([""] if notes else [])
    return lines


def markdown(step: Optional[dict[str, Any]], fisher: Optional[dict[str, Any]], plots: list[str]) -> str:
    """The report: environment, step tables, Fisher tables, links to the plots."""
    dev = (step or fisher or {}).get("env", {}).get("device", "?")
    lines = [f"# ewc-fused benchmarks on {dev}", "",
             "Written by `ewc-fused bench`; raw timings (every repeat) are in the JSON files beside this one.", ""]
    if step:
        lines += step_markdown(step)
    if fisher:
        lines += fisher_markdown(fisher)
    if plots:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_step(step: dict[str, Any], out_dir: str) -> list[str]:
    """step_time.png (ms/step vs parameter count, per parameter dtype) and step_bandwidth.png."""
    plt = _plt()
    written = []
    dtypes = sorted({c["dtype"] for c in step["configs"]})
    fig, axes = plt.subplots(1, len(dtypes), figsize=(6.5 * len(dtypes), 4.8), squeeze=False)
    for ax, dt in zip(axes[0], dtypes):
        cfgs = sorted((c for c in step["configs"] if c["dtype"] == dt), key=lambda c: c["params"])
        for name in step["variants"]:
            pts = [(c["params"], c["results"][name]["median_ms"], c["kind"]) for c in cfgs
                   if "median_ms" in c["results"].get(name, {})]
            gpt = [(x, y) for x, y, k in pts if k == "gpt"]
            if not pts:
                continue
            style = "-" if name.startswith("fused_ewc") else "--" if name.startswith("ewc") else ":"
            line = ax.plot([x for x, _ in gpt], [y for _, y in gpt], style, marker="o", label=name)[0] if gpt else None
            small = [(x, y) for x, y, k in pts if k == "small"]
            if small:
                ax.plot([x for x, _ in small], [y for _, y in small], marker="s", linestyle="none",
                        color=line.get_color() if line else None, label=None if line else name)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("parameters (circles: GPT-like stack; squares: many small tensors)")
        ax.set_ylabel("ms per optimizer step (median)")
        ax.set_title(f"{dt} parameters")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="upper left")
    fig.suptitle(f"Optimizer step: {step['env']['device']}", fontsize=10)
    fig.tight_layout()
    path = os.path.join(out_dir, "step_time.png")
    _save_png(fig, path)
    plt.close(fig)
    written.append("step_time.png")

    n = len(step["configs"])
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 0.32 * len(step["variants"]) * rows + 1.5 * rows),
                             squeeze=False)
    for i, c in enumerate(step["configs"]):
        ax = axes[i // cols][i % cols]
        names = [k for k in step["variants"] if "gb_per_s" in c["results"].get(k, {})]
        vals = [c["results"][k]["gb_per_s"] for k in names]
        colors = ["tab:green" if k.startswith("fused_ewc") else "tab:orange" if k.startswith("ewc") else "tab:gray"
                  for k in names]
        ax.barh(range(len(names)), vals, color=colors)
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels(names, fontsize=7)
        ax.invert_yaxis()
        adam_bw = c["results"].get("adam_fused", {}).get("gb_per_s")
        if adam_bw:
            ax.axvline(adam_bw, color="k", linestyle="--", linewidth=1)
        ax.set_xlabel("byte floor / time, GB/s (dashed: torch fused Adam)", fontsize=8)
        ax.set_title(f"{c['name']} ({c['params'] / 1e6:.1f}M in {c['tensors']} tensors)", fontsize=9)
    for j in range(n, rows * cols):
        axes[j // cols][j % cols].axis("off")
    fig.tight_layout()
    _save_png(fig, os.path.join(out_dir, "step_bandwidth.png"))
    plt.close(fig)
    written.append("step_bandwidth.png")
    return written


def plot_fisher(fisher: dict[str, Any], out_dir: str) -> list[str]:
    """fisher.png: time relative to the base row and extra peak memory, per workload."""
    plt = _plt()
    ws = fisher["workloads"]
    fig, axes = plt.subplots(2, len(ws), figsize=(6.5 * len(ws), 8), squeeze=False)
    for j, w in enumerate(ws):
        names = [k for k, r in w["results"].items() if "vs_base" in r]
        ratio = [w["results"][k]["vs_base"] for k in names]
        extra = [max(w["results"][k].get("extra_vs_base_bytes") or 0, 0) / MIB for k in names]
        colors = ["tab:green" if k.startswith(("estimate_fisher", "train_tracked")) else "tab:gray" for k in names]
        for ax, vals, label, log in ((axes[0][j], ratio, "time × base (log)", True),
                                     (axes[1][j], extra, "extra peak memory vs base, MiB", False)):
            ax.barh(range(len(names)), vals, color=colors)
            ax.set_yticks(range(len(names)))
            ax.set_yticklabels(names, fontsize=8)
            ax.invert_yaxis()
            if log:
                if vals and max(vals) / max(min(vals), 1e-9) > 4:  # a log axis only where it spans a range
                    from matplotlib.ticker import FuncFormatter, NullFormatter

                    ax.set_xscale("log")
                    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}×"))
                    ax.xaxis.set_minor_formatter(NullFormatter())
                else:
                    label = label.replace(" (log)", "")
                ax.axvline(1.0, color="k", linewidth=1)
            ax.set_xlabel(label, fontsize=8)
        axes[0][j].set_title(f"{w['name']} (T = {w['tokens']}), {w['params'] / 1e6:.2f}M parameters", fontsize=9)
    fig.suptitle(f"Per-sample Fisher: {fisher['env']['device']}", fontsize=10)
    fig.tight_layout()
    _save_png(fig, os.path.join(out_dir, "fisher.png"))
    plt.close(fig)
    return ["fisher.png"]


def merge(old: Optional[dict[str, Any]], new: dict[str, Any], key: str) -> dict[str, Any]:
    """``new`` with the entries of ``old[key]`` (configurations or workloads) that ``new`` did not
    measure kept in their place; every run's environment is listed under "runs"."""
    if old is None or old.get("env", {}).get("device") != new["env"]["device"]:
        return new
    fresh = {c["name"]: c for c in new[key]}
    out = [fresh.pop(c["name"], c) for c in old[key]] + list(fresh.values())
    runs = old.get("runs", [old["env"]]) + [new["env"]]
    variants = list(dict.fromkeys(old.get("variants", []) + new.get("variants", [])))
    return {**new, key: out, "runs": runs, **({"variants": variants} if "variants" in new else {})}


def write_all(out_dir: str, step: Optional[dict[str, Any]], fisher: Optional[dict[str, Any]],
              merge_old: bool = False) -> dict[str, str]:
    """Write the given results as JSON, then re-render results.md and the plots from every JSON in
    ``out_dir`` (so a step-only run keeps the Fisher tables of an earlier run, and vice versa).
    ``merge_old`` keeps the configurations/workloads of the earlier JSON that this run did not measure."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    for data, name, key in ((step, "step.json", "configs"), (fisher, "fisher.json", "workloads")):
        if data is not None:
            path = os.path.join(out_dir, name)
            write_json(merge(load_json(path), data, key) if merge_old else data, path)
    step = load_json(os.path.join(out_dir, "step.json"))
    fisher = load_json(os.path.join(out_dir, "fisher.json"))
    plots: list[str] = []
    try:
        if step:
            plots += plot_step(step, out_dir)
        if fisher:
            plots += plot_fisher(fisher, out_dir)
    except ImportError as e:  # matplotlib is an optional extra
        print(f"plots skipped: {e} (pip install ewc-fused[bench])")
    atomic_write_text(os.path.join(out_dir, "results.md"), markdown(step, fisher, plots) + "\n")
    for name in ("step.json", "fisher.json", "results.md", *plots):
        if os.path.exists(os.path.join(out_dir, name)):
            paths[name] = os.path.join(out_dir, name)
    return paths
