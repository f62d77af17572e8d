"""Per-sample Fisher benchmark: cost of a diagonal empirical Fisher pass, and of a training
step that tracks it, relative to a plain forward+backward (+ step).

Workloads (``bench.models``): an MLP (T = 1) and a small transformer-like sequence model
(T = 256). Each method processes the same list of batches, in one process, after warm-up;
median of repeats. Methods (keys in the JSON):

  plain                   forward + backward of the batch-mean loss (weight gradients): the base
  estimate_fisher[B]      ``ewc_fused.estimate_fisher`` with Linear backend B (no weight gradients)
  per_sample_loop         ``ewc_fused.reference.per_sample_fisher``: one backward per sample
  vmap                    ``torch.func``: vmap(grad(functional_call)) over each whole batch
  opacus                  Opacus ``GradSampleModule`` (per-sample gradients materialised), squared
  backpack_batchgrad      BackPACK ``BatchGrad`` (per-sample gradients), squared
  backpack_sumgradsq      BackPACK ``SumGradSquared`` (Σ_n g_n² directly)
  train_plain             training step: forward, backward, torch.optim.Adam(fused=True) step: the base
  train_ema               FusedEWCAdam(fisher_ema=0.99): running Fisher from the batch gradient g²
  train_tracked           FusedEWCAdam(fisher_ema=0.99) with ``opt.track_fisher(model,
                          per_sample=True, loss_reduction="mean")``: per-sample running Fisher

Every Fisher method's result is compared with the per-sample loop's (max relative error);
a tracked step's running Fisher with the loop's Fisher of its batch.
"""
from __future__ import annotations

import copy
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any, Optional

import torch
from torch import Tensor

from .common import environment, free, load_stamp, peak_extra_bytes, time_fn, time_round_robin
from .models import Workload, make_workload

__all__ = ["FISHER_METHODS", "TRAIN_METHODS", "run_fisher", "run_workload", "workload_sizes", "skip_reason",
           "max_rel_err"]

FisherFn = Callable[[], Optional[dict[str, Tensor]]]


# --------------------------------------------------------------------------- methods
def _plain(w: Workload, device: torch.device) -> FisherFn:
    model, params = w.model, [p for p in w.model.parameters() if p.requires_grad]

    def run() -> None:
        for x, y in w.batches:
            for p in params:
                p.grad = None
            w.loss_fn(model(x), y).mean().backward()
        for p in params:
            p.grad = None
    return run


def _ours(backend: str) -> Callable[[Workload, torch.device], FisherFn]:
    def make(w: Workload, device: torch.device) -> FisherFn:
        from ewc_fused import estimate_fisher

        return lambda: estimate_fisher(w.model, w.batches, w.loss_fn, backend=backend, progress=False)
    return make


def _loop(w: Workload, device: torch.device) -> FisherFn:
    from ewc_fused.reference import per_sample_fisher

    return lambda: per_sample_fisher(w.model, w.batches, w.loss_fn)


def _vmap(w: Workload, device: torch.device) -> FisherFn:
    from torch.func import functional_call, grad, vmap

    model = w.model

    def run() -> dict[str, Tensor]:
        params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}

        def loss_one(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
            return w.loss_fn(functional_call(model, p, (x.unsqueeze(0),)), y.unsqueeze(0)).sum()

        acc = {k: torch.zeros_like(v) for k, v in params.items()}
        for x, y in w.batches:
            per = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
            for k in acc:
                acc[k] += per[k].square().sum(0)
            del per
        return {k: a / w.samples for k, a in acc.items()}
    return run


def _opacus(w: Workload, device: torch.device) -> FisherFn:
    from opacus import GradSampleModule

    gsm = GradSampleModule(copy.deepcopy(w.model), batch_first=True, loss_reduction="sum")
    named = [(k, p) for k, p in gsm._module.named_parameters() if p.requires_grad]

    def run() -> dict[str, Tensor]:
        acc = {k: torch.zeros_like(p) for k, p in named}
        for x, y in w.batches:
            for _, p in named:
                p.grad = None
            w.loss_fn(gsm(x), y).sum().backward()
            for k, p in named:
                acc[k] += p.grad_sample.square().sum(0)
                p.grad_sample = None
        for _, p in named:
            p.grad = None
        return {k: a / w.samples for k, a in acc.items()}
    return run


def _backpack(kind: str) -> Callable[[Workload, torch.device], FisherFn]:
    def make(w: Workload, device: torch.device) -> FisherFn:
        from backpack import backpack, extend
        from backpack.extensions import BatchGrad, SumGradSquared

        model = extend(copy.deepcopy(w.model))
        named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
        ext, attr = (BatchGrad, "grad_batch") if kind == "batchgrad" else (SumGradSquared, "sum_grad_squared")

        def run() -> dict[str, Tensor]:
            acc: dict[str, Tensor] = {}
            for x, y in w.batches:
                for _, p in named:
                    p.grad = None
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # "no extension for LayerNorm": reported as coverage
                    with backpack(ext()):
                        w.loss_fn(model(x), y).sum().backward()
                for k, p in named:
                    v = getattr(p, attr, None)
                    if v is None:
                        continue
                    v = v.square().sum(0) if kind == "batchgrad" else v
                    acc[k] = acc[k] + v if k in acc else v.clone()
                    delattr(p, attr)
            for _, p in named:
                p.grad = None
            return {k: a / w.samples for k, a in acc.items()}
        return run
    return make


def _train(kind: str) -> Callable[[Workload, torch.device], FisherFn]:
    """A training step over every batch; ``kind`` "plain", "ema" or "tracked"."""
    def make(w: Workload, device: torch.device) -> FisherFn:
        from ewc_fused import FusedEWCAdam

        model = copy.deepcopy(w.model)  # training changes the weights; keep the workload's intact
        params = [p for p in model.parameters() if p.requires_grad]
        if kind == "plain":
            opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=1e-4, fused=True)
        else:
            opt = FusedEWCAdam(model.named_parameters(), lr=1e-4, fisher_ema=0.99)
        if kind == "tracked":
            opt.track_fisher(model, per_sample=True, loss_reduction="mean")  # type: ignore[attr-defined]

        def run() -> None:
            for x, y in w.batches:
                opt.zero_grad(set_to_none=True)
                w.loss_fn(model(x), y).mean().backward()
                opt.step()
            opt.zero_grad(set_to_none=True)
        return run
    return make


