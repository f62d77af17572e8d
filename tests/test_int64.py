"""Offsets are int64 in every kernel, so tensors over 2³¹ elements work.

* In the interpreter (CPU, every CI run): the production kernels run with program ids
  shifted by ``PID_BASE`` on axis 0, so ``pid·BLOCK`` is past 2³¹ (and past 2³²), the
  element count past it too, and the tensor pointers handed to the kernel shifted back by
  the same number of elements: the memory touched is a few KB. Every masked load and store
  is checked to fall inside the tensors given (an offset formed in int32 wraps and lands
  elsewhere, which fails cleanly instead of reading stray memory), and the results must be
  bit-identical to an ordinary launch. Kernels: the per-tensor EWC-Adam step and the three
  Linear Fisher kernels.
* Statically (AOT compilation for sm90, no GPU): in the TTIR of all five kernels, the
  multi-tensor one included (the interpreter cannot run it), every per-element pointer
  offset is i64; the only i32 tensor offsets are splats of a 32-bit kernel argument (a
  per-sample stride added to a 64-bit pointer, which never overflows).
* On a GPU (skipped without CUDA or enough free memory): a real tensor of 2³¹ + 2,053
  elements stepped by the kernel, and a Linear Fisher buffer of more than 2³¹ elements,
  checked around index 2³¹ and at the end against float64 math.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

import triton.language as tl
from triton.runtime import interpreter as interp

from ewc_fused.kernels import ewc_adam as K
from ewc_fused.kernels import fisher_linear as FL

ROOT = Path(__file__).resolve().parents[1]

# pid·1024 past 2³¹ (n_elements a u32 argument) and past 2³² (an i64 argument)
PID_BASES = [(1 << 21) + 3, (1 << 22) + 5]


@contextmanager
def _shifted_programs(monkeypatch, pid_base: int, shifts: dict[int, int], tensors: list[torch.Tensor]):
    """Run interpreted launches with program ids starting at ``pid_base`` on axis 0.

    ``shifts`` maps a tensor's data_ptr to a byte count subtracted from the pointer the
    kernel receives. Every masked load/store must hit one of ``tensors``' storages."""
    builder = interp.interpreter_builder
    ranges = [(t.untyped_storage().data_ptr(), t.untyped_storage().data_ptr() + t.untyped_storage().nbytes())
              for t in tensors]
    get_pid, cvt = builder.create_get_program_id, interp._implicit_cvt
    load, store = builder.create_masked_load, builder.create_masked_store
    hits = {"checked": 0}

    def program_id(axis):
        h = get_pid(axis)
        if axis != 0:
            return h
        pid = int(h.data[0]) + pid_base
        assert pid < 2 ** 31
        return interp.TensorHandle(np.array([pid], dtype=np.int32), tl.int32)

    def implicit_cvt(arg):
        out = cvt(arg)
        if hasattr(arg, "data_ptr") and arg.data_ptr() in shifts:
            out.handle.data = out.handle.data - np.uint64(shifts[arg.data_ptr()])
        return out

    def check(ptrs, mask):
        addr = np.broadcast_to(ptrs.data, np.broadcast_shapes(ptrs.data.shape, mask.data.shape))
        addr = addr[np.broadcast_to(mask.data, addr.shape)].astype(np.uint64)
        size = ptrs.get_element_ty().primitive_bitwidth // 8
        ok = np.zeros(addr.shape, dtype=bool)
        for lo, hi in ranges:
            ok |= (addr >= np.uint64(lo)) & (addr + np.uint64(size) <= np.uint64(hi))
        if not ok.all():
            bad = int(addr[~ok][0])
            raise AssertionError(f"a masked access at {bad:#x} falls outside every tensor given to the kernel "
                                 f"(an offset wrapped?)")
        hits["checked"] += addr.size

    monkeypatch.setattr(builder, "create_get_program_id", program_id)
    monkeypatch.setattr(interp, "_implicit_cvt", implicit_cvt)
    monkeypatch.setattr(builder, "create_masked_load", lambda ptrs, mask, *a: (check(ptrs, mask), load(ptrs, mask, *a))[1])
    monkeypatch.setattr(builder, "create_masked_store", lambda ptrs, v, mask, *a: (check(ptrs, mask), store(ptrs, v, mask, *a))[1])
    try:
        yield hits
    finally:
        monkeypatch.undo()


