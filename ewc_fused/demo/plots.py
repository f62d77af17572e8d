"""The demo's figures (PNG). matplotlib is imported here only, when plots are written,
through its object-oriented API (no pyplot, no global backend change)."""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .report import SCENARIO_NAMES, atomic_write_bytes

__all__ = ["write_plots"]

_TITLES = {"permuted": "Permuted Digits", "split": "Split Digits"}


def _figure(w: float, h: float, layout: str | None = None):
    """A Figure without pyplot; grids use fixed margins (constrained layout costs seconds here)."""
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), dpi=100, layout=layout)


def _save(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())


def _grid(n: int, cols: int = 4) -> tuple[int, int]:
    cols = min(cols, n)
    return math.ceil(n / cols), cols


def _curves(b: dict[str, Any], bname: str, scenario: str, path: Path) -> None:
    methods = b["methods"]
    rows, cols = _grid(len(methods))
    fig = _figure(3.2 * cols, 2.7 * rows + 0.6)
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True, sharey=True)
    fig.subplots_adjust(left=0.06, right=0.99, bottom=0.8 / (2.7 * rows + 0.6), top=1 - 0.9 / (2.7 * rows + 0.6),
                        hspace=0.45, wspace=0.12)
    T = len(b["tasks"])
    x = list(range(1, T + 1))
    for ax, (key, m) in zip(axes.flat, methods.items()):
        s = m["summary"][scenario]
        R = s["R_mean"]
        for j in range(T):
            ax.plot(x[j:], [R[i][j] for i in range(j, T)], marker="o", ms=3, lw=1, label=f"task {j + 1}")
        mean, std = s["seen_avg_mean"], s["seen_avg_std"]
        ax.plot(x, mean, color="black", lw=2, label="avg seen")
        ax.fill_between(x, [a - d for a, d in zip(mean, std)], [a + d for a, d in zip(mean, std)],
                        color="black", alpha=0.15, lw=0)
        ax.set_title(f"{m['label']}\navg {100 * s['avg_acc']['mean']:.1f}%", fontsize=9)
        ax.set_ylim(0, 1.02)
        ax.set_xticks(x)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(methods):]:
        ax.set_axis_off()
    for ax in axes.flat[len(methods) - cols:len(methods)]:
        ax.xaxis.set_tick_params(labelbottom=True)
        ax.set_xlabel("tasks trained")
    for ax in axes[:, 0]:
        ax.set_ylabel("test accuracy")
    axes.flat[0].legend(fontsize=6, loc="lower left")
    fig.suptitle(f"{_TITLES.get(bname, bname)}, {SCENARIO_NAMES[scenario]}: accuracy on each task over training "
                 f"(mean over seeds; black: average over tasks seen, ± std)", fontsize=10)
    _save(fig, path)


def _matrices(b: dict[str, Any], bname: str, scenario: str, path: Path) -> None:
    methods = b["methods"]
    rows, cols = _grid(len(methods))
    fig = _figure(2.9 * cols + 0.8, 2.7 * rows + 0.5)
    axes = fig.subplots(rows, cols, squeeze=False)
    fig.subplots_adjust(left=0.05, right=0.9, bottom=0.6 / (2.7 * rows + 0.5), top=1 - 0.8 / (2.7 * rows + 0.5),
                        hspace=0.55, wspace=0.35)
    T = len(b["tasks"])
    im = None
    for ax, (key, m) in zip(axes.flat, methods.items()):
        R = m["summary"][scenario]["R_mean"]
        im = ax.imshow(R, vmin=0, vmax=1, cmap="viridis")
        if T <= 8:
            for i in range(T):
                for j in range(T):
                    ax.text(j, i, f"{100 * R[i][j]:.0f}", ha="center", va="center", fontsize=7,
                            color="white" if R[i][j] < 0.6 else "black")
        ax.set_title(m["label"], fontsize=9)
        ax.set_xticks(range(T), [str(j + 1) for j in range(T)])
        ax.set_yticks(range(T), [str(i + 1) for i in range(T)])
        ax.set_xlabel("evaluated on task", fontsize=8)
        ax.set_ylabel("after training task", fontsize=8)
    for ax in axes.flat[len(methods):]:
        ax.set_axis_off()
    if im is not None:
        fig.colorbar(im, cax=fig.add_axes((0.92, 0.25, 0.015, 0.5)), label="accuracy")
    fig.suptitle(f"{_TITLES.get(bname, bname)}, {SCENARIO_NAMES[scenario]}: accuracy matrix R[i][j] (mean over seeds)",
                 fontsize=10)
    _save(fig, path)