FISHER_METHODS: dict[str, Callable[[Workload, torch.device], FisherFn]] = {
    "plain": _plain,
    "estimate_fisher[torch]": _ours("torch"),
    "estimate_fisher[triton]": _ours("triton"),
    "per_sample_loop": _loop,
    "vmap": _vmap,
    "opacus": _opacus,
    "backpack_batchgrad": _backpack("batchgrad"),
    "backpack_sumgradsq": _backpack("sumgradsq"),
}
TRAIN_METHODS: dict[str, Callable[[Workload, torch.device], FisherFn]] = {
    "train_plain": _train("plain"), "train_ema": _train("ema"), "train_tracked": _train("tracked"),
}


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def skip_reason(method: str, device: torch.device) -> Optional[str]:
    """Why ``method`` cannot run here (None if it can)."""
    if method == "estimate_fisher[triton]":
        from ewc_fused.functional import triton_available

        if device.type != "cuda":
            return "the triton backend needs CUDA tensors (the CPU interpreter is not a timing target)"
        if not triton_available():
            return "triton is not installed"
    if method == "opacus" and not _has_module("opacus"):
        return "opacus is not installed (pip install ewc-fused[bench])"
    if method.startswith("backpack") and not _has_module("backpack"):
        return ("backpack-for-pytorch is not installed (pip install --no-deps backpack-for-pytorch einops "
                "unfoldNd; see the README)")
    if method == "train_tracked":
        from ewc_fused import FusedEWCAdam

        if not hasattr(FusedEWCAdam, "track_fisher"):
            return "FusedEWCAdam.track_fisher is not available in this version of ewc_fused"
    return None


# --------------------------------------------------------------------------- checks
def max_rel_err(got: dict[str, Tensor], ref: dict[str, Tensor]) -> tuple[float, int, int]:
    """max over tensors of max|got − ref| / max|ref|; and how many of ref's tensors ``got`` covers."""
    err, covered = 0.0, 0
    for k, r in ref.items():
        if k not in got:
            continue
        covered += 1
        scale = float(r.abs().max()) or 1.0
        err = max(err, float((got[k].float() - r.float()).abs().max()) / scale)
    return err, covered, len(ref)


def tracked_check(w: Workload, device: torch.device) -> Optional[float]:
    """One tracked step from a fresh copy: relative error of the running Fisher against the
    per-sample loop's Fisher of that batch (at the pre-step weights)."""
    from ewc_fused import FusedEWCAdam
    from ewc_fused.reference import per_sample_fisher

    model = copy.deepcopy(w.model)
    ref = per_sample_fisher(model, w.batches[:1], w.loss_fn)
    opt = FusedEWCAdam(model.named_parameters(), lr=1e-4, fisher_ema=0.5)
    handle = opt.track_fisher(model, per_sample=True, loss_reduction="mean")
    x, y = w.batches[0]
    w.loss_fn(model(x), y).mean().backward()
    opt.step()
    handle.remove()
    return max_rel_err(opt.running_fisher(), ref)[0]


# --------------------------------------------------------------------------- run
def workload_sizes(device: torch.device, mode: str) -> dict[str, dict[str, Any]]:
    """Batches per workload: ``mode`` "full", "quick" or "tiny"."""
    if mode == "tiny":
        return {"mlp": dict(batches=2, batch_size=4, scale="tiny"), "seq": dict(batches=2, batch_size=2, scale="tiny")}
    if device.type == "cuda":
        return {"mlp": dict(batches=4, batch_size=1024), "seq": dict(batches=4, batch_size=32)}
    if mode == "quick":
        return {"mlp": dict(batches=2, batch_size=128), "seq": dict(batches=1, batch_size=8)}
    return {"mlp": dict(batches=4, batch_size=128), "seq": dict(batches=2, batch_size=8)}


