"""Optimizer-step benchmark: what one training step's optimizer work costs.

Every variant updates the same GPT-like stack of Linear weights (same process,
same tensors, gradients preset), after warm-up; the median, min and max of the
timed repeats are reported, with the device and versions.

Variants:
  adam_foreach / adam_fused     torch.optim.Adam: the floor
  ewc_autograd                  EWC as usually written: penalty built through autograd in a
                                Python loop over parameters, backward, Adam (foreach)
  ewc_foreach_fused             the best unfused variant: foreach penalty gradient added to
                                the grads, then torch's fused Adam
  fused_ewc[_ema] (backend)     FusedEWCAdam after consolidate (running Fisher on for _ema)

Usage: python bench/step.py [--params 25e6] [--device cpu|cuda] [--repeats 15] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch

from ewc_fused import FusedEWCAdam, __version__


def gpt_like_shapes(n_params: float, d_model: int = 512) -> list[tuple[int, ...]]:
    """Layers of (qkv, proj, fc1, fc2, two norms) until about n_params elements."""
    shapes, total = [], 0
    while total < n_params:
        layer = [(3 * d_model, d_model), (d_model, d_model), (4 * d_model, d_model), (d_model, 4 * d_model),
                 (d_model,), (d_model,)]
        shapes += layer
        total += sum(torch.Size(s).numel() for s in layer)
    return shapes


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_fn(fn, device, repeats: int, warmup: int = 3) -> dict:
    for _ in range(warmup):
        fn()
    _sync(device)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        ts.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(ts), "min_ms": min(ts), "max_ms": max(ts)}


def build(shapes, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=g).to(device, dtype)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(device, dtype)
    fisher = [torch.rand(s, generator=g).to(device) for s in shapes]
    return params, fisher


def run(n_params: float, device: str = "cpu", repeats: int = 15, lam: float = 10.0) -> dict:
    dev = torch.device(device)
    shapes = gpt_like_shapes(n_params)
    numel = sum(torch.Size(s).numel() for s in shapes)
    results = {}

    def bench(name, make_step):
        params, fisher = build(shapes, dev, torch.float32)
        step = make_step(params, fisher)
        results[name] = time_fn(step, dev, repeats)
        print(f"  {name:28s} {results[name]['median_ms']:9.2f} ms", file=sys.stderr)

    def adam(kind):
        def make(params, fisher):
            opt = torch.optim.Adam(params, lr=1e-4, **{kind: True})
            return opt.step
        return make

    def ewc_autograd(params, fisher):
        opt = torch.optim.Adam(params, lr=1e-4, foreach=True)
        anchors = [p.detach().clone() for p in params]

        def step():
            penalty = 0.0
            for p, f, a in zip(params, fisher, anchors):
                penalty = penalty + (lam / 2) * (f * (p - a) ** 2).sum()
            penalty.backward()
            opt.step()
        return step

    def ewc_foreach_fused(params, fisher):
        opt = torch.optim.Adam(params, lr=1e-4, fused=True)
        anchors = [p.detach().clone() for p in params]

        def step():
            with torch.no_grad():
                diff = torch._foreach_sub(params, anchors)
                torch._foreach_mul_(diff, fisher)
                torch._foreach_add_([p.grad for p in params], diff, alpha=lam)
                del diff
            opt.step()
        return step

    def fused(backend, ema):
        def make(params, fisher):
            opt = FusedEWCAdam(params, lr=1e-4, ewc_lambda=lam, fisher_ema=0.99 if ema else None, backend=backend)
            opt.consolidate(dict(zip(params, fisher)))
            return opt.step
        return make

    bench("adam_foreach", adam("foreach"))
    bench("adam_fused", adam("fused"))
    bench("ewc_autograd", ewc_autograd)
    bench("ewc_foreach_fused", ewc_foreach_fused)
    backends = ["torch"] + (["triton"] if dev.type == "cuda" else [])
    for b in backends:
        bench(f"fused_ewc ({b})", fused(b, False))
        bench(f"fused_ewc_ema ({b})", fused(b, True))
    floor = results["adam_fused"]["median_ms"]
    for name, r in results.items():
        r["vs_adam_fused"] = r["median_ms"] / floor
        r["vs_ewc_autograd"] = r["median_ms"] / results["ewc_autograd"]["median_ms"]
    return {
        "params": numel, "tensors": len(shapes), "device": device_name(dev),
        "torch": torch.__version__, "ewc_fused": __version__, "threads": torch.get_num_threads(),
        "python": platform.python_version(), "results": results,
    }


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def markdown(report: dict) -> str:
    lines = [f"{report['params'] / 1e6:.1f}M fp32 parameters in {report['tensors']} tensors on {report['device']} "
             f"(torch {report['torch']}):", "",
             "| variant | ms/step (median) | min | max | vs torch fused Adam | vs autograd EWC |",
             "|---|---|---|---|---|---|"]
    for name, r in report["results"].items():
        lines.append(f"| {name} | {r['median_ms']:.1f} | {r['min_ms']:.1f} | {r['max_ms']:.1f} | "
                     f"{r['vs_adam_fused']:.2f}× | {r['vs_ewc_autograd']:.2f}× |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=float, default=25e6)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--out", default=None, help="write the raw JSON report here")
    args = ap.parse_args(argv)
    report = run(args.params, args.device, args.repeats)
    print(markdown(report))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