def _interpreting():
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


needs_interpreter = pytest.mark.skipif(not _interpreting(), reason="needs TRITON_INTERPRET=1 (set by conftest)")


# --------------------------------------------------------------------------- the EWC-Adam step kernel


def _step_tensors(n, gen):
    p, g, m = (torch.randn(n, generator=gen) for _ in range(3))
    v, vmax = torch.rand(n, generator=gen) * 0.01, torch.rand(n, generator=gen) * 0.02
    f, c, frun, sq = torch.rand(n, generator=gen), torch.randn(n, generator=gen), torch.rand(n, generator=gen), \
        torch.rand(n, generator=gen)
    return [p, g, m, v, vmax, f, c, frun, sq]


def _launch_step(rows, step, lr, n, grid, pid_n_elements):
    lr_is_tensor, scalars = K._scalar_args(lr, 0.9, 0.999, 1e-8, 0.01, 3.0, 0.8)
    flags = dict(LR_IS_TENSOR=lr_is_tensor, AMSGRAD=True, MAXIMIZE=False, DECOUPLED_WD=True, HAS_EWC=True,
                 HAS_EMA=True, SQ_FROM_BUFFER=True, HAS_SCALE=True, HAS_FOUND_INF=True)
    scale, found_inf = torch.tensor([4.0]), torch.zeros(1)
    K.ewc_adam_kernel[(grid,)](*rows, step, lr if lr_is_tensor else step, scale, found_inf, pid_n_elements,
                               *scalars, **flags, BLOCK_SIZE=K.BLOCK)
    return [step, scale, found_inf] + ([lr] if lr_is_tensor else [])


@needs_interpreter
@pytest.mark.parametrize("pid_base", PID_BASES, ids=["past-2^31", "past-2^32"])
def test_step_kernel_offsets_past_2_31(monkeypatch, pid_base):
    n = 2 * K.BLOCK + 37  # three programs, the last one masked
    gen = torch.Generator().manual_seed(0)
    base = _step_tensors(n, gen)
    want = [t.clone() for t in base]
    _launch_step(want, torch.tensor(3.0), torch.tensor(1e-2), n, 3, n)

    got = [t.clone() for t in base]
    step, lr = torch.tensor(3.0), torch.tensor(1e-2)
    first = pid_base * K.BLOCK  # the first program's first element
    assert first > 2 ** 31
    shifts = {t.data_ptr(): first * t.element_size() for t in got}
    extra = [step, lr, torch.tensor([4.0]), torch.zeros(1)]
    with _shifted_programs(monkeypatch, pid_base, shifts, got + extra) as hits:
        lr_is_tensor, scalars = K._scalar_args(lr, 0.9, 0.999, 1e-8, 0.01, 3.0, 0.8)
        flags = dict(LR_IS_TENSOR=True, AMSGRAD=True, MAXIMIZE=False, DECOUPLED_WD=True, HAS_EWC=True,
                     HAS_EMA=True, SQ_FROM_BUFFER=True, HAS_SCALE=True, HAS_FOUND_INF=True)
        K.ewc_adam_kernel[(3,)](*got, step, lr, extra[2], extra[3], first + n, *scalars, **flags,
                                BLOCK_SIZE=K.BLOCK)
    assert hits["checked"] > 0
    names = ["θ", "g", "m", "v", "v̂max", "F", "c", "F_run", "s"]
    for name, a, b in zip(names, got, want):
        assert torch.equal(a, b), name
    assert not torch.equal(got[0], base[0])  # it did update


