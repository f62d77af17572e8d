"""What limits the CPU step: the measurements behind the README's "What limits the CPU step".

``python -m ewc_fused.bench.probe [--params 25e6] [--repeats 25] [--out bench/results]``

On the GPT-like fp32 stack of ``--params`` parameters, in one set of interleaved rounds
(one call of each per round, so all see the same load), it times:

  adam_fused             torch.optim.Adam(fused=True): reads θ, g, m, v, writes θ, m, v (7 accesses)
  adam_fused_amsgrad     the same kernel with v̂max: 9 accesses, as many as a one-pass EWC-Adam
  sub_only               θ − c into a cache-sized scratch, chunk by chunk (2 streams from memory)
  penalty_only           g + λF(θ − c) as the torch backend forms it (θ − c, then addcmul), no Adam
  fused_ewc_torch        FusedEWCAdam(backend="torch"): penalty chunk by chunk, then torch's fused Adam
  inductor_ewc_per_tensor  a torch.compile'd one-pass EWC-Adam update, one call per tensor
  inductor_adam_flat, inductor_ewc_flat  the compiled one-pass Adam / EWC-Adam on one flat tensor of
                         the same size (no per-tensor calls)

and writes ``<out>/cpu/probe.json`` (every repeat) and prints a table: median, min, × fused Adam
and GB/s against each variant's byte floor. ``--no-compile`` skips the inductor rows (they need a
C++ compiler and compile for 10-60 s).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any, Callable

import torch

from .common import environment, time_round_robin
from ewc_fused._atomic import atomic_write_text
from .step import EMA, LAMBDA, LR, build, configs, make_variant

__all__ = ["run_probe", "main"]

ELEM = 4  # fp32 bytes


def _ewc_update(p, g, m, v, f, c, h):
    """One-pass EWC-Adam (no weight decay, no AMSGrad): h = [lr, β1, β2, eps, λ, 1 − β1ᵗ, √(1 − β2ᵗ)]."""
    lr, b1, b2, eps, lam, bc1, bc2s = h[0], h[1], h[2], h[3], h[4], h[5], h[6]
    gg = g + lam * f * (p - c)
    m2 = m + (1 - b1) * (gg - m)
    v2 = v * b2 + (1 - b2) * gg * gg
    p.copy_(p - (lr / bc1) * m2 / ((v2.sqrt() / bc2s) + eps))
    m.copy_(m2)
    v.copy_(v2)


def _adam_update(p, g, m, v, h):
    lr, b1, b2, eps, bc1, bc2s = h[0], h[1], h[2], h[3], h[5], h[6]
    m2 = m + (1 - b1) * (g - m)
    v2 = v * b2 + (1 - b2) * g * g
    p.copy_(p - (lr / bc1) * m2 / ((v2.sqrt() / bc2s) + eps))
    m.copy_(m2)
    v.copy_(v2)


def run_probe(params: float = 25e6, repeats: int = 25, compile_: bool = True, log=sys.stderr) -> dict[str, Any]:
    """Time the probe variants (module docstring) on CPU; returns the JSON-ready result."""
    from ewc_fused.functional import CHUNK_NUMEL

    device = torch.device("cpu")
    cfg = configs([params], ["fp32"], 0)[0]
    t = build(cfg, device)
    n = cfg.numel
    ps = [p.detach() for p in t.params]
    gs = [p.grad for p in t.params]
    fs, cs = t.fisher, t.anchors
    scratch = torch.empty(CHUNK_NUMEL)

    def chunks(rows):
        for row in rows:
            flat = [x.view(-1) for x in row]
            for s in range(0, flat[0].numel(), CHUNK_NUMEL):
                yield [x[s:s + CHUNK_NUMEL] for x in flat]

    def sub_only() -> None:
        for th, c in chunks(zip(ps, cs)):
            torch.sub(th, c, out=scratch[:th.numel()])

    def penalty_only() -> None:
        for th, g, f, c in chunks(zip(ps, gs, fs, cs)):
            b = scratch[:th.numel()]
            torch.sub(th, c, out=b)
            torch.addcmul(g, f, b, value=LAMBDA, out=b)

    fns: dict[str, Callable[[], Any]] = {
        "adam_fused": make_variant("adam_fused", t, device).step,
        "adam_fused_amsgrad": make_variant("adam_fused_amsgrad", t, device).step,
        "sub_only": sub_only,
        "penalty_only": penalty_only,
        "fused_ewc_torch": make_variant("fused_ewc[torch,fp32]", t, device).step,
    }
    accesses = {"adam_fused": 7, "adam_fused_amsgrad": 9, "sub_only": 2, "penalty_only": 4, "fused_ewc_torch": 9}
    compile_s: dict[str, float] = {}
    if compile_:
        h = torch.tensor([LR, 0.9, 0.999, 1e-8, LAMBDA, 0.1, 0.03])
        ms = [torch.zeros_like(p) for p in ps]
        vs = [torch.zeros_like(p) for p in ps]
        rows = [[x.view(-1) for x in r] for r in zip(ps, gs, ms, vs, fs, cs)]
        flat = [torch.randn(n) for _ in range(6)]
        flat[4].uniform_()
        ewc_c = torch.compile(_ewc_update, dynamic=True, fullgraph=True)
        adam_c = torch.compile(_adam_update, dynamic=True, fullgraph=True)
        fns["inductor_ewc_per_tensor"] = lambda: [ewc_c(*r, h) for r in rows]
        fns["inductor_adam_flat"] = lambda: adam_c(*flat[:4], h)
        fns["inductor_ewc_flat"] = lambda: ewc_c(*flat, h)
        accesses.update(inductor_ewc_per_tensor=9, inductor_adam_flat=7, inductor_ewc_flat=9)
        for name in ("inductor_ewc_per_tensor", "inductor_adam_flat"):
            t0 = time.perf_counter()
            fns[name]()
            compile_s[name] = time.perf_counter() - t0
            print(f"[probe] {name}: compile + first call {compile_s[name]:.1f} s", file=log, flush=True)
    print(f"[probe] {cfg.name}: {n / 1e6:.1f}M fp32 elements, {repeats} interleaved rounds", file=log, flush=True)
    timed = time_round_robin(fns, device, repeats, 3, 0.0)
    base = timed["adam_fused"]["median_ms"]
    results = {}
    for name, r in timed.items():
        results[name] = {**r, "accesses": accesses[name], "vs_adam_fused": r["median_ms"] / base,
                         "gb_per_s": accesses[name] * ELEM * n / (r["median_ms"] * 1e-3) / 1e9}
        if name in compile_s:
            results[name]["compile_s"] = compile_s[name]
    return {"benchmark": "probe", "env": environment(device), "config": cfg.name, "params": n,
            "chunk_numel": CHUNK_NUMEL, "lambda": LAMBDA, "fisher_ema": EMA, "results": results}


def markdown(probe: dict[str, Any]) -> str:
    lines = [f"## CPU probe: {probe['config']} ({probe['params'] / 1e6:.1f}M fp32), {probe['env']['device']}", "",
             "| variant | accesses/element | ms (median) | min | × fused Adam | GB/s (floor / time) |",
             "|---|---|---|---|---|---|"]
    for name, r in probe["results"].items():
        lines.append(f"| {name} | {r['accesses']} | {r['median_ms']:.1f} | {r['min_ms']:.1f} | "
                     f"{r['vs_adam_fused']:.2f}× | {r['gb_per_s']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ewc_fused.bench.probe", description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", type=float, default=25e6)
    ap.add_argument("--repeats", type=int, default=25)
    ap.add_argument("--compile", dest="compile_", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--out", default=os.path.join("bench", "results"))
    a = ap.parse_args(argv)
    probe = run_probe(a.params, a.repeats, a.compile_)
    out_dir = os.path.join(a.out, "cpu")
    os.makedirs(out_dir, exist_ok=True)
    atomic_write_text(os.path.join(out_dir, "probe.json"), json.dumps(probe, indent=1))
    text = markdown(probe)
    atomic_write_text(os.path.join(out_dir, "probe.md"), text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
