"""Optimizer-step benchmark: what one training step's optimizer work costs.

Per configuration (a parameter set and dtype), every variant updates fresh copies of
the same tensors (same seed; gradients preset, so only the optimizer work is timed), in
one process, after warm-up; the median, min and max of the timed repeats are reported.

Variants (keys in the JSON):
  adam_foreach, adam_fused        torch.optim.Adam(foreach=True) / (fused=True): the floor
  adam_fused_amsgrad              Adam(fused=True, amsgrad=True): torch's own one-pass kernel moving
                                  as many bytes as fused EWC-Adam (reads θ, g, m, v, v̂max and writes
                                  θ, m, v, v̂max: 9 accesses), the control for "how fast can 9 be"
  ewc_autograd                    EWC as usually written (``ewc_fused.reference.ReferenceEWCAdam``):
                                  penalty through autograd in a Python loop over parameters,
                                  its gradient added to the grads, then Adam (foreach)
  ewc_foreach_fused               the best unfused variant: foreach penalty gradient added to
                                  the grads, then torch's fused Adam
  ewc_compiled_fused              that same step under torch.compile (the penalty becomes one
                                  generated kernel; the fused Adam kernel is called as is)
  ewc_compiled_foreach            penalty + Adam(foreach=True) under torch.compile (inductor
                                  generates the whole update, as torch's compiled-optimizer recipe)
  fused_ewc[B,D] / [B,D,ema]      FusedEWCAdam with backend B and EWC state (F, c, F_run) in
                                  dtype D, without / with the running Fisher (fisher_ema=0.99)

Byte floor per element: Adam reads θ, g, m, v and writes θ, m, v (7 accesses); EWC-Adam
also reads F and c (9); the running Fisher reads and writes F_run (11). Achieved
bandwidth = floor bytes / time.
"""
from __future__ import annotations

import math
import os
import sys
import time
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor

from .common import (copy_bandwidth, environment, free, load_stamp, memory_budget, peak_extra_bytes, sync,
                     time_round_robin, time_stats)

__all__ = ["Config", "configs", "VARIANTS", "build", "make_variant", "variant_names", "run_step"]

LAMBDA = 10.0
COMPILE_MAX_NUMEL = 200_000_000  # larger configurations (1B on CUDA) skip the torch.compile variants
LR = 1e-3
EMA = 0.99
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_COMPILED = 0  # compiled variants so far (each gets its own code object)


@dataclass
class Config:
    """A parameter set: its shapes and parameter dtype."""

    name: str
    shapes: list[tuple[int, ...]]
    dtype: str  # "fp32" | "bf16"
    kind: str  # "gpt" | "small"

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for s in self.shapes)


def gpt_like_shapes(n_params: float) -> list[tuple[int, ...]]:
    """A GPT-like stack of Linear weights: per layer qkv, proj, fc1, fc2 and two norms, until
    about ``n_params`` elements; d_model grows with size (64 below 1M, then 512, 768, 1024, 2048)."""
    d = 64 if n_params < 1e6 else 512 if n_params <= 50e6 else 768 if n_params <= 200e6 else 1024 if n_params <= 500e6 else 2048
    shapes: list[tuple[int, ...]] = []
    total = 0
    while total < n_params * 0.97:
        layer = [(3 * d, d), (d, d), (4 * d, d), (d, 4 * d), (d,), (d,)]
        shapes += layer
        total += sum(math.prod(s) for s in layer)
    return shapes


def small_tensor_shapes(count: int, seed: int = 0) -> list[tuple[int, ...]]:
    """``count`` tensors of shape (k, 64), k log-uniform in [4, 1024]: 256 to 65,536 elements."""
    g = torch.Generator().manual_seed(seed)
    ks = torch.exp(torch.rand(count, generator=g) * math.log(1024 / 4)) * 4
    return [(int(k), 64) for k in ks]


def size_label(n: float) -> str:
    return f"{n / 1e9:g}B" if n >= 1e9 else f"{n / 1e6:g}M" if n >= 1e6 else f"{n / 1e3:g}K"


def configs(sizes: list[float], dtypes: list[str], small_count: int) -> list[Config]:
    """GPT-like stacks of the given sizes and, if ``small_count``, a many-small-tensors set; per dtype."""
    out = []
    for dt in dtypes:
        for n in (n for n in sizes if n > 0):
            out.append(Config(f"gpt-{size_label(n)} {dt}", gpt_like_shapes(n), dt, "gpt"))
        if small_count:
            out.append(Config(f"small-{small_count} {dt}", small_tensor_shapes(small_count), dt, "small"))
    return out


