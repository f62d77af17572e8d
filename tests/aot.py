"""Ahead-of-time compilation of Triton kernels for real GPU targets, without a GPU.

The interpreter checks the math of a kernel; this checks CUDA code generation
(dtypes, ``tl.dot`` shapes, constexpr use) for sm80 and sm90. It must run without
``TRITON_INTERPRET``, so :func:`compile_kernels` runs the compiles in a
subprocess with a clean environment and returns what each produced.

A job is ``(module, kernel_name, signature, constexprs, arch)`` where ``signature``
maps every argument (constexprs included, typed ``"constexpr"``) to a Triton type
string such as ``"*fp32"``, ``"i64"`` or ``"fp32"``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_CHILD = r"""
import importlib, json, sys
import triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
jobs = json.load(sys.stdin)
out = []
for module, name, signature, constexprs, arch in jobs:
    fn = getattr(importlib.import_module(module), name)
    try:
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
        c = triton.compile(src, target=GPUTarget("cuda", arch, 32))
        out.append({"ok": True, "ptx": len(c.asm["ptx"]), "cubin": len(c.asm["cubin"])})
    except Exception as e:  # reported to the test, which fails with the message
        out.append({"ok": False, "error": f"{type(e).__name__}: {e}"[:4000]})
print("AOT-RESULT " + json.dumps(out))
"""


def compile_kernels(jobs: list[tuple]) -> list[dict]:
    """Compile each job in a fresh interpreter-free Python; return one result per job."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD],
        input=json.dumps([list(j) for j in jobs]),
        capture_output=True, text=True, env=env, timeout=900,
    )
    lines = [l for l in proc.stdout.splitlines() if l.startswith("AOT-RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"AOT compile subprocess failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("AOT-RESULT "):])
