"""The fused EWC-Adam step kernel: interpreter runs against a float64 formula,
ahead-of-time compilation for sm80/sm90, and CUDA-only tests of the real kernels.

Tolerances: fp32 storage 1e-6 of max|x| against float64 math per step; fp16/bf16
storage: the kernel computes in fp32 and rounds once per store, so results are
within one storage ulp (2⁻¹⁰ / 2⁻⁷ relative) of the float64 math applied to the
same rounded inputs.
"""
from __future__ import annotations

import math

import pytest
import torch

from ewc_fused.kernels import ewc_adam as K
from tests.aot import compile_kernels


def formula(p, g, m, v, vmax, f, c, frun, sq, t, *, lr, b1, b2, eps, wd, lam, fb, amsgrad, maximize,
            decoupled, has_ewc, has_ema):
    """The update of kernels/ewc_adam.py's docstring, in float64, out of place."""
    p, g, m, v, vmax, f, c, frun = (x.double() if x is not None else None for x in (p, g, m, v, vmax, f, c, frun))
    s = sq.double() if sq is not None else g * g
    if maximize:
        g = -g
    if has_ema:
        frun = fb * frun + (1 - fb) * s
    if has_ewc:
        g = g + lam * f * (p - c)
    if decoupled:
        p = p * (1 - lr * wd)
    else:
        g = g + wd * p
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
    if amsgrad:
        vmax = torch.maximum(vmax, v)
        denom = vmax.sqrt() / math.sqrt(bc2) + eps
    else:
        denom = v.sqrt() / math.sqrt(bc2) + eps
    return p - lr / bc1 * m / denom, m, v, vmax, frun


CASES = [
    # n, param dtype, ewc dtype, flags
    (1, torch.float32, torch.float32, dict(amsgrad=True, maximize=True, decoupled=False, ewc=True, ema=True, sq=False)),
    (1023, torch.float32, torch.float32, dict(amsgrad=False, maximize=False, decoupled=True, ewc=True, ema=False, sq=False)),
    (1024, torch.float32, torch.float32, dict(amsgrad=True, maximize=False, decoupled=False, ewc=False, ema=True, sq=True)),
    (2049, torch.float32, torch.bfloat16, dict(amsgrad=False, maximize=True, decoupled=True, ewc=True, ema=True, sq=True)),
    (1500, torch.bfloat16, torch.float32, dict(amsgrad=True, maximize=False, decoupled=False, ewc=True, ema=True, sq=False)),
    (700, torch.float16, torch.float32, dict(amsgrad=False, maximize=False, decoupled=True, ewc=True, ema=True, sq=False)),
]


@pytest.mark.parametrize("lr_tensor", [False, True])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{str(c[1])[6:]}-{str(c[2])[6:]}")
def test_kernel_matches_float64_formula(case, lr_tensor):
    n, pdt, edt, fl = case
    gen = torch.Generator().manual_seed(n)

    def rnd(dtype, positive=False):
        x = torch.rand(n, generator=gen) + 0.1 if positive else torch.randn(n, generator=gen)
        return x.to(dtype)

    p, m = rnd(pdt), rnd(pdt) * 0.1
    v, vmax = rnd(pdt, True) * 0.01, rnd(pdt, True) * 0.01
    f, c, frun = rnd(edt, True), rnd(edt), rnd(edt, True)
    sq = rnd(torch.float32, True) if fl["sq"] else None
    step = torch.tensor(0.0)
    # β₂ = 0.999: 1 − β₂ must not be formed in fp32 (that alone is 1.3e-5 relative off).
    hp = dict(lr=1e-2, b1=0.9, b2=0.999, eps=1e-8, wd=0.05, lam=3.0, fb=0.8)
    exp = [x.clone() for x in (p, m, v, vmax, frun)]
    for t in range(1, 4):
        g = rnd(pdt)
        exp = formula(exp[0], g, exp[1], exp[2], exp[3], f, c, exp[4], sq, t, **hp, amsgrad=fl["amsgrad"],
                      maximize=fl["maximize"], decoupled=fl["decoupled"], has_ewc=fl["ewc"], has_ema=fl["ema"])
        exp = [e.to(x.dtype) if e is not None else None for e, x in zip(exp, (p, m, v, vmax, frun))]
        step += 1
        K.ewc_adam_(
            [p], [g], [m], [v], [vmax] if fl["amsgrad"] else None,
            [f] if fl["ewc"] else None, [c] if fl["ewc"] else None,
            [frun] if fl["ema"] else None, [sq] if fl["sq"] else None, [step],
            lr=torch.tensor(hp["lr"]) if lr_tensor else hp["lr"], beta1=hp["b1"], beta2=hp["b2"], eps=hp["eps"],
            weight_decay=hp["wd"], ewc_lambda=hp["lam"], fisher_beta=hp["fb"], amsgrad=fl["amsgrad"],
            maximize=fl["maximize"], decoupled_weight_decay=fl["decoupled"],
        )
        # Both sides round to storage each step, so compare per step with one storage ulp.
        tol = {torch.float32: 1e-6, torch.bfloat16: 2**-7, torch.float16: 2**-10}
        for got, want in zip((p, m, v, vmax, frun), exp):
            if want is None:
                continue
            diff, ref = (got.double() - want.double()).abs(), want.double().abs()
            if got.dtype == torch.float32:  # relative to the tensor's scale
                assert float(diff.max() / ref.max()) <= tol[got.dtype], (t, got.dtype)
            else:  # one storage ulp per element (floor: values near zero)
                assert bool((diff <= tol[got.dtype] * ref.clamp_min(1e-3 * float(ref.max()))).all()), (t, got.dtype)
        exp = [x.clone() for x in (p, m, v, vmax, frun)]  # continue from the kernel's rounded state