# --------------------------------------------------------------------------- tensors
@dataclass
class Tensors:
    """Fresh tensors of one configuration: θ (with .grad), F and the anchor θ*."""

    params: list[torch.nn.Parameter]
    fisher: list[Tensor]
    anchors: list[Tensor]


def build(cfg: Config, device: torch.device, seed: int = 0) -> Tensors:
    """θ*, θ = θ* + noise, g and F ~ U(0, 1), the same for every variant of a configuration
    (drawn on ``device`` by a generator seeded with ``seed``)."""
    dtype = DTYPES[cfg.dtype]
    g = torch.Generator(device=device).manual_seed(seed)
    params, fisher, anchors = [], [], []
    for s in cfg.shapes:
        a = torch.randn(s, generator=g, device=device)
        p = torch.nn.Parameter((a + 0.1 * torch.randn(s, generator=g, device=device)).to(dtype))
        p.grad = torch.randn(s, generator=g, device=device).to(dtype)
        params.append(p)
        anchors.append(a.to(dtype))
        fisher.append(torch.rand(s, generator=g, device=device))
    return Tensors(params, fisher, anchors)


# --------------------------------------------------------------------------- variants
@dataclass
class Variant:
    """A step function and the tensors its optimizer keeps (for the state-memory column)."""

    step: Callable[[], Any]
    state: Callable[[], list[Tensor]]
    ewc_dtype: Optional[str] = None  # storage dtype of F and the anchor, None without EWC
    ema: bool = False
    extra_accesses: int = 0  # accesses per element beyond Adam's 7 that are not EWC state (AMSGrad's v̂max)
    compile_s: Optional[float] = None
    info: dict[str, Any] = field(default_factory=dict)


def _opt_state(opt: torch.optim.Optimizer) -> list[Tensor]:
    return [t for s in opt.state.values() for t in s.values() if isinstance(t, Tensor)]


def _dtype_name(dt: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dt, str(dt))


def _adam(kind: str, amsgrad: bool = False):
    def make(t: Tensors, device: torch.device) -> Variant:
        opt = torch.optim.Adam(t.params, lr=LR, amsgrad=amsgrad, **{kind: True})
        return Variant(opt.step, lambda: _opt_state(opt), extra_accesses=2 if amsgrad else 0)
    return make


def _ewc_autograd(t: Tensors, device: torch.device) -> Variant:
    from ewc_fused.reference import ReferenceEWCAdam

    opt = ReferenceEWCAdam(t.params, ewc_lambda=LAMBDA, lr=LR, foreach=True)
    with torch.no_grad():
        theta = [p.detach().clone() for p in t.params]
        for p, a in zip(t.params, t.anchors):
            p.copy_(a)
        opt.consolidate(dict(zip(t.params, t.fisher)))  # F in θ's dtype, θ* = anchors
        for p, th in zip(t.params, theta):
            p.copy_(th)
    del theta
    state = lambda: _opt_state(opt.opt) + [x for terms in opt.ewc.terms for pair in terms for x in pair]
    return Variant(opt.step, state, ewc_dtype=_dtype_name(t.params[0].dtype))


def _penalty_into_grads(params: list[Tensor], grads: list[Tensor], fisher: list[Tensor], anchors: list[Tensor]) -> None:
    """g += λ·F·(θ − θ*) with foreach ops (F and θ* in θ's dtype)."""
    diff = torch._foreach_sub(params, anchors)
    torch._foreach_mul_(diff, fisher)
    torch._foreach_add_(grads, diff, alpha=LAMBDA)


