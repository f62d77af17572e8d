"""Shared benchmark machinery: timing, peak-memory measurement, environment description."""
from __future__ import annotations

import contextlib
import gc
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from importlib import metadata
from typing import Any, Optional

import torch

__all__ = ["sync", "time_fn", "time_round_robin", "time_stats", "peak_extra_bytes", "memory_method", "environment",
           "copy_bandwidth", "free", "load_stamp", "memory_budget"]


def sync(device: torch.device) -> None:
    """Wait for queued work on ``device`` (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: Optional[torch.device] = None, collect: bool = True) -> None:
    """Collect garbage (a full collection costs ~0.3 s with torch imported; ``collect=False``
    skips it for tiny runs) and return cached device memory, so variants start alike."""
    if collect:
        gc.collect()
    if device is not None and device.type == "cuda":
        torch.cuda.empty_cache()


def time_stats(ts: list[float]) -> dict[str, Any]:
    """Median, min and max of per-call milliseconds, and the raw list."""
    return {"median_ms": statistics.median(ts), "min_ms": min(ts), "max_ms": max(ts), "times_ms": ts}


def _stats(ts: list[float], inner: int, warmup: int, interleaved: bool) -> dict[str, Any]:
    return {**time_stats(ts), "calls_per_repeat": inner, "warmup": warmup, "interleaved": interleaved}


def time_round_robin(fns: dict[str, Callable[[], Any]], device: torch.device, repeats: int | dict[str, int],
                     warmup: int | dict[str, int] = 3, min_repeat_s: float = 0.0) -> dict[str, dict[str, Any]]:
    """Median/min/max milliseconds per call of each function, timed in rounds: every round times
    each function once, in order, so all of them see the same machine load (this machine is shared).

    ``repeats``/``warmup`` may differ per function (a slow one can sit out later rounds). A repeat
    runs a function ``inner`` times (so it lasts at least ``min_repeat_s``; 1 on CPU by default)
    and records the time per call.
    """
    reps = {k: repeats[k] if isinstance(repeats, dict) else repeats for k in fns}
    warm = {k: warmup[k] if isinstance(warmup, dict) else warmup for k in fns}
    for r in range(max(warm.values(), default=0)):
        for k, fn in fns.items():
            if r < warm[k]:
                fn()
    sync(device)
    inner = dict.fromkeys(fns, 1)
    if min_repeat_s > 0:
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync(device)
            inner[k] = max(1, min(1000, math.ceil(min_repeat_s / max(time.perf_counter() - t0, 1e-6))))
    ts: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(max(reps.values(), default=0)):
        for k, fn in fns.items():
            if r >= reps[k]:
                continue
            t0 = time.perf_counter()
            for _ in range(inner[k]):
                fn()
            sync(device)
            ts[k].append((time.perf_counter() - t0) * 1e3 / inner[k])
    return {k: _stats(ts[k], inner[k], warm[k], len(fns) > 1) for k in fns}


def time_fn(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 3,
            min_repeat_s: float = 0.0) -> dict[str, Any]:
    """:func:`time_round_robin` of one function."""
    return time_round_robin({"fn": fn}, device, repeats, warmup, min_repeat_s)["fn"]


def memory_budget(device: torch.device) -> int:
    """Bytes the benchmark may hold at once: 40% of free GPU memory, or on CPU 25% of available
    RAM (at most 6 GiB: the machine is shared)."""
    if device.type == "cuda":
        free_b, _ = torch.cuda.mem_get_info(device)
        return int(0.4 * free_b)
    avail = 8 << 30
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    return min(6 << 30, avail // 4)


def memory_method(device: torch.device) -> str:
    """How :func:`peak_extra_bytes` measures on ``device`` (stated in every report)."""
    if device.type == "cuda":
        return ("torch.cuda.max_memory_allocated() during one call minus memory_allocated() before it "
                "(caching-allocator tensors)")
    return ("torch.profiler(profile_memory=True): running sum of the CPU allocator's allocation and free "
            "events during one call, peak minus start (tensor storage through torch's CPU allocator; "
            "not Python objects or library scratch memory outside it)")


@contextlib.contextmanager
def _without_kineto_chatter():
    """Kineto in the torch 2.13 CPU wheel writes two "USDT: ... profiler_start/stop" lines to fd 2
    per profiled call; they are held back, and anything else written to fd 2 is passed on."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # no real stderr (e.g. captured): nothing to filter
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), fd)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, fd)
            os.close(saved)
            tmp.seek(0)
            rest = b"".join(line for line in tmp if not line.startswith(b"USDT:"))
            if rest:
                os.write(fd, rest)


def peak_extra_bytes(fn: Callable[[], Any], device: torch.device, collect: bool = True) -> int:
    """Peak bytes allocated by torch during one call of ``fn`` above what was allocated before it.

    ``fn`` is called once untimed first, so that state it creates on its first call (an
    optimizer's m and v) is not counted as transient memory: the measured call is a steady one."""
    fn()
    sync(device)
    free(device, collect)
    if device.type == "cuda":
        sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        sync(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del out
        return int(peak)
    from torch.profiler import ProfilerActivity, profile

    with _without_kineto_chatter(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
        del out
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    cur = peak = 0
    for _, n in events:
        cur += n
        peak = max(peak, cur)
    return int(peak)


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int = 7) -> dict[str, float]:
    """GB/s of ``dst.copy_(src)`` on ``nbytes`` of fp32 (2 accesses per element): the attainable
    streaming bandwidth that the achieved-bandwidth columns are compared with."""
    n = nbytes // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    r = time_fn(lambda: dst.copy_(src), device, repeats, warmup=2)
    del src, dst
    free(device)
    return {"bytes": 2 * n * 4, "median_ms": r["median_ms"], "gb_per_s": 2 * n * 4 / (r["median_ms"] * 1e-3) / 1e9}


def load_stamp(start: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Wall-clock time and 1-minute load average now; with ``start``, the pair (start, end) of a
    measured block, so every table can say how busy the machine was while it ran."""
    now = {"time": time.strftime("%Y-%m-%d %H:%M:%S"),
           "load1": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    if start is None:
        return now
    return {"started": start["time"], "ended": now["time"], "load1_start": start["load1"], "load1_end": now["load1"]}


def _version(dist: str) -> Optional[str]:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict[str, Any]:
    """Device, core count, load and library versions."""
    from ewc_fused import __version__

    env: dict[str, Any] = {
        "device_type": device.type,
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "ewc_fused": __version__,
        "opacus": _version("opacus"),
        "backpack": _version("backpack-for-pytorch"),
        "numpy": _version("numpy"),
        "matplotlib": _version("matplotlib"),
        "memory_method": memory_method(device),
        "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    if hasattr(os, "getloadavg"):
        env["loadavg_start"] = list(os.getloadavg())
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
        env["gpu_memory_gb"] = torch.cuda.get_device_properties(device).total_memory / 2**30
        env["device"] = env["gpu"]
    else:
        env["device"] = f"{env['cpu']} ({env['cpu_cores']} cores, {env['torch_threads']} torch threads)"
    return env
