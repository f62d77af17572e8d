"""Per-sample squared-gradient sums for ``nn.Linear``, without per-sample gradients.

For ``y = x W^T + b`` applied to sample ``n``'s input ``X_n`` (T x in) with output
gradient ``G_n`` (T x out) -- the gradient of sample ``n``'s own loss -- the
per-sample gradients are ``G_n^T X_n`` (out x in) and ``sum_t G_n,t`` (out). These
launchers accumulate, into fp32 buffers (``out += ...``)::

    S_W = sum_n (G_n^T X_n) ** 2            (elementwise square, out x in)
    S_b = sum_n (sum_t G_n,t) ** 2          (out)

and for T == 1 the weight term collapses to one matmul: ``S_W = (G**2)^T (X**2)``.

Tiling:

* ``_sq_grad_seq_kernel`` (general T): the grid is (out tiles, in tiles). Each
  program owns a ``BLOCK_O x BLOCK_I`` tile of ``S_W`` and keeps it in fp32
  registers. For each sample ``n`` it builds that tile of ``G_n^T X_n`` with
  ``tl.dot`` over T in chunks of ``BLOCK_T`` (masked tail), squares it in fp32,
  adds it to the accumulator, and at the end adds the accumulator into ``out_w``.
  Total work is that of forming the per-sample gradients, but each one only
  ever lives as one register tile.
* ``_sq_grad_t1_kernel`` (T == 1): same grid; each program runs a matmul over N
  in chunks of ``BLOCK_N`` of the squared (fp32) tiles of G and X.
* ``_sq_bias_kernel``: the grid is over out tiles; each program loops over
  samples, sums G over T in chunks of ``BLOCK_T``, squares and accumulates.

Precision: loads are in the input dtype (fp32, fp16 or bf16); accumulation is
always fp32. In the general kernel, fp16/bf16 tiles go to ``tl.dot`` in their own
dtype with an fp32 accumulator (the products are exact in fp32); fp32 tiles use
``input_precision="ieee"`` so no TF32 rounding happens. The T == 1 kernel squares
in fp32 and also uses an IEEE fp32 ``tl.dot``. Under the Triton interpreter
(``TRITON_INTERPRET=1``), whose bf16 arithmetic is wrong, the launcher sets
``CAST_F32`` so the general kernel converts loaded tiles to fp32 before ``tl.dot``
(the same values, since fp16/bf16 -> fp32 is exact).

All offsets are computed in int64 and every input is addressed through its
strides, so non-contiguous views need no copy.

``linear_sq_grad_sum_torch_`` is a pure-torch version of the same math in bounded
memory (``torch.bmm`` over chunks of samples, at most ~64 MiB of per-sample
gradients alive at once; one matmul for T == 1). It is the CPU fallback and the
reference for the kernels.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["linear_sq_grad_sum_", "linear_sq_grad_sum_torch_"]

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# At most this many bytes of fp32 per-sample gradients exist at once in the torch path.
_TORCH_CHUNK_BYTES = 64 * 1024 * 1024


# --------------------------------------------------------------------------- kernels
@triton.jit
def _sq_grad_seq_kernel(
    out_ptr, g_ptr, x_ptr,
    N, T, OUT, IN,
    stride_gn, stride_gt, stride_go,
    stride_xn, stride_xt, stride_xi,
    stride_wo, stride_wi,
    scale,
    BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_T: tl.constexpr,
    CAST_F32: tl.constexpr,
):
    """out[o, i] += scale * sum_n (sum_t G[n, t, o] * X[n, t, i]) ** 2 for one (o, i) tile."""
    pid_o = tl.program_id(0).to(tl.int64)
    pid_i = tl.program_id(1).to(tl.int64)
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)  # int64
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)  # int64
    mask_o = offs_o < OUT
    mask_i = offs_i < IN
    arange_t = tl.arange(0, BLOCK_T).to(tl.int64)

    # Stride arguments are not cast themselves (the JIT turns a stride of 1 into a
    # constexpr); every product has an int64 factor, and the per-sample step is a
    # pointer increment, so no offset is ever formed in int32.
    # The G tile is loaded directly as (BLOCK_O, BLOCK_T): the transpose is in the addressing.
    g_n = g_ptr + offs_o[:, None] * stride_go
    x_n = x_ptr + offs_i[None, :] * stride_xi

    acc = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
    for _n in range(0, N):
        grad = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
        for t0 in range(0, T, BLOCK_T):
            offs_t = t0 + arange_t  # int64
            mask_t = offs_t < T
            g = tl.load(g_n + offs_t[None, :] * stride_gt, mask=mask_o[:, None] & mask_t[None, :], other=0.0)
            x = tl.load(x_n + offs_t[:, None] * stride_xt, mask=mask_t[:, None] & mask_i[None, :], other=0.0)
            if CAST_F32:
                g = g.to(tl.float32)
                x = x.to(tl.float32)
            grad = tl.dot(g, x, grad, input_precision="ieee")
        acc += grad * grad
        g_n += stride_gn
        x_n += stride_xn

    w_ptrs = out_ptr + offs_o[:, None] * stride_wo + offs_i[None, :] * stride_wi
    w_mask = mask_o[:, None] & mask_i[None, :]
    cur = tl.load(w_ptrs, mask=w_mask, other=0.0)
    tl.store(w_ptrs, cur + acc * scale, mask=w_mask)


@triton.jit
def _sq_grad_t1_kernel(
    out_ptr, g_ptr, x_ptr,
    N, OUT, IN,
    stride_gn, stride_go,
    stride_xn, stride_xi,
    stride_wo, stride_wi,
    scale,
    BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """out[o, i] += scale * sum_n G[n, o]**2 * X[n, i]**2 for one (o, i) tile (T == 1)."""
    pid_o = tl.program_id(0).to(tl.int64)
    pid_i = tl.program_id(1).to(tl.int64)
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)  # int64
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)  # int64
    mask_o = offs_o < OUT
    mask_i = offs_i < IN
    arange_n = tl.arange(0, BLOCK_N).to(tl.int64)

    g_tile = g_ptr + offs_o[:, None] * stride_go
    x_tile = x_ptr + offs_i[None, :] * stride_xi

    acc = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + arange_n  # int64
        mask_n = offs_n < N
        g = tl.load(g_tile + offs_n[None, :] * stride_gn, mask=mask_o[:, None] & mask_n[None, :], other=0.0)
        x = tl.load(x_tile + offs_n[:, None] * stride_xn, mask=mask_n[:, None] & mask_i[None, :], other=0.0)
        g = g.to(tl.float32)
        x = x.to(tl.float32)
        acc = tl.dot(g * g, x * x, acc, input_precision="ieee")

    w_ptrs = out_ptr + offs_o[:, None] * stride_wo + offs_i[None, :] * stride_wi
    w_mask = mask_o[:, None] & mask_i[None, :]
    cur = tl.load(w_ptrs, mask=w_mask, other=0.0)
    tl.store(w_ptrs, cur + acc * scale, mask=w_mask)


@triton.jit
def _sq_bias_kernel(
    out_ptr, g_ptr,
    N, T, OUT,
    stride_gn, stride_gt, stride_go,
    stride_b,
    scale,
    BLOCK_O: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """out[o] += scale * sum_n (sum_t G[n, t, o]) ** 2 for one tile of o."""
    pid_o = tl.program_id(0).to(tl.int64)
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)  # int64
    mask_o = offs_o < OUT
    arange_t = tl.arange(0, BLOCK_T).to(tl.int64)

    g_n = g_ptr + offs_o[None, :] * stride_go

    acc = tl.zeros((BLOCK_O,), dtype=tl.float32)
    for _n in range(0, N):
        s = tl.zeros((BLOCK_O,), dtype=tl.float32)
        for t0 in range(0, T, BLOCK_T):
            offs_t = t0 + arange_t  # int64
            mask_t = offs_t < T
            g = tl.load(g_n + offs_t[:, None] * stride_gt, mask=mask_t[:, None] & mask_o[None, :], other=0.0)
            s += tl.sum(g.to(tl.float32), axis=0)
        acc += s * s
        g_n += stride_gn

    b_ptrs = out_ptr + offs_o * stride_b
    cur = tl.load(b_ptrs, mask=mask_o, other=0.0)
    tl.store(b_ptrs, cur + acc * scale, mask=mask_o)


# --------------------------------------------------------------------------- helpers
def _interpreting() -> bool:
    """True when kernels run under the Triton interpreter (TRITON_INTERPRET=1)."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - very old triton
        return False
    return isinstance(_sq_grad_seq_kernel, InterpretedFunction)