def _ewc_foreach(t: Tensors, device: torch.device, *, compiled: Optional[str] = None) -> Variant:
    dtype = t.params[0].dtype
    fisher = [f.to(dtype) for f in t.fisher]
    anchors = t.anchors
    params = [p.detach() for p in t.params]
    grads = [p.grad for p in t.params]
    opt = torch.optim.Adam(t.params, lr=LR, **({"foreach": True} if compiled == "foreach" else {"fused": True}))

    def step() -> None:
        with torch.no_grad():
            _penalty_into_grads(params, grads, fisher, anchors)
        opt.step()

    fn: Callable[[], Any] = step
    compile_s = None
    if compiled is not None:
        import torch._inductor.config as inductor_config

        # Dynamo is reset once per configuration (run_config), not here: a reset would drop the
        # other compiled variant's code.
        inductor_config.force_disable_caches = True  # honest compile time: no cached kernels
        saved = [p.clone() for p in params], [g.clone() for g in grads]
        # its own code object, so that Dynamo keeps one cache (and recompile count) per compiled variant
        global _COMPILED
        _COMPILED += 1
        code = step.__code__.replace(co_name=f"ewc_step_{compiled}_{_COMPILED}")
        unique = types.FunctionType(code, step.__globals__, code.co_name, step.__defaults__, step.__closure__)
        try:
            fn = torch.compile(unique)
            t0 = time.perf_counter()
            fn()  # compiles; also one step, undone below
            sync(device)
            compile_s = time.perf_counter() - t0
        finally:
            inductor_config.force_disable_caches = False
        with torch.no_grad():  # back to the state every other variant starts from (Adam's state is zeros)
            torch._foreach_copy_(params, saved[0])
            torch._foreach_copy_(grads, saved[1])
            for st in opt.state.values():
                for x in st.values():
                    if isinstance(x, Tensor):
                        x.zero_()
        del saved
    return Variant(fn, lambda: _opt_state(opt) + fisher + anchors, ewc_dtype=_dtype_name(dtype), compile_s=compile_s)


def _fused(backend: str, ewc_dtype: str, ema: bool):
    def make(t: Tensors, device: torch.device) -> Variant:
        from ewc_fused import FusedEWCAdam

        opt = FusedEWCAdam(t.params, lr=LR, ewc_lambda=LAMBDA, fisher_ema=EMA if ema else None,
                           ewc_dtype=DTYPES[ewc_dtype], backend=backend)
        with torch.no_grad():
            theta = [p.detach().clone() for p in t.params]
            for p, a in zip(t.params, t.anchors):
                p.copy_(a)
            opt.consolidate(dict(zip(t.params, t.fisher)))
            for p, th in zip(t.params, theta):
                p.copy_(th)
        del theta
        return Variant(opt.step, lambda: _opt_state(opt), ewc_dtype=ewc_dtype, ema=ema)
    return make


VARIANTS: dict[str, Callable[[Tensors, torch.device], Variant]] = {
    "adam_foreach": _adam("foreach"),
    "adam_fused": _adam("fused"),
    "adam_fused_amsgrad": _adam("fused", amsgrad=True),
    "ewc_autograd": _ewc_autograd,
    "ewc_foreach_fused": _ewc_foreach,
    "ewc_compiled_fused": lambda t, d: _ewc_foreach(t, d, compiled="fused"),
    "ewc_compiled_foreach": lambda t, d: _ewc_foreach(t, d, compiled="foreach"),
}


def backends_for(device: torch.device) -> list[str]:
    """FusedEWCAdam backends that run natively on ``device``."""
    from ewc_fused.functional import triton_available

    return ["torch"] + (["triton"] if device.type == "cuda" and triton_available() else [])


def variant_names(device: torch.device, compile_: bool) -> list[str]:
    names = ["adam_foreach", "adam_fused", "adam_fused_amsgrad", "ewc_autograd", "ewc_foreach_fused"]
    if compile_:
        # this order: in torch 2.13, compiling foreach Adam after a compiled fused-Adam step in the same
        # Dynamo session fails ("Expected scalars to be on CPU, got meta"); the other order works
        names += ["ewc_compiled_foreach", "ewc_compiled_fused"]
    for b in backends_for(device):
        for dt in ("fp32", "bf16"):
            for ema in (False, True):
                names.append(f"fused_ewc[{b},{dt}{',ema' if ema else ''}]")
    return names


def make_variant(name: str, t: Tensors, device: torch.device) -> Variant:
    """Build variant ``name`` (a key of :data:`VARIANTS` or ``fused_ewc[backend,dtype(,ema)]``) on ``t``."""
    if name.startswith("fused_ewc["):
        parts = name[len("fused_ewc["):-1].split(",")
        return _fused(parts[0], parts[1], len(parts) > 2 and parts[2] == "ema")(t, device)
    return VARIANTS[name](t, device)


# --------------------------------------------------------------------------- bytes
def floor_bytes(cfg: Config, v: Variant) -> int:
    """Minimum bytes one step must move: 7 accesses per element for Adam, 9 with EWC, 11 with F_run."""
    s = torch.finfo(DTYPES[cfg.dtype]).bits // 8  # θ, g, m, v share θ's dtype
    per = 2 * s + s + 2 * s + 2 * s + v.extra_accesses * s
    if v.ewc_dtype is not None:
        e = torch.finfo(DTYPES[v.ewc_dtype]).bits // 8
        per += 2 * e + (2 * e if v.ema else 0)
    return cfg.numel * per


