"""Tests for ewc_fused.kernels.fisher_linear (per-sample squared-gradient sums for Linear).

The kernels run under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1),
so sizes are kept small. CUDA code generation is checked separately by compiling every
kernel ahead of time for sm80 and sm90.
"""
import pytest
import torch

from ewc_fused.kernels import fisher_linear as F
from ewc_fused.kernels.fisher_linear import linear_sq_grad_sum_, linear_sq_grad_sum_torch_

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LAUNCHERS = [linear_sq_grad_sum_, linear_sq_grad_sum_torch_]

# fp32 inputs: the result is a sum of squares of fp32 dot products, so only fp32 rounding
# in the dots and the sums separates it from float64: rtol 1e-4 leaves ample room.
RTOL_FP32 = 1e-4
# fp16/bf16 inputs: the float64 reference uses the same *rounded* inputs and every product
# is exact in fp32, so again only fp32 accumulation error remains; 1e-3 is still loose
# enough for tensor-core accumulation order on a GPU.
RTOL_HALF = 1e-3

# (N, T, out, in). T=None means 2-D inputs (N, out) / (N, in).
SHAPES = [
    (3, 5, 19, 23),     # odd sizes, one tile each
    (4, 1, 19, 23),     # 3-D with T == 1 (T == 1 kernel)
    (6, None, 19, 23),  # 2-D inputs
    (2, 37, 70, 67),    # crosses BLOCK_T=32, BLOCK_O=64, BLOCK_I=64 once
    (40, None, 70, 67), # crosses BLOCK_N=32 and both feature blocks once
]


def _rand(*shape, dtype=torch.float32):
    """Random values with magnitude in [0.5, 1.5) and random sign: never zero."""
    mag = torch.rand(*shape) + 0.5
    sign = torch.where(torch.rand(*shape) < 0.5, -1.0, 1.0)
    return (mag * sign).to(dtype)


def _make(N, T, n_out, n_in, dtype):
    if T is None:
        return _rand(N, n_out, dtype=dtype), _rand(N, n_in, dtype=dtype)
    return _rand(N, T, n_out, dtype=dtype), _rand(N, T, n_in, dtype=dtype)


def _ref(G, X):
    """Explicit per-sample loop in float64 over the given (already rounded) inputs."""
    if G.dim() == 2:
        G, X = G[:, None, :], X[:, None, :]
    ref_w = torch.zeros(G.shape[2], X.shape[2], dtype=torch.float64)
    ref_b = torch.zeros(G.shape[2], dtype=torch.float64)
    for n in range(G.shape[0]):
        g = G[n].double().T @ X[n].double()
        ref_w += g ** 2
        ref_b += G[n].double().sum(0) ** 2
    return ref_w, ref_b


def _close(actual, expected, rtol):
    # atol only guards entries that happen to be tiny relative to the rest.
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=rtol * 1e-3 * expected.abs().max().item())