def _block(n: int, lo: int, hi: int) -> int:
    """Power-of-two block size for an extent ``n``, clamped to [lo, hi]."""
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def _validate(out_w, grad_out, inputs, out_b):
    """Check arguments; return (G, X) as 3-D (N, T, features) views."""
    for name, t in (("out_w", out_w), ("grad_out", grad_out), ("inputs", inputs)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if out_b is not None and not isinstance(out_b, torch.Tensor):
        raise ValueError(f"out_b must be a torch.Tensor or None, got {type(out_b).__name__}")

    if grad_out.dim() not in (2, 3):
        raise ValueError(
            f"grad_out must have shape (N, T, out) or (N, out), got shape {tuple(grad_out.shape)}")
    if inputs.dim() != grad_out.dim():
        raise ValueError(
            f"inputs must have the same number of dimensions as grad_out ({grad_out.dim()}): "
            f"expected {'(N, T, in)' if grad_out.dim() == 3 else '(N, in)'}, "
            f"got shape {tuple(inputs.shape)}")
    if inputs.shape[0] != grad_out.shape[0]:
        raise ValueError(
            f"inputs has {inputs.shape[0]} samples but grad_out has {grad_out.shape[0]} "
            f"(shapes {tuple(inputs.shape)} and {tuple(grad_out.shape)})")
    if grad_out.dim() == 3 and inputs.shape[1] != grad_out.shape[1]:
        raise ValueError(
            f"inputs has sequence length T={inputs.shape[1]} but grad_out has T={grad_out.shape[1]}")

    if grad_out.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"grad_out must be float32, float16 or bfloat16, got {grad_out.dtype}")
    if inputs.dtype != grad_out.dtype:
        raise ValueError(f"inputs dtype {inputs.dtype} must match grad_out dtype {grad_out.dtype}")

    n_out, n_in = grad_out.shape[-1], inputs.shape[-1]
    if out_w.dtype != torch.float32:
        raise ValueError(f"out_w must be float32, got {out_w.dtype}")
    if tuple(out_w.shape) != (n_out, n_in):
        raise ValueError(f"out_w must have shape (out, in) = {(n_out, n_in)}, got {tuple(out_w.shape)}")
    if not out_w.is_contiguous():
        raise ValueError("out_w must be contiguous")
    if out_b is not None:
        if out_b.dtype != torch.float32:
            raise ValueError(f"out_b must be float32, got {out_b.dtype}")
        if tuple(out_b.shape) != (n_out,):
            raise ValueError(f"out_b must have shape (out,) = {(n_out,)}, got {tuple(out_b.shape)}")
        if not out_b.is_contiguous():
            raise ValueError("out_b must be contiguous")

    dev = out_w.device
    others = [("grad_out", grad_out), ("inputs", inputs)] + ([("out_b", out_b)] if out_b is not None else [])
    for name, t in others:
        if t.device != dev:
            raise ValueError(f"{name} is on {t.device} but out_w is on {dev}; all tensors must share a device")

    if grad_out.dim() == 2:
        grad_out, inputs = grad_out.unsqueeze(1), inputs.unsqueeze(1)
    return grad_out, inputs