@needs_interpreter
def test_the_bounds_check_catches_an_int32_offset(monkeypatch):
    """The harness is not vacuous: a kernel that forms pid·BLOCK in int32 fails it."""
    import triton

    @triton.jit
    def int32_offsets(x_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # int32: wraps past 2³¹
        mask = offs.to(tl.int64) < n
        tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=mask) + 1.0, mask=mask)

    x = torch.zeros(1024)
    first = PID_BASES[0] * 1024
    assert first > 2 ** 31
    with _shifted_programs(monkeypatch, PID_BASES[0], {x.data_ptr(): first * 4}, [x]):
        with pytest.raises(Exception, match="outside every tensor"):
            int32_offsets[(1,)](x, first + 1024, BLOCK=1024)
    assert not x.any()


# --------------------------------------------------------------------------- the Linear Fisher kernels


def _fisher_case(T, dtype, gen):
    N, OUT, IN = 3, 40, 24
    G = torch.randn(N, T, OUT, generator=gen).to(dtype)
    X = torch.randn(N, T, IN, generator=gen).to(dtype)
    return G, X, OUT, IN


@needs_interpreter
@pytest.mark.parametrize("kernel", ["t1", "seq", "bias"])
def test_linear_fisher_kernels_offsets_past_2_31(monkeypatch, kernel):
    """Axis 0 of every Fisher kernel walks output features: with pid_o·BLOCK_O past 2³¹,
    out_w (stride IN per row), G (stride 1) and out_b are addressed at offsets past 2³¹."""
    gen = torch.Generator().manual_seed(1)
    T = 1 if kernel == "t1" else 3
    G, X, OUT, IN = _fisher_case(T, torch.float32, gen)
    block_o, block_i = FL._block(OUT, 16, 64), FL._block(IN, 16, 64)
    if kernel == "bias":
        block_o = FL._block(OUT, 16, 128)
    pid_base = 2 ** 31 // block_o + 3
    start = pid_base * block_o  # first output feature of the first program: past 2³¹
    assert start > 2 ** 31
    w0 = torch.rand(OUT, IN, generator=gen)
    b0 = torch.rand(OUT, generator=gen)

    def launch(out_w, out_b, out_count, shift):
        grid_o = -(-OUT // block_o)
        if kernel == "t1":
            FL._sq_grad_t1_kernel[(grid_o, -(-IN // block_i))](
                out_w, G, X, 3, out_count, IN, G.stride(0), G.stride(2), X.stride(0), X.stride(2),
                out_w.stride(0), out_w.stride(1), 2.0, BLOCK_O=block_o, BLOCK_I=block_i, BLOCK_N=16)
        elif kernel == "seq":
            FL._sq_grad_seq_kernel[(grid_o, -(-IN // block_i))](
                out_w, G, X, 3, T, out_count, IN, G.stride(0), G.stride(1), G.stride(2),
                X.stride(0), X.stride(1), X.stride(2), out_w.stride(0), out_w.stride(1), 2.0,
                BLOCK_O=block_o, BLOCK_I=block_i, BLOCK_T=16, CAST_F32=True)
        else:
            FL._sq_bias_kernel[(grid_o,)](
                out_b, G, 3, T, out_count, G.stride(0), G.stride(1), G.stride(2), out_b.stride(0), 2.0,
                BLOCK_O=block_o, BLOCK_T=4)

    want_w, want_b = w0.clone(), b0.clone()
    launch(want_w, want_b, OUT, 0)
    got_w, got_b = w0.clone(), b0.clone()
    shifts = {got_w.data_ptr(): start * IN * 4, got_b.data_ptr(): start * 4, G.data_ptr(): start * 4}
    with _shifted_programs(monkeypatch, pid_base, shifts, [got_w, got_b, G, X]) as hits:
        launch(got_w, got_b, start + OUT, start)
    assert hits["checked"] > 0
    if kernel == "bias":
        assert torch.equal(got_b, want_b) and not torch.equal(got_b, b0)
    else:
        assert torch.equal(got_w, want_w) and not torch.equal(got_w, w0)


# --------------------------------------------------------------------------- TTIR of every kernel

_TTIR_CHILD = r"""
import importlib, json, sys
import triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
out = []
for module, name, signature, constexprs in json.load(sys.stdin):
    fn = getattr(importlib.import_module(module), name)
    c = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=GPUTarget("cuda", 90, 32))
    out.append(c.asm["ttir"])
print("TTIR-RESULT " + json.dumps(out))
"""


def _ttir_jobs():
    from tests.test_kernels_fisher import _aot_jobs
    from tests.test_kernels_step import _FLAGS, _signature

    on = {f: True for f in _FLAGS} | {"BLOCK_SIZE": K.BLOCK}
    jobs = [("ewc_fused.kernels.ewc_adam", name, _signature("bf16", "fp32", multi), on)
            for name, multi in (("ewc_adam_kernel", False), ("ewc_adam_multi_kernel", True))]
    jobs += [(m, name, sig, const) for m, name, sig, const, arch in _aot_jobs() if arch == 90 and sig["g_ptr"] == "*bf16"]
    return jobs


def _i32_offsets_not_from_arguments(ttir: str) -> list[str]:
    """tt.addptr lines whose offset is an i32 tensor that is not a splat of a kernel argument."""
    import re

    args = set(re.findall(r"%(\w+): i32", ttir.split("\n", 3)[0] + "\n".join(
        l for l in ttir.splitlines() if l.lstrip().startswith("tt.func")))) or set()
    splats = {}
    for line in ttir.splitlines():
        m = re.match(r"\s*%([\w.]+) = tt\.splat %([\w.]+) ", line)
        if m:
            splats[m.group(1)] = m.group(2)
    bad = []
    for line in ttir.splitlines():
        m = re.match(r"\s*%[\w.]+ = tt\.addptr %[\w.]+, %([\w.]+) : tensor<[^>]*>>, tensor<[0-9x]+x(i\d+)>", line)
        if m and m.group(2) != "i64" and splats.get(m.group(1)) not in args:
            bad.append(line.strip())
    return bad


def test_every_kernel_forms_element_offsets_in_int64():
    jobs = _ttir_jobs()
    assert {j[1] for j in jobs} == {"ewc_adam_kernel", "ewc_adam_multi_kernel", "_sq_grad_seq_kernel",
                                    "_sq_grad_t1_kernel", "_sq_bias_kernel"}
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", _TTIR_CHILD], input=json.dumps(jobs), capture_output=True,
                          text=True, env=env, timeout=900)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("TTIR-RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    for (_, name, _, _), ttir in zip(jobs, json.loads(lines[-1][len("TTIR-RESULT "):])):
        tensor_offsets = [l for l in ttir.splitlines() if "tt.addptr" in l and "tensor<" in l.split(":")[-1]]
        assert len(tensor_offsets) >= 3, name
        assert not _i32_offsets_not_from_arguments(ttir), (name, _i32_offsets_not_from_arguments(ttir))


def test_the_ttir_check_flags_an_int32_offset():
    """The static check is not vacuous: an i32 per-element offset is reported."""
    ttir = ("tt.func public @k(%x: !tt.ptr<f32>, %n: i32) {\n"
            "    %offs = arith.addi %a, %b : tensor<256xi32>\n"
            "    %p = tt.addptr %ptrs, %offs : tensor<256x!tt.ptr<f32>>, tensor<256xi32> loc(#loc1)\n"
            "    %s = tt.splat %n : i32 -> tensor<256xi32>\n"
            "    %q = tt.addptr %ptrs, %s : tensor<256x!tt.ptr<f32>>, tensor<256xi32> loc(#loc2)\n")
    assert _i32_offsets_not_from_arguments(ttir) == [
        "%p = tt.addptr %ptrs, %offs : tensor<256x!tt.ptr<f32>>, tensor<256xi32> loc(#loc1)"]


# --------------------------------------------------------------------------- a real tensor over 2³¹ elements


def _free_cuda_bytes() -> int:
    try:
        return torch.cuda.mem_get_info()[0]
    except Exception:
        return 0


@pytest.mark.cuda
def test_cuda_step_on_a_tensor_over_2_31_elements():
    """θ, g, m, v, F, c in bf16, 2³¹ + 2,053 elements each (26 GB): the kernel updates
    the elements at both ends and around 2³¹ exactly as float64 math on the same inputs,
    to one bf16 ulp."""
    from tests.test_kernels_step import formula

    n = 2 ** 31 + 2053
    need = 6 * 2 * n + (1 << 30)
    if _free_cuda_bytes() < need:
        pytest.skip(f"needs {need / 2**30:.0f} GiB of free GPU memory")
    dev = "cuda"
    gen = torch.Generator(device=dev).manual_seed(0)
    p, g, m = (torch.randn(n, generator=gen, device=dev, dtype=torch.bfloat16) for _ in range(3))
    v = torch.rand(n, generator=gen, device=dev, dtype=torch.bfloat16) * 0.01
    f = torch.rand(n, generator=gen, device=dev, dtype=torch.bfloat16)
    c = torch.randn(n, generator=gen, device=dev, dtype=torch.bfloat16)
    windows = [slice(0, 1500), slice(2 ** 31 - 700, 2 ** 31 + 700), slice(n - 1500, n)]
    before = [[t[w].double().cpu() for t in (p, g, m, v, f, c)] for w in windows]
    step = torch.tensor(1.0, device=dev)
    K.ewc_adam_([p], [g], [m], [v], None, [f], [c], None, None, [step], lr=1e-2, beta1=0.9, beta2=0.999,
                eps=1e-8, weight_decay=0.0, ewc_lambda=3.0, fisher_beta=0.0, amsgrad=False, maximize=False,
                decoupled_weight_decay=False)
    torch.cuda.synchronize()
    for w, (p0, g0, m0, v0, f0, c0) in zip(windows, before):
        want_p, want_m, want_v, _, _ = formula(p0, g0, m0, v0, None, f0, c0, None, None, 1, lr=1e-2, b1=0.9,
                                               b2=0.999, eps=1e-8, wd=0.0, lam=3.0, fb=0.0, amsgrad=False,
                                               maximize=False, decoupled=False, has_ewc=True, has_ema=False)
        for got, want in ((p[w], want_p), (m[w], want_m), (v[w], want_v)):
            got = got.double().cpu()
            assert bool(((got - want).abs() <= 2 ** -7 * want.abs().clamp_min(1e-3 * float(want.abs().max()))).all()), w


@pytest.mark.cuda
def test_cuda_linear_fisher_buffer_over_2_31_elements():
    """out_w of 46,341 × 46,341 fp32 (8.6 GB, 2³¹ + 5.2e4 elements): the rows past 2³¹
    get Σ_n (G_nᵀX_n)² as float64 math does (T = 1 and T = 2)."""
    OUT = IN = 46_341
    assert OUT * IN > 2 ** 31
    need = 4 * OUT * IN + (1 << 30)
    if _free_cuda_bytes() < need:
        pytest.skip(f"needs {need / 2**30:.0f} GiB of free GPU memory")
    dev = "cuda"
    gen = torch.Generator(device=dev).manual_seed(0)
    for T in (1, 2):
        G = torch.randn(3, T, OUT, generator=gen, device=dev)
        X = torch.randn(3, T, IN, generator=gen, device=dev)
        out = torch.zeros(OUT, IN, device=dev)
        FL.linear_sq_grad_sum_(out, G, X)
        torch.cuda.synchronize()
        rows = slice(2 ** 31 // IN - 2, OUT)  # every row from just before element 2³¹ to the end
        want = torch.einsum("nto,nti->noi", G[:, :, rows].double(), X.double()).square().sum(0)
        got = out[rows].double()
        assert float((got - want).abs().max() / want.abs().max()) < 1e-5, T
        del G, X, out
        torch.cuda.empty_cache()