def _storage_bytes(ts: list[Tensor]) -> int:
    seen, total = set(), 0
    for t in ts:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


# --------------------------------------------------------------------------- run
def _variant_bytes(cfg: Config, name: str) -> int:
    """Rough bytes a variant keeps besides the shared θ, g, F and θ*: Adam's m and v, EWC state."""
    s = torch.finfo(DTYPES[cfg.dtype]).bits // 8
    extra = (3 if name == "adam_fused_amsgrad" else 2) * s
    if name.startswith(("ewc_", "fused_ewc")):
        extra += 4 * 3  # F, c (and F_run / a copy of F in θ's dtype), at most fp32
    return cfg.numel * extra


def _measure(name: str, v: Variant, cfg: Config, r: dict[str, Any], mem: Optional[int]) -> dict[str, Any]:
    r["floor_bytes"] = floor_bytes(cfg, v)
    r["gb_per_s"] = r["floor_bytes"] / (r["median_ms"] * 1e-3) / 1e9
    r["state_bytes"] = _storage_bytes(v.state())
    r["peak_extra_bytes"] = mem
    r["ewc_dtype"] = v.ewc_dtype
    r["ema"] = v.ema
    if v.compile_s is not None:
        r["compile_s"] = v.compile_s
    return r


def _log(name: str, r: dict[str, Any], log) -> None:
    if "error" in r:
        print(f"  {name:32s} ERROR {r['error']}", file=log, flush=True)
        return
    extra = f"  (compile {r['compile_s']:.1f} s)" if "compile_s" in r else ""
    print(f"  {name:32s} {r['median_ms']:9.3f} ms  {r['gb_per_s']:7.1f} GB/s{extra}", file=log, flush=True)


def _reset_dynamo() -> None:
    """Fresh Dynamo caches for a configuration's compiled variants; a higher recompile limit (past it
    Dynamo would silently run eager code)."""
    import torch._dynamo as dynamo

    dynamo.reset()
    dynamo.config.recompile_limit = max(dynamo.config.recompile_limit, 64)