# --------------------------------------------------------------------------- launchers
def linear_sq_grad_sum_(
    out_w: torch.Tensor,
    grad_out: torch.Tensor,
    inputs: torch.Tensor,
    out_b: torch.Tensor | None = None,
    scale: float = 1.0,
) -> None:
    """Add ``scale * sum_n (G_n^T X_n)**2`` to ``out_w`` (and ``scale * sum_n (sum_t G_n,t)**2`` to ``out_b``).

    Args:
        out_w: fp32 contiguous (out, in) buffer, updated in place.
        grad_out: (N, T, out) or (N, out) per-sample output gradients, fp32/fp16/bf16.
        inputs: (N, T, in) or (N, in) layer inputs, same dtype as ``grad_out``.
        out_b: optional fp32 contiguous (out,) buffer for the bias term, updated in place.
        scale: multiplies what is added (e.g. N² to undo a mean-reduced loss).

    Runs the Triton kernels; tensors must be on a CUDA device (or on the CPU with
    ``TRITON_INTERPRET=1``). Any strides are accepted for ``grad_out``/``inputs``.
    """
    G, X = _validate(out_w, grad_out, inputs, out_b)
    interp = _interpreting()
    if out_w.device.type != "cuda" and not interp:
        raise ValueError(
            f"out_w is on {out_w.device}: the Triton kernels need CUDA tensors "
            "(use linear_sq_grad_sum_torch_ on the CPU)")
    N, T, n_out = G.shape
    n_in = X.shape[-1]
    if N == 0 or T == 0 or n_out == 0:
        return

    if n_in > 0:
        block_o = _block(n_out, 16, 64)
        block_i = _block(n_in, 16, 64)
        grid = (triton.cdiv(n_out, block_o), triton.cdiv(n_in, block_i))
        if T == 1:
            _sq_grad_t1_kernel[grid](
                out_w, G, X,
                N, n_out, n_in,
                G.stride(0), G.stride(2),
                X.stride(0), X.stride(2),
                out_w.stride(0), out_w.stride(1),
                float(scale),
                BLOCK_O=block_o, BLOCK_I=block_i, BLOCK_N=_block(N, 16, 32),
                num_warps=4,
            )
        else:
            _sq_grad_seq_kernel[grid](
                out_w, G, X,
                N, T, n_out, n_in,
                G.stride(0), G.stride(1), G.stride(2),
                X.stride(0), X.stride(1), X.stride(2),
                out_w.stride(0), out_w.stride(1),
                float(scale),
                BLOCK_O=block_o, BLOCK_I=block_i, BLOCK_T=_block(T, 16, 32),
                CAST_F32=interp,
                num_warps=4,
            )

    if out_b is not None:
        block_o = _block(n_out, 16, 128)
        _sq_bias_kernel[(triton.cdiv(n_out, block_o),)](
            out_b, G,
            N, T, n_out,
            G.stride(0), G.stride(1), G.stride(2),
            out_b.stride(0),
            float(scale),
            BLOCK_O=block_o, BLOCK_T=_block(T, 1, 16),
            num_warps=4,
        )