def test_kernel_leaves_frozen_inputs_alone():
    """g, F, c and the squared-gradient source are read-only."""
    n = 1100
    p, g, m, v = (torch.randn(n) for _ in range(4))
    v = v.abs()
    f, c, frun, sq = torch.rand(n), torch.randn(n), torch.rand(n), torch.rand(n)
    keep = [x.clone() for x in (g, f, c, sq)]
    K.ewc_adam_([p], [g], [m], [v], None, [f], [c], [frun], [sq], [torch.tensor(1.0)], lr=1e-2, beta1=0.9,
                beta2=0.999, eps=1e-8, weight_decay=0.0, ewc_lambda=1.0, fisher_beta=0.9, amsgrad=False,
                maximize=False, decoupled_weight_decay=False)
    assert all(torch.equal(a, b) for a, b in zip((g, f, c, sq), keep))


def test_empty_tensor_is_skipped():
    p = torch.empty(0)
    K.ewc_adam_([p], [p.clone()], [p.clone()], [p.clone()], None, None, None, None, None, [torch.tensor(1.0)],
                lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, ewc_lambda=1.0, fisher_beta=0.9,
                amsgrad=False, maximize=False, decoupled_weight_decay=False)


# --------------------------------------------------------------------------- AOT compilation

_PTRS = ["p_ptr", "g_ptr", "m_ptr", "v_ptr", "vmax_ptr", "f_ptr", "c_ptr", "frun_ptr", "sq_ptr"]
_SCALARS = ["lr_value", "beta1", "beta2", "omb1", "omb2", "log_beta1", "log_beta2", "eps", "weight_decay",
            "ewc_lambda", "fisher_beta", "omfb"]
_FLAGS = ["LR_IS_TENSOR", "AMSGRAD", "MAXIMIZE", "DECOUPLED_WD", "HAS_EWC", "HAS_EMA", "SQ_FROM_BUFFER",
          "HAS_SCALE", "HAS_FOUND_INF", "BLOCK_SIZE"]


def _signature(pdt: str, edt: str, multi: bool) -> dict:
    sig = {"ptr_table": "*i64", "numel_table": "*i64", "block_tensor": "*i32", "block_start": "*i64"} if multi else {}
    for name in _PTRS:
        sig[name] = f"*{edt}" if name in ("f_ptr", "c_ptr", "frun_ptr") else ("*fp32" if name == "sq_ptr" else f"*{pdt}")
    sig["step_ptr"] = "*fp32"
    sig["lr_ptr"] = "*fp32"
    sig["scale_ptr"] = "*fp32"
    sig["found_inf_ptr"] = "*fp32"
    if not multi:
        sig["n_elements"] = "i64"
    sig.update({s: "fp32" for s in _SCALARS})
    sig.update({f: "constexpr" for f in _FLAGS})
    return sig