SLOW = ("per_sample_loop", "opacus", "vmap", "backpack_batchgrad")


def run_workload(w: Workload, device: torch.device, repeats: int, memory: bool = True,
                 log=sys.stderr) -> dict[str, Any]:
    """Time every method on one workload; skipped and failing methods are recorded with the reason.

    Every method is set up first; its two peak-memory calls (untimed: the second, steady one is
    measured) double as warm-up.
    Then all are timed in rounds (each round calls every method once), so all see the same load;
    the slow ones (per-sample loop, vmap, Opacus, BackPACK BatchGrad) sit out after half the rounds.
    """
    print(f"[fisher] {w.name}: {w.desc}; {w.params / 1e6:.2f}M parameters", file=log, flush=True)
    results: dict[str, Any] = {}
    start = load_stamp()
    big = w.params >= 100_000  # full garbage collections only where leftovers would matter
    fns: dict[str, FisherFn] = {}
    outs: dict[str, Any] = {}
    mems: dict[str, Optional[int]] = {}
    for name, make in {**FISHER_METHODS, **TRAIN_METHODS}.items():
        reason = skip_reason(name, device)
        if reason is not None:
            results[name] = {"skipped": reason}
            print(f"  {name:26s} skipped: {reason}", file=log, flush=True)
            continue
        try:
            fn = make(w, device)
            mems[name] = peak_extra_bytes(fn, device, big) if memory else None
            fns[name] = (lambda fn=fn, name=name: outs.__setitem__(name, fn()))
        except Exception as e:  # noqa: BLE001 - recorded in the report, the run goes on
            results[name] = {"error": f"{type(e).__name__}: {e}"[:500]}
            print(f"  {name:26s} ERROR {results[name]['error']}", file=log, flush=True)
    reps = {k: max(2, repeats // 2) if k in SLOW else repeats for k in fns}
    warm = {k: (0 if k in SLOW else 1) if memory else (1 if k in SLOW else 2) for k in fns}
    try:
        timed = time_round_robin(fns, device, reps, warm)
    except Exception as e:  # noqa: BLE001 - one failing method: time the others one at a time
        print(f"  (round-robin timing failed: {type(e).__name__}: {e}; timing one at a time)", file=log)
        timed = {}
        for k, fn in fns.items():
            try:
                timed[k] = time_fn(fn, device, reps[k], warm[k])
            except Exception as e2:  # noqa: BLE001
                results[k] = {"error": f"{type(e2).__name__}: {e2}"[:500]}
    ref = outs.get("per_sample_loop")
    for name in fns:
        if name not in timed:
            continue
        r = timed[name]
        r["peak_extra_bytes"] = mems[name]
        f = outs.get(name)
        if isinstance(f, dict) and isinstance(ref, dict):
            r["max_rel_err"], r["covered"], r["tensors"] = max_rel_err(f, ref)
        if name == "train_tracked":
            r["max_rel_err"] = tracked_check(w, device)
        results[name] = r
        mem = f"  peak +{r['peak_extra_bytes'] / 2**20:8.1f} MiB" if r["peak_extra_bytes"] is not None else ""
        print(f"  {name:26s} {r['median_ms']:10.2f} ms{mem}", file=log, flush=True)
    order = list({**FISHER_METHODS, **TRAIN_METHODS})
    results = {k: results[k] for k in order if k in results}
    del fns, outs
    plain, train = results.get("plain", {}), results.get("train_plain", {})
    for name, r in results.items():
        base = train if name.startswith("train_") else plain
        if "median_ms" in r and "median_ms" in base:
            r["vs_base"] = r["median_ms"] / base["median_ms"]
            if r.get("peak_extra_bytes") is not None and base.get("peak_extra_bytes") is not None:
                r["extra_vs_base_bytes"] = r["peak_extra_bytes"] - base["peak_extra_bytes"]
    free(device, big)
    return {"name": w.name, "desc": w.desc, "tokens": w.tokens, "samples": w.samples, "params": w.params,
            **load_stamp(start), "results": results}


def run_fisher(device: torch.device, mode: str, repeats: int, memory: bool = True, log=sys.stderr) -> dict[str, Any]:
    """The whole Fisher benchmark on both workloads."""
    env = environment(device)
    print(f"[fisher] {env['device']}", file=log, flush=True)
    out: dict[str, Any] = {"benchmark": "fisher", "env": env, "mode": "empirical", "workloads": []}
    for kind, kw in workload_sizes(device, mode).items():
        w = make_workload(kind, device, **kw)
        out["workloads"].append(run_workload(w, device, repeats, memory=memory, log=log))
        del w
    if hasattr(os, "getloadavg"):
        out["env"]["loadavg_end"] = list(os.getloadavg())
    return out