@pytest.mark.parametrize("launcher", LAUNCHERS, ids=["triton", "torch"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_float64_loop(launcher, dtype, shape):
    G, X = _make(*shape, dtype=dtype)
    n_out, n_in = shape[2], shape[3]
    init_w = _rand(n_out, n_in)
    init_b = _rand(n_out)
    out_w, out_b = init_w.clone(), init_b.clone()
    launcher(out_w, G, X, out_b)
    ref_w, ref_b = _ref(G, X)
    rtol = RTOL_FP32 if dtype == torch.float32 else RTOL_HALF
    _close(out_w - init_w, ref_w, rtol)
    _close(out_b - init_b, ref_b, rtol)


@pytest.mark.parametrize("launcher", LAUNCHERS, ids=["triton", "torch"])
@pytest.mark.parametrize("shape", [(3, 5, 19, 23), (5, None, 19, 23)], ids=str)
def test_accumulates_into_existing_contents(launcher, shape):
    G, X = _make(*shape, dtype=torch.float32)
    init_w = _rand(shape[2], shape[3])
    init_b = _rand(shape[2])
    out_w, out_b = init_w.clone(), init_b.clone()
    launcher(out_w, G, X, out_b)
    once_w, once_b = out_w - init_w, out_b - init_b
    launcher(out_w, G, X, out_b)
    torch.testing.assert_close(out_w, init_w + 2 * once_w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_b, init_b + 2 * once_b, rtol=1e-5, atol=1e-5)
    # out_b is optional and left alone when omitted
    before_b = out_b.clone()
    launcher(out_w, G, X)
    torch.testing.assert_close(out_w, init_w + 3 * once_w, rtol=1e-5, atol=1e-5)
    assert torch.equal(out_b, before_b)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_triton_and_torch_agree(dtype, shape):
    G, X = _make(*shape, dtype=dtype)
    w1, b1 = torch.zeros(shape[2], shape[3]), torch.zeros(shape[2])
    w2, b2 = w1.clone(), b1.clone()
    linear_sq_grad_sum_(w1, G, X, b1)
    linear_sq_grad_sum_torch_(w2, G, X, b2)
    torch.testing.assert_close(w1, w2, rtol=RTOL_FP32, atol=0)
    torch.testing.assert_close(b1, b2, rtol=RTOL_FP32, atol=0)


def test_torch_fallback_chunks(monkeypatch):
    # Force chunks of 2 samples (and a ragged last chunk) through the bmm path.
    N, T, n_out, n_in = 5, 3, 7, 9
    monkeypatch.setattr(F, "_TORCH_CHUNK_BYTES", 2 * 4 * n_out * n_in)
    G, X = _make(N, T, n_out, n_in, torch.float32)
    out_w, out_b = torch.zeros(n_out, n_in), torch.zeros(n_out)
    linear_sq_grad_sum_torch_(out_w, G, X, out_b)
    ref_w, ref_b = _ref(G, X)
    _close(out_w, ref_w, RTOL_FP32)
    _close(out_b, ref_b, RTOL_FP32)


@pytest.mark.parametrize("launcher", LAUNCHERS, ids=["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_non_contiguous_inputs(launcher, dtype):
    N, T, n_out, n_in = 3, 6, 19, 23
    # grad_out as a permuted view of a (T, N, out) buffer; inputs as a strided slice.
    G = _rand(T, N, n_out, dtype=dtype).permute(1, 0, 2)
    X = _rand(N, T, 2 * n_in + 1, dtype=dtype)[:, :, 1::2]
    assert not G.is_contiguous() and not X.is_contiguous()
    out_w, out_b = torch.zeros(n_out, n_in), torch.zeros(n_out)
    launcher(out_w, G, X, out_b)
    ref_w, ref_b = _ref(G, X)
    rtol = RTOL_FP32 if dtype == torch.float32 else RTOL_HALF
    _close(out_w, ref_w, rtol)
    _close(out_b, ref_b, rtol)

    # 2-D (T == 1): transposed views, feature-major storage.
    N = 35
    G2 = _rand(n_out, N, dtype=dtype).t()
    X2 = _rand(n_in, N, dtype=dtype).t()
    out_w, out_b = torch.zeros(n_out, n_in), torch.zeros(n_out)
    launcher(out_w, G2, X2, out_b)
    ref_w, ref_b = _ref(G2, X2)
    _close(out_w, ref_w, rtol)
    _close(out_b, ref_b, rtol)


@pytest.mark.parametrize("launcher", LAUNCHERS, ids=["triton", "torch"])
def test_empty_batch_is_a_no_op(launcher):
    out_w, out_b = _rand(4, 5), _rand(4)
    w0, b0 = out_w.clone(), out_b.clone()
    launcher(out_w, torch.zeros(0, 3, 4), torch.zeros(0, 3, 5), out_b)
    launcher(out_w, torch.zeros(0, 4), torch.zeros(0, 5), out_b)
    assert torch.equal(out_w, w0) and torch.equal(out_b, b0)


@pytest.mark.parametrize("launcher", LAUNCHERS, ids=["triton", "torch"])
def test_inputs_requiring_grad(launcher):
    G, X = _make(3, 4, 6, 7, torch.float32)
    G.requires_grad_(True)
    X.requires_grad_(True)
    out_w, out_b = torch.zeros(6, 7), torch.zeros(6)
    launcher(out_w, G, X, out_b)
    assert not out_w.requires_grad and not out_b.requires_grad
    ref_w, ref_b = _ref(G.detach(), X.detach())
    _close(out_w, ref_w, RTOL_FP32)
    _close(out_b, ref_b, RTOL_FP32)


def _bad_cases():
    N, T, O, I = 2, 3, 4, 5
    g, x = torch.ones(N, T, O), torch.ones(N, T, I)
    w, b = torch.zeros(O, I), torch.zeros(O)
    return [
        ("out_w", dict(out_w=torch.zeros(O, I, dtype=torch.float64), grad_out=g, inputs=x)),
        ("out_w", dict(out_w=torch.zeros(O, I + 1), grad_out=g, inputs=x)),
        ("out_w", dict(out_w=torch.zeros(I, O).t(), grad_out=g, inputs=x)),
        ("out_w", dict(out_w=w.numpy(), grad_out=g, inputs=x)),
        ("out_b", dict(out_w=w, grad_out=g, inputs=x, out_b=torch.zeros(O, dtype=torch.float16))),
        ("out_b", dict(out_w=w, grad_out=g, inputs=x, out_b=torch.zeros(O + 1))),
        ("out_b", dict(out_w=w, grad_out=g, inputs=x, out_b=torch.zeros(O, 2)[:, 0])),
        ("grad_out", dict(out_w=w, grad_out=torch.ones(O), inputs=torch.ones(I))),
        ("grad_out", dict(out_w=w, grad_out=torch.ones(1, N, T, O), inputs=x)),
        ("grad_out", dict(out_w=w, grad_out=g.double(), inputs=x.double())),
        ("grad_out", dict(out_w=w, grad_out=g.to(torch.int32), inputs=x.to(torch.int32))),
        ("inputs", dict(out_w=w, grad_out=g, inputs=x.half())),
        ("inputs", dict(out_w=w, grad_out=g, inputs=torch.ones(N + 1, T, I))),
        ("inputs", dict(out_w=w, grad_out=g, inputs=torch.ones(N, T + 1, I))),
        ("inputs", dict(out_w=w, grad_out=g, inputs=torch.ones(N, I))),
        ("inputs", dict(out_w=w, grad_out=g, inputs=torch.ones(N, T, I, device="meta"))),
        ("out_b", dict(out_w=w, grad_out=g, inputs=x, out_b=torch.zeros(O, device="meta"))),
    ]


@pytest.mark.parametrize("launcher", LAUNCHERS, ids=["triton", "torch"])
@pytest.mark.parametrize("name,kwargs", _bad_cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_bad_inputs_raise_value_error(launcher, name, kwargs):
    with pytest.raises(ValueError, match=name):
        launcher(**kwargs)


@pytest.mark.parametrize("launcher", LAUNCHERS, ids=["triton", "torch"])
@pytest.mark.parametrize("T", [None, 3])
def test_scale_multiplies_what_is_added(launcher, T):
    """out += scale * Σ_n (G_nᵀX_n)², onto a non-zero buffer, for both kernels (T=1 and T>1)."""
    torch.manual_seed(5)
    G, X = _make(5, T, 19, 23, torch.float32)
    ref_w, ref_b = _ref(G, X)
    w0, b0 = _rand(19, 23).abs(), _rand(19).abs()
    w, b = w0.clone(), b0.clone()
    launcher(w, G, X, b, scale=2.5)
    _close(w, w0.double() + 2.5 * ref_w, RTOL_FP32)
    _close(b, b0.double() + 2.5 * ref_b, RTOL_FP32)


def _aot_jobs():
    """One job per kernel x input dtype x arch, with the specialisation the JIT would use
    for contiguous inputs (unit strides become constexpr 1) and the largest block sizes
    the launcher picks; the T == 1 kernel is compiled with all-i64 strides instead."""
    module = "ewc_fused.kernels.fisher_linear"
    jobs = []
    for arch in (80, 90):
        for dt in ("fp32", "fp16", "bf16"):
            p = f"*{dt}"
            sig = {
                "out_ptr": "*fp32", "g_ptr": p, "x_ptr": p,
                "N": "i32", "T": "i32", "OUT": "i32", "IN": "i32",
                "stride_gn": "i32", "stride_gt": "i32", "stride_go": "constexpr",
                "stride_xn": "i32", "stride_xt": "i32", "stride_xi": "constexpr",
                "stride_wo": "i32", "stride_wi": "constexpr", "scale": "fp32",
                "BLOCK_O": "constexpr", "BLOCK_I": "constexpr", "BLOCK_T": "constexpr",
                "CAST_F32": "constexpr",
            }
            const = {"stride_go": 1, "stride_xi": 1, "stride_wi": 1,
                     "BLOCK_O": 64, "BLOCK_I": 64, "BLOCK_T": 32, "CAST_F32": False}
            jobs.append((module, "_sq_grad_seq_kernel", sig, const, arch))

            sig = {
                "out_ptr": "*fp32", "g_ptr": p, "x_ptr": p,
                "N": "i32", "OUT": "i32", "IN": "i32",
                "stride_gn": "i64", "stride_go": "i64",
                "stride_xn": "i64", "stride_xi": "i64",
                "stride_wo": "i64", "stride_wi": "i64", "scale": "fp32",
                "BLOCK_O": "constexpr", "BLOCK_I": "constexpr", "BLOCK_N": "constexpr",
            }
            const = {"BLOCK_O": 64, "BLOCK_I": 64, "BLOCK_N": 32}
            jobs.append((module, "_sq_grad_t1_kernel", sig, const, arch))

            sig = {
                "out_ptr": "*fp32", "g_ptr": p,
                "N": "i32", "T": "i32", "OUT": "i32",
                "stride_gn": "i32", "stride_gt": "i32", "stride_go": "constexpr",
                "stride_b": "constexpr", "scale": "fp32",
                "BLOCK_O": "constexpr", "BLOCK_T": "constexpr",
            }
            const = {"stride_go": 1, "stride_b": 1, "BLOCK_O": 128, "BLOCK_T": 16}
            jobs.append((module, "_sq_bias_kernel", sig, const, arch))
    return jobs


def test_aot_compile_sm80_sm90():
    from tests.aot import compile_kernels

    jobs = _aot_jobs()
    kernels = {name for _, name, *_ in jobs}
    assert kernels == {"_sq_grad_seq_kernel", "_sq_grad_t1_kernel", "_sq_bias_kernel"}
    results = compile_kernels(jobs)
    assert len(results) == len(jobs)
    failures = [
        f"{name} sm{arch} {sig['g_ptr']}: {res.get('error')}"
        for (_, name, sig, _, arch), res in zip(jobs, results) if not res["ok"]
    ]
    assert not failures, "\n".join(failures)