def _fisher(b: dict[str, Any], bname: str, fishers: dict[str, dict[str, Tensor]], main: str, path: Path) -> None:
    """Row 1: log10 Fisher of each Linear weight (main Fisher); row 2: per-pixel importance
    (first-layer Fisher summed over hidden units, 8×8) for every Fisher type."""
    F = fishers[main]
    weights = [k for k in F if k.endswith("weight")]
    types = list(fishers)
    cols = max(len(weights), len(types))
    fig = _figure(3.0 * cols, 6.0, layout="constrained")
    axes = fig.subplots(2, cols, squeeze=False)
    for ax, name in zip(axes[0], weights):
        w = F[name].float().clamp_min(1e-12).log10()
        im = ax.imshow(w.numpy(), aspect="auto", cmap="magma", interpolation="nearest")
        ax.set_title(f"{name} {tuple(F[name].shape)}\nlog10 F ({main})", fontsize=8)
        ax.set_xlabel("input unit", fontsize=7)
        ax.set_ylabel("output unit", fontsize=7)
        fig.colorbar(im, ax=ax, shrink=0.8)
    for ax in axes[0][len(weights):]:
        ax.set_axis_off()
    for ax, f in zip(axes[1], types):
        pix = torch.tensor(b["fisher_task0"][f]["pixel_importance"]).reshape(8, 8)
        ax.imshow((pix / pix.max().clamp_min(1e-30)).numpy(), cmap="inferno", vmin=0, vmax=1)
        ax.set_title(f"{f} Fisher\n(trace {b['fisher_task0'][f]['trace']:.3g})", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[1][0].set_ylabel("pixel importance: Σ over hidden\nunits of F(W1), scaled to max", fontsize=8)
    for ax in axes[1][len(types):]:
        ax.set_axis_off()
    task0 = b["tasks"][0]["name"]
    fig.suptitle(f"{_TITLES.get(bname, bname)}: diagonal Fisher after task 1 ({task0}), first seed — "
                 "which weights and pixels EWC protects", fontsize=10)
    _save(fig, path)


def _sweep(b: dict[str, Any], bname: str, path: Path) -> None:
    fig = _figure(6.0, 3.8, layout="constrained")
    ax = fig.subplots()
    for f, info in b["lambda"].items():
        if not info["points"]:
            continue
        pts = sorted(info["points"], key=lambda p: p["lambda"])
        line, = ax.plot([p["lambda"] for p in pts], [100 * p["val_score"] for p in pts], marker="o", ms=4, label=f)
        best = next(p for p in info["points"] if p["lambda"] == info["chosen"])
        ax.plot([best["lambda"]], [100 * best["val_score"]], marker="*", ms=14, color=line.get_color(),
                markeredgecolor="black")
    if "finetune" in b["methods"]:
        s = b["methods"]["finetune"]["summary"][b["primary_scenario"]]["avg_acc"]
        ax.axhline(100 * s["mean"], color="gray", ls="--", lw=1, label="fine-tune (test)")
    ax.set_xscale("log")
    ax.set_xlabel("λ (penalty (λ/2) Σ F (θ − θ*)²)")
    ax.set_ylabel(f"val avg accuracy, {SCENARIO_NAMES[b['primary_scenario']]} (%)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, title="Fisher", title_fontsize=8)
    ax.set_title(f"{_TITLES.get(bname, bname)}: λ sweep per Fisher type (★ chosen)", fontsize=10)
    _save(fig, path)


def write_plots(results: dict[str, Any], fishers: dict[str, dict[str, dict[str, Tensor]]], out: Path,
                main_fisher: str) -> dict[str, list[str]]:
    """Write every figure under ``out``; return {benchmark: [file names]}."""
    written: dict[str, list[str]] = {}
    for bname, b in results["benchmarks"].items():
        files: list[str] = []
        for s in b["scenarios"]:
            for kind, fn in (("curves", _curves), ("matrices", _matrices)):
                name = f"{bname}_{s}_{kind}.png"
                fn(b, bname, s, out / name)
                files.append(name)
        if fishers.get(bname) and main_fisher in fishers[bname]:
            name = f"{bname}_fisher.png"
            _fisher(b, bname, fishers[bname], main_fisher, out / name)
            files.append(name)
        if any(info["points"] for info in b["lambda"].values()):
            name = f"{bname}_lambda_sweep.png"
            _sweep(b, bname, out / name)
            files.append(name)
        written[bname] = files
    return written