def run_config(cfg: Config, device: torch.device, names: list[str], repeats: int, warmup: int = 3,
               memory: bool = True, interleave: Optional[bool] = None, log=sys.stderr) -> dict[str, Any]:
    """Time every variant of ``names`` on ``cfg``; errors (e.g. out of memory) are recorded, not raised.

    Every variant is built on one shared set of θ, g, F, θ* (same values for all) and timed in rounds
    (one step of each per round), so that all see the same load on this shared machine:

    * interleaved (where every eager variant's state fits :func:`memory_budget`): all eager variants
      in one set of rounds;
    * otherwise, and always for the torch.compile variants: each variant in rounds with torch's
      fused Adam (the reference, kept for the whole configuration), then freed.

    "× fused Adam" is each variant's median over the reference's median *from the same rounds*;
    "× autograd EWC" is that ratio over autograd EWC's. The two peak-memory steps (untimed: the
    second, steady one is measured) of each variant double as its first warm-up steps.
    """
    results: dict[str, Any] = {}
    start = load_stamp()
    if cfg.numel > COMPILE_MAX_NUMEL and any(n.startswith("ewc_compiled") for n in names):
        names = [n for n in names if not n.startswith("ewc_compiled")]
        print(f"[step] {cfg.name}: torch.compile variants left out above {COMPILE_MAX_NUMEL / 1e6:.0f}M parameters "
              "(minutes of compilation; the smaller configurations show them)", file=log, flush=True)
    big = cfg.numel >= 1_000_000  # full garbage collections only where leftovers would matter
    s = torch.finfo(DTYPES[cfg.dtype]).bits // 8
    eager = [n for n in names if not n.startswith("ewc_compiled")]
    need = cfg.numel * (2 * s + 8) + sum(_variant_bytes(cfg, n) for n in eager)
    if interleave is None:
        interleave = need <= memory_budget(device)
    group = eager if interleave else ["adam_fused"]
    print(f"[step] {cfg.name}: {cfg.numel / 1e6:.1f}M elements in {len(cfg.shapes)} tensors"
          f"{', interleaved' if interleave else ', each variant paired with fused Adam'}", file=log, flush=True)
    min_s = 0.02 if device.type == "cuda" else 0.0
    warm = max(1, warmup - 2) if memory else warmup  # the memory measurement makes two calls

    def failed(name: str, e: Exception) -> None:
        results[name] = {"error": f"{type(e).__name__}: {e}"[:500]}
        _log(name, results[name], log)

    shared = build(cfg, device)
    built: dict[str, tuple[Variant, Optional[int]]] = {}
    for name in dict.fromkeys(group + ["adam_fused"]):
        try:
            v = make_variant(name, shared, device)
            built[name] = (v, peak_extra_bytes(v.step, device, big) if memory else None)
        except Exception as e:  # noqa: BLE001 - recorded in the report, the run goes on
            failed(name, e)
    timed = time_round_robin({k: v.step for k, (v, _) in built.items()}, device, repeats, warm, min_s)
    ref, ref_mem = built.pop("adam_fused")
    ref_times = list(timed["adam_fused"]["times_ms"])
    for name, (v, mem) in built.items():
        results[name] = _measure(name, v, cfg, timed[name], mem)
        results[name]["ref_ms"] = timed["adam_fused"]["median_ms"]
        results[name]["timing"] = "interleaved"
        _log(name, results[name], log)
    built.clear()
    for name in names:
        if name in group or name == "adam_fused":
            continue
        free(device, big)
        compiled = name.startswith("ewc_compiled")
        if compiled:
            _reset_dynamo()
        v = None
        try:
            if compiled:
                print(f"  {name:32s} compiling (caches off; on CPU this took 6-212 s)", file=log, flush=True)
            v = make_variant(name, shared, device)
            mem = peak_extra_bytes(v.step, device, big) if memory else None
            pair = time_round_robin({name: v.step, "adam_fused": ref.step}, device, repeats, warm, min_s)
            results[name] = _measure(name, v, cfg, pair[name], mem)
            results[name]["ref_ms"] = pair["adam_fused"]["median_ms"]
            results[name]["timing"] = "paired"
            ref_times += pair["adam_fused"]["times_ms"]
        except Exception as e:  # noqa: BLE001 - recorded in the report, the run goes on
            failed(name, e)
            continue
        finally:
            v = None  # a failed variant's tensors go before the next one is built
            if compiled:
                _reset_dynamo()  # let the compiled step's tensors go
        _log(name, results[name], log)
    if "adam_fused" in names:
        r = timed["adam_fused"] if interleave else {**timed["adam_fused"], **time_stats(ref_times)}
        results["adam_fused"] = _measure("adam_fused", ref, cfg, r, ref_mem)
        results["adam_fused"]["ref_ms"] = results["adam_fused"]["median_ms"]
        results["adam_fused"]["timing"] = "interleaved" if interleave else "paired"
        if not interleave:
            _log("adam_fused", results["adam_fused"], log)
    del ref, shared
    results = {k: results[k] for k in names if k in results}
    free(device, big)
    for r in results.values():
        if "median_ms" in r:
            r["vs_adam_fused"] = r["median_ms"] / r["ref_ms"]
    auto = results.get("ewc_autograd", {}).get("vs_adam_fused")
    for r in results.values():
        if "median_ms" in r:
            r["vs_ewc_autograd"] = r["vs_adam_fused"] / auto if auto else None
    return {"name": cfg.name, "kind": cfg.kind, "dtype": cfg.dtype, "params": cfg.numel, **load_stamp(start),
            "tensors": len(cfg.shapes), "max_tensor": max(math.prod(s) for s in cfg.shapes),
            "interleaved": interleave, "results": results}


def run_step(device: torch.device, sizes: list[float], dtypes: list[str], small_count: int, repeats: int,
             compile_: bool, memory: bool = True, copy_bytes: Optional[int] = None,
             log=sys.stderr) -> dict[str, Any]:
    """The whole step benchmark: environment, copy bandwidth (on ``copy_bytes`` of data; default
    1 GiB on CUDA, 256 MiB on CPU), and every configuration."""
    env = environment(device)
    bw = copy_bandwidth(device, copy_bytes or (1 << 30 if device.type == "cuda" else 1 << 28))
    print(f"[step] {env['device']}; copy bandwidth {bw['gb_per_s']:.1f} GB/s", file=log, flush=True)
    names = variant_names(device, compile_)
    out = {"benchmark": "step", "env": env, "copy_bandwidth": bw, "lambda": LAMBDA, "lr": LR, "fisher_ema": EMA,
           "variants": names, "configs": []}
    for cfg in configs(sizes, dtypes, small_count):
        out["configs"].append(run_config(cfg, device, names, repeats, memory=memory, log=log))
    if hasattr(os, "getloadavg"):
        out["env"]["loadavg_end"] = list(os.getloadavg())
    return out