def test_kernels_compile_for_sm80_and_sm90():
    """Every kernel, for each parameter dtype and EWC-state dtype it serves, all features on and off."""
    on = {f: True for f in _FLAGS} | {"BLOCK_SIZE": K.BLOCK}
    off = {f: False for f in _FLAGS} | {"BLOCK_SIZE": K.BLOCK}
    jobs = []
    for arch in (80, 90):
        for pdt, edt in [("fp32", "fp32"), ("fp16", "fp32"), ("bf16", "fp32"), ("fp32", "bf16"), ("bf16", "bf16")]:
            for kernel, multi in (("ewc_adam_kernel", False), ("ewc_adam_multi_kernel", True)):
                for flags in (on, off) if pdt == "fp32" and edt == "fp32" else (on,):
                    jobs.append(("ewc_fused.kernels.ewc_adam", kernel, _signature(pdt, edt, multi), flags, arch))
    results = compile_kernels(jobs)
    bad = [(j[1], j[4], j[2]["p_ptr"], r["error"]) for j, r in zip(jobs, results) if not r["ok"]]
    assert not bad, bad
    assert all(r["cubin"] > 0 for r in results)


# --------------------------------------------------------------------------- CUDA only


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_triton_backend_matches_torch_backend(dtype):
    from ewc_fused import FusedEWCAdam

    torch.manual_seed(0)
    # Many small tensors (the multi-tensor launch) and a few large ones.
    shapes = [(17,), (64, 3), (1000,)] * 40 + [(1 << 17,), (513, 1025)]
    ps_t = [torch.nn.Parameter(torch.randn(s, device="cuda", dtype=dtype)) for s in shapes]
    ps_r = [torch.nn.Parameter(p.detach().clone()) for p in ps_t]
    kw = dict(lr=1e-2, amsgrad=True, weight_decay=0.01, ewc_lambda=2.0, fisher_ema=0.9)
    o_t = FusedEWCAdam(ps_t, backend="triton", **kw)
    o_r = FusedEWCAdam(ps_r, backend="torch", **kw)
    for t in range(5):
        for a, b in zip(ps_t, ps_r):
            g = torch.randn_like(a)
            a.grad, b.grad = g, g.clone()
        o_t.step()
        o_r.step()
        if t == 1:
            fs = [torch.rand_like(p, dtype=torch.float32) for p in ps_t]
            o_t.consolidate(dict(zip(ps_t, fs)))
            o_r.consolidate(dict(zip(ps_r, fs)))
    tol = 1e-5 if dtype == torch.float32 else 2**-6
    for a, b in zip(ps_t, ps_r):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    assert o_t.state[ps_t[0]]["step"].is_cuda


@pytest.mark.cuda
def test_cuda_step_has_no_host_sync():
    from ewc_fused import FusedEWCAdam

    p = torch.nn.Parameter(torch.randn(4096, device="cuda"))
    opt = FusedEWCAdam([p], lr=torch.tensor(1e-3, device="cuda"), backend="triton", capturable=True)
    p.grad = torch.randn_like(p)
    opt.step()
    opt.consolidate({p: torch.rand_like(p)})
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.cuda
def test_cuda_multi_tensor_table_not_reused_for_other_sizes():
    """Same addresses, different numel (a view of one buffer): the cached table must not be reused."""
    buf = torch.randn(5000, device="cuda")
    for n in (5000, 10, 3000):
        p = buf[:n]
        exp = p.clone()
        g, m, v = torch.randn_like(p), torch.zeros_like(p), torch.zeros_like(p)
        step = torch.ones((), device="cuda")
        tail = buf[n:].clone()
        K.ewc_adam_([p], [g], [m], [v], None, None, None, None, None, [step], lr=1e-2, beta1=0.9, beta2=0.999,
                    eps=1e-8, weight_decay=0.0, ewc_lambda=0.0, fisher_beta=0.0, amsgrad=False, maximize=False,
                    decoupled_weight_decay=False)
        torch.testing.assert_close(p, exp - 1e-2 * torch.sign(g), rtol=0, atol=1e-5)  # first Adam step: lr·sign(g)
        assert torch.equal(buf[n:], tail)