def linear_sq_grad_sum_torch_(
    out_w: torch.Tensor,
    grad_out: torch.Tensor,
    inputs: torch.Tensor,
    out_b: torch.Tensor | None = None,
    scale: float = 1.0,
) -> None:
    """Pure-torch version of :func:`linear_sq_grad_sum_` (same arguments, same result).

    Works on any device. For T == 1 it is the single matmul ``(G**2)^T (X**2)``;
    otherwise it forms per-sample gradients with ``torch.bmm`` over chunks of samples,
    sized so at most ~64 MiB of fp32 per-sample gradients exist at once (but always
    at least one sample per chunk). All arithmetic is in fp32.
    """
    G, X = _validate(out_w, grad_out, inputs, out_b)
    with torch.no_grad():
        _torch_accumulate(out_w, G, X, out_b, float(scale))


def _torch_accumulate(out_w, G, X, out_b, scale=1.0):
    N, T, n_out = G.shape
    n_in = X.shape[-1]
    if N == 0 or T == 0 or n_out == 0:
        return

    if n_in > 0:
        if T == 1:
            g2 = G[:, 0, :].float().square()
            x2 = X[:, 0, :].float().square()
            out_w.addmm_(g2.t(), x2, alpha=scale)
        else:
            chunk = max(1, _TORCH_CHUNK_BYTES // (4 * n_out * n_in))
            for s in range(0, N, chunk):
                g = G[s:s + chunk].float()
                x = X[s:s + chunk].float()
                per_sample = torch.bmm(g.transpose(1, 2), x)  # (chunk, out, in)
                out_w.add_(per_sample.square_().sum(0), alpha=scale)
                del per_sample

    if out_b is not None:
        chunk = max(1, _TORCH_CHUNK_BYTES // (4 * T * n_out))
        for s in range(0, N, chunk):
            out_b.add_(G[s:s + chunk].float().sum(1).square_().sum(0), alpha=scale)
