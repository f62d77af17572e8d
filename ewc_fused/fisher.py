"""Diagonal Fisher information from per-sample squared gradients, without per-sample gradients.

Math. For samples n = 1..N with per-sample losses ℓ_n(θ), the diagonal Fisher is

    F = (1/N) Σ_n (∇_θ ℓ_n)²                       mode="empirical" (ℓ at the true target)
    F = (1/N) Σ_n Σ_c p_nc (∇_θ ℓ_n(c))²           mode="exact", p_n = softmax(model(x_n))
    F = (1/N) Σ_n (∇_θ ℓ_n(ŷ_n))², ŷ_n ~ p_n        mode="sampled" (one-sample estimate of "exact")
    F = (1/B) Σ_b (∇_θ mean_{n∈b} ℓ_n)²            mode="batch" (squared mini-batch gradients)

the same quantities as :func:`ewc_fused.reference.per_sample_fisher`, returned in fp32.
Mode "batch" is about batch-size times smaller than the others (see the README); it is
plain autograd and needs none of what follows.

Mechanism. Forward hooks on every module that owns trainable parameters save its
input X (detached) and pass its output on as Y + z, z a −0.0 scalar leaf. The *sum* of
the per-sample losses is differentiated with ``torch.autograd.grad`` w.r.t. the z's only,
so no weight gradient is ever formed, and a hook on Y + z hands each output gradient G to
its module's rule as the backward pass reaches it (then it is freed; a module called more
than once keeps its calls' G until the pass ends; an output still held by something else
after the forward is differentiated directly). z is −0.0, so Y + z is Y bit for bit, and
the hook runs before the module's other forward hooks, so they see Y + z too. Because
sample n's loss depends only on sample n's outputs, row n of G = ∂(Σ_n ℓ_n)/∂Y is sample
n's own output gradient. Per module type:

* ``nn.Linear`` (X: (N, *, in), G: (N, *, out), flattened to (N, T, ·)):
  S_W += Σ_n (G_nᵀ X_n)², S_b += Σ_n (Σ_t G_nt)², by ``ewc_fused.kernels.fisher_linear``
  (Triton kernels on CUDA, a bounded-memory torch version elsewhere).
* ``nn.Embedding``: sample n's gradient of row r is Σ_{t: idx_nt = r} G_nt (none for
  ``padding_idx``); formed sparsely per chunk of samples, squared and scattered.
* ``nn.LayerNorm`` / ``nn.RMSNorm``: x̂ is recomputed from X; weight Σ_t G_nt ⊙ x̂_nt,
  bias Σ_t G_nt, squared and summed over n.
* any other module with parameters of its own: per-sample gradients of ⟨module(x_n), G_n⟩
  w.r.t. its own parameters by ``torch.func`` (``vmap(grad(functional_call))``) over
  bounded chunks of samples.

A module called several times in one forward is handled by concatenating its calls
along T (a per-sample gradient is the sum over calls). In mode "exact" one
backward per class c differentiates Σ_n √p_nc ℓ_n(c), so G_n is scaled by √p_nc and
every rule above squares it into p_nc (∇ℓ_n(c))².

Assumptions: every module takes the sample dimension first, and ``loss_fn`` returns
losses in which sample n depends only on sample n (no batch statistics: BatchNorm
using batch statistics is refused; put the model in ``eval()``). The model is used in
the mode it is in (dropout in training mode makes the estimate random).
"""
from __future__ import annotations

import contextlib
import math
import threading
import weakref
from collections.abc import Iterable
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from . import distributed as _dist
from .functional import resolve_backend

__all__ = ["estimate_fisher", "MODES"]

MODES = ("empirical", "exact", "sampled", "batch")
GRANULARITIES = ("sample", "token")
# Elements of per-sample temporaries (per-sample gradients, x̂, ...) alive at once.
_CHUNK_ELEMS = 1 << 24

_RMSNorm = getattr(nn, "RMSNorm", None)
# Depth of estimate_fisher calls on this thread: training-time trackers (ewc_fused.tracker)
# ignore the forwards made meanwhile on the same thread.
_LOCAL = threading.local()


def _estimating() -> bool:
    return getattr(_LOCAL, "depth", 0) > 0


# --------------------------------------------------------------------------- helpers
def _module_desc(path: str, module: nn.Module) -> str:
    return f"'{path or '<root>'}' ({type(module).__name__})"


def _first_tensor(x: Any) -> Optional[Tensor]:
    for leaf in tree_flatten(x)[0]:
        if isinstance(leaf, Tensor):
            return leaf
    return None


def _batch_size(inputs: Any, batch_index: int) -> int:
    t = _first_tensor(inputs)
    if t is None or t.dim() == 0:
        raise ValueError(
            f"batch {batch_index}: inputs must be a tensor with a leading sample dimension "
            f"(or a tuple/dict holding one); got {type(inputs).__name__}")
    return int(t.shape[0])


def _slice_samples(x: Any, n_all: int, k: int) -> Any:
    """Keep the first k samples of every tensor whose leading dim is the batch size."""
    return tree_map(lambda t: t[:k] if isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == n_all else t, x)


def _call(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, tuple):
        return model(*inputs)
    if isinstance(inputs, dict):
        return model(**inputs)
    return model(inputs)


def _linear_torch_fallback(out_w: Tensor, G: Tensor, X: Tensor, out_b: Optional[Tensor], scale: float = 1.0) -> None:
    """``linear_sq_grad_sum_torch_`` for installs without triton (same math, fp32)."""
    n_out, n_in = out_w.shape
    chunk = max(1, _CHUNK_ELEMS // max(1, n_out * n_in))
    for s in range(0, G.shape[0], chunk):
        g, x = G[s:s + chunk].float(), X[s:s + chunk].float()
        out_w.add_(torch.bmm(g.transpose(1, 2), x).square_().sum(0), alpha=scale)
        if out_b is not None:
            out_b.add_(g.sum(1).square_().sum(0), alpha=scale)


def _linear_launcher(backend: str) -> Callable:
    if backend == "triton":
        from .kernels.fisher_linear import linear_sq_grad_sum_
        return linear_sq_grad_sum_
    try:
        from .kernels.fisher_linear import linear_sq_grad_sum_torch_
    except ImportError:  # triton not installed: the kernels module imports it
        return _linear_torch_fallback
    return linear_sq_grad_sum_torch_


# --------------------------------------------------------------------------- rules
class _Hooked:
    """One module whose parameters get a Fisher, with its saved calls of this batch."""

    def __init__(self, path: str, module: nn.Module, params: dict[str, nn.Parameter], kind: str):
        self.path, self.module, self.params, self.kind = path, module, params, kind
        self.calls: list[tuple[Any, Any, Any]] = []  # (args, kwargs, output) per call
        self.versions: list[list[int]] = []
        # per call: leaf index -> (the −0.0 scalar added to that output, a weak reference to the output)
        self.taps: list[dict[int, tuple[Tensor, Any]]] = []

    @property
    def desc(self) -> str:
        return _module_desc(self.path, self.module)

    def check_rows(self, t: Tensor, n: int, what: str, min_dim: int = 1) -> None:
        if t.dim() < min_dim or t.shape[0] != n:
            raise ValueError(
                f"module {self.desc}: its {what} has shape {tuple(t.shape)} but the batch has {n} "
                "samples; per-sample Fisher needs every module to take the sample dimension first")


def _flat3(t: Tensor, n: int, feat: int) -> Tensor:
    return t.reshape(n, -1, feat)


def _rule_linear(h: _Hooked, calls, n: int, bufs: dict[str, Tensor], backend: str, scale: float = 1.0) -> None:
    m: nn.Linear = h.module
    xs, gs = [], []
    for args, _, g in calls:
        x = args[0]
        h.check_rows(x, n, "input", 2)
        h.check_rows(g, n, "output", 2)
        xs.append(_flat3(x, n, m.in_features))
        gs.append(_flat3(g, n, m.out_features))
    X = xs[0] if len(xs) == 1 else torch.cat(xs, 1)
    G = gs[0] if len(gs) == 1 else torch.cat(gs, 1)
    if X.dtype != G.dtype or X.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        X, G = X.float(), G.float()
    w, b = bufs.get("weight"), bufs.get("bias")
    if w is not None:
        be = resolve_backend(backend, X.device)
        _linear_launcher(be)(w, G, X, b, scale)
    elif b is not None:
        b.add_(G.float().sum(1).square().sum(0), alpha=scale)


def _rule_embedding(h: _Hooked, calls, n: int, bufs: dict[str, Tensor], backend: str, scale: float = 1.0) -> None:
    m: nn.Embedding = h.module
    if m.scale_grad_by_freq:
        raise ValueError(
            f"module {h.desc}: scale_grad_by_freq=True scales gradients by batch-wide counts, "
            "so per-sample gradients are undefined")
    w = bufs.get("weight")
    if w is None:
        return
    idxs, gs = [], []
    for args, _, g in calls:
        idx = args[0]
        h.check_rows(idx, n, "input")
        h.check_rows(g, n, "output", 2)
        idxs.append(idx.reshape(n, -1))
        gs.append(_flat3(g, n, m.embedding_dim))
    idx = idxs[0] if len(idxs) == 1 else torch.cat(idxs, 1)
    G = gs[0] if len(gs) == 1 else torch.cat(gs, 1)
    V, D, T = m.num_embeddings, m.embedding_dim, idx.shape[1]
    acc_dtype = torch.promote_types(G.dtype, torch.float32)
    chunk = max(1, _CHUNK_ELEMS // max(1, T * D))
    for s in range(0, n, chunk):
        i = idx[s:s + chunk]
        c = i.shape[0]
        local = torch.arange(c, device=i.device, dtype=torch.int64).unsqueeze(1)
        key = (local * V + i.long()).reshape(-1)
        g = G[s:s + chunk].reshape(-1, D)
        if m.padding_idx is not None:
            keep = (i != m.padding_idx).reshape(-1)
            key, g = key[keep], g[keep]
        uniq, inv = torch.unique(key, return_inverse=True)
        per = torch.zeros(uniq.numel(), D, dtype=acc_dtype, device=g.device).index_add_(0, inv, g.to(acc_dtype))
        w.index_add_(0, uniq % V, per.square_().float(), alpha=scale)


def _rule_norm(h: _Hooked, calls, n: int, bufs: dict[str, Tensor], backend: str, scale: float = 1.0) -> None:
    m = h.module
    shape = tuple(m.normalized_shape)
    D = math.prod(shape)
    is_ln = isinstance(m, nn.LayerNorm)
    w, b = bufs.get("weight"), bufs.get("bias")
    for args, _, g in calls:
        h.check_rows(args[0], n, "input", 1 + len(shape))
        h.check_rows(g, n, "output", 1 + len(shape))
    x0 = calls[0][0][0]
    ct = torch.promote_types(x0.dtype, torch.float32)
    eps = m.eps if m.eps is not None else torch.finfo(x0.dtype).eps
    per_sample = sum(a[0].numel() for a, _, _ in calls) // max(1, n)
    chunk = max(1, _CHUNK_ELEMS // max(1, per_sample))
    for s in range(0, n, chunk):
        gw = gb = None  # per-sample gradients of this chunk, summed over calls
        for args, _, g in calls:
            xf = args[0][s:s + chunk]
            xf = _flat3(xf, xf.shape[0], D).to(ct)
            gf = _flat3(g[s:s + chunk], xf.shape[0], D).to(ct)
            if w is not None:
                if is_ln:
                    xc = xf - xf.mean(-1, keepdim=True)
                    xhat = xc * torch.rsqrt(xc.square().mean(-1, keepdim=True) + eps)
                else:
                    xhat = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
                t = (gf * xhat).sum(1)
                gw = t if gw is None else gw + t
            if b is not None:
                t = gf.sum(1)
                gb = t if gb is None else gb + t
        if w is not None:
            w.add_(gw.square().sum(0).reshape(shape).float(), alpha=scale)
        if b is not None:
            b.add_(gb.square().sum(0).reshape(shape).float(), alpha=scale)


def _rule_generic(h: _Hooked, calls, n: int, bufs: dict[str, Tensor], backend: str, scale: float = 1.0) -> None:
    from torch.func import functional_call, grad, vmap

    names = list(bufs)
    params = {k: h.params[k].detach() for k in names}
    numel = sum(p.numel() for p in params.values())
    chunk = max(1, _CHUNK_ELEMS // max(1, numel))

    try:
        for s in range(0, n, chunk):
            total: Optional[dict[str, Tensor]] = None
            for args, kwargs, g in calls:
                leaves, spec = tree_flatten((args, kwargs))
                batched = [i for i, t in enumerate(leaves)
                           if isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == n]
                if not batched:
                    raise ValueError("none of its inputs has the batch's sample dimension first")

                def inner(p, xb, gb, leaves=leaves, spec=spec, batched=batched):
                    full = list(leaves)
                    for j, i in enumerate(batched):
                        full[i] = xb[j]
                    a, kw = tree_unflatten(full, spec)
                    out = functional_call(h.module, p, tuple(a), kw)
                    out_leaves = [o for o in tree_flatten(out)[0] if isinstance(o, Tensor)]
                    if len(out_leaves) != len(gb):
                        raise ValueError("its output structure changed between calls")
                    return sum((o * gg).sum() for o, gg in zip(out_leaves, gb))

                # every sample as a batch of one: (chunk, 1, ...)
                xb = [leaves[i][s:s + chunk].unsqueeze(1) for i in batched]
                gb = [t[s:s + chunk].unsqueeze(1) for t in g]
                per = vmap(grad(inner), in_dims=(None, 0, 0))(params, xb, gb)
                total = per if total is None else {k: total[k] + per[k] for k in names}
            for k in names:
                bufs[k].add_(total[k].float().square().sum(0), alpha=scale)
    except Exception as e:  # noqa: BLE001 - re-raised with the module named
        raise ValueError(
            f"cannot compute per-sample gradients of module {h.desc} with the generic torch.func "
            f"path (vmap(grad(functional_call)) over single samples): {type(e).__name__}: {e}") from e


def _kind(module: nn.Module) -> str:
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, nn.LayerNorm) or (_RMSNorm is not None and isinstance(module, _RMSNorm)):
        return "norm"
    return "generic"


_RULES = {"linear": _rule_linear, "embedding": _rule_embedding, "norm": _rule_norm, "generic": _rule_generic}


def _collect(model: nn.Module, per_sample: bool) -> tuple[list[_Hooked], dict[int, str]]:
    """Modules owning trainable parameters; refuses shared parameters and batch-statistics BatchNorm."""
    names = {id(p): name for name, p in model.named_parameters() if p.requires_grad}
    if not names:
        raise ValueError("the model has no trainable parameters (none with requires_grad=True)")
    if not per_sample:
        return [], names
    owner: dict[int, str] = {}
    hooked = []
    for path, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and (
                module.training or module.running_mean is None):
            raise ValueError(
                f"module {_module_desc(path, module)} normalises with batch statistics "
                "(training mode or track_running_stats=False), so per-sample gradients are "
                "undefined; call model.eval() first")
        own = {k: p for k, p in module.named_parameters(recurse=False) if p.requires_grad}
        for k, p in own.items():
            here = f"{path}.{k}" if path else k
            if id(p) in owner:
                raise ValueError(
                    f"parameter '{names[id(p)]}' is shared by modules '{owner[id(p)] or '<root>'}' "
                    f"and '{path or '<root>'}' ({here}); shared parameters are not supported")
            owner[id(p)] = path
        if own:
            if _kind(module) == "generic" and any(_dist.is_dtensor(p) for p in own.values()):
                raise ValueError(
                    f"module {_module_desc(path, module)} has FSDP2-sharded (DTensor) parameters and no built-in "
                    "per-sample rule (Linear, Embedding, LayerNorm, RMSNorm); the generic torch.func path would run "
                    "FSDP's hooks per sample. Freeze its parameters, or use fisher_ema without track_fisher")
            hooked.append(_Hooked(path, module, own, _kind(module)))
    return hooked, names


# --------------------------------------------------------------------------- public
def estimate_fisher(
    model: nn.Module,
    data: Iterable,
    loss_fn: Callable[[Any, Any], Tensor],
    *,
    mode: str = "empirical",
    n_samples: int = 1,
    max_samples: Optional[int] = None,
    granularity: str = "sample",
    ignore_index: int = -100,
    backend: str = "auto",
    progress: bool = True,
    process_group: Any = None,
) -> dict[str, Tensor]:
    """Diagonal Fisher (mean over samples of squared per-sample gradients), fp32.

    Args:
        model: the network, used in its current train/eval mode (restored afterwards,
            as are existing ``.grad`` fields).
        data: yields ``(inputs, targets)``; inputs a tensor, a tuple (``model(*x)``) or
            a dict (``model(**x)``), with the sample dimension first.
        loss_fn: ``loss_fn(outputs, targets)`` -> per-sample losses of shape (N,)
            (a sequence model sums its tokens), or per-token losses (N, T) with
            ``granularity="token"``.
        mode: ``"empirical"`` (true targets), ``"exact"`` (Σ_c p_c ∇ℓ(x, c)², with p
            the softmax of the outputs over their last dim), ``"sampled"`` (labels drawn
            from p, from torch's global RNG) or ``"batch"`` (squared gradients of the
            batch-mean loss, averaged over batches).
        n_samples: labels drawn per sample (per token) in mode ``"sampled"``; the
            squared gradients are averaged over the draws.
        max_samples: stop after this many samples (the last batch is cut).
        granularity: ``"sample"``, or ``"token"``: every token whose target is not
            ``ignore_index`` is a sample, F = (1/#tokens) Σ_{n,t} (∇ℓ_nt)². Needs
            (N, T) targets and per-token losses; exact per-token gradients for any
            model, at one backward pass per position (× classes in mode "exact").
        ignore_index: the padding target of ``granularity="token"`` (and of drawn
            labels in mode "sampled" with (N, T, C) outputs).
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` for the Linear kernels.
        progress: show a tqdm bar over batches when tqdm imports.
        process_group: data-parallel group whose ranks each pass their own samples: the
            result is then the Fisher over all ranks' samples (sums and counts are
            all-reduced; every rank must call this). ``None``: the DDP group for a
            ``DistributedDataParallel`` model (called through ``.module``), the mesh of
            FSDP2 (DTensor) parameters on one 1-D mesh, else no reduction. Under FSDP2
            every rank must yield the same number of batches (each forward all-gathers).

    Returns:
        {parameter name: fp32 Fisher of the parameter's shape} for every parameter
        with ``requires_grad``.
    """
    if mode not in MODES:
        raise ValueError(f"Invalid mode: {mode!r}; supported modes are {MODES}")
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"Invalid backend: {backend!r}; expected one of ('auto', 'triton', 'torch')")
    if granularity not in GRANULARITIES:
        raise ValueError(f"Invalid granularity: {granularity!r}; expected one of {GRANULARITIES}")
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples must be a positive int, got {n_samples!r}")
    if n_samples != 1 and mode != "sampled":
        raise ValueError(f"n_samples={n_samples} only applies to mode='sampled' (got mode={mode!r})")
    if max_samples is not None and (isinstance(max_samples, bool) or not isinstance(max_samples, int)
                                    or max_samples < 1):
        raise ValueError(f"max_samples must be a positive int or None, got {max_samples!r}")
    if not callable(loss_fn):
        raise ValueError(f"loss_fn must be callable, got {type(loss_fn).__name__}")

    runner, group = _dist.fisher_group(model, process_group)
    if mode == "batch" and any(_dist.is_dtensor(p) for p in model.parameters() if p.requires_grad):
        raise ValueError(
            "mode='batch' cannot see the gradients of FSDP2-sharded (DTensor) parameters (FSDP differentiates "
            "unsharded copies); use a per-sample mode, or fisher_ema=β in the optimizer for squared batch gradients")
    hooked, names = _collect(model, per_sample=mode != "batch")
    params = [p for p in model.parameters() if p.requires_grad]
    batch_acc = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in params] if mode == "batch" else []
    bufs: dict[str, dict[str, Tensor]] = {
        h.path: {k: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for k, p in h.params.items()}
        for h in hooked}

    modes = {m: m.training for m in model.modules()}
    grads = [p.grad for p in params]
    state: dict[str, Any] = {"active": False, "clone": False, "n": 0, "scale": 1.0, "backend": backend,
                             "bufs": bufs, "got": {}}

    def hook(module, args, kwargs, output, h):
        if not state["active"]:
            return None
        output = _tap_outputs(output, h, len(h.calls), state)
        out_leaves = [o for o in tree_flatten(output)[0] if isinstance(o, Tensor)]
        h.versions.append([o._version for o in out_leaves])
        h.calls.append((tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, args),
                        tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, kwargs), output))
        if state["clone"]:  # a later in-place op must not rewrite the tensor we differentiate
            return tree_map(lambda t: t.clone() if isinstance(t, Tensor) else t, output)
        return output

    # prepend: our hook runs before any other forward hook of the module (FSDP2's, the user's), so
    # that they see the tapped outputs of _tap_outputs, as the rest of the model does
    handles = [h.module.register_forward_hook(lambda m, a, k, o, h=h: hook(m, a, k, o, h), with_kwargs=True,
                                              prepend=True)
               for h in hooked]

    it: Iterable = data
    if progress:
        try:
            from tqdm.auto import tqdm
            it = tqdm(data, desc="Fisher", unit="batch")
        except ImportError:
            pass

    count = n_batches = units = 0  # units: samples, or tokens with granularity="token"
    opts = _Opts(mode, n_samples, granularity, ignore_index, backend)
    finite: list[tuple[int, Tensor]] = []
    _LOCAL.depth = getattr(_LOCAL, "depth", 0) + 1
    try:
        for bi, batch in enumerate(it):
            if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                raise ValueError(f"batch {bi}: data must yield (inputs, targets) pairs, got {type(batch).__name__}")
            inputs, targets = batch
            n = _batch_size(inputs, bi)
            if max_samples is not None and count + n > max_samples:
                k = max_samples - count
                inputs, targets = _slice_samples(inputs, n, k), _slice_samples(targets, n, k)
                n = k
            if n == 0:
                continue
            if opts.token:
                _token_mask(targets, n, bi, opts)  # before the model and loss_fn see them
            count += n
            n_batches += 1
            if mode == "batch":
                _one_batch_mean(runner, params, batch_acc, inputs, targets, n, bi, loss_fn, opts, finite)
            else:
                units += _one_batch(runner, hooked, bufs, state, inputs, targets, n, bi, loss_fn, opts, finite)
            if max_samples is not None and count >= max_samples:
                break  # before pulling another batch from `data`
        if count == 0 and group is None:
            raise ValueError("data yielded no samples")
        if granularity == "token" and mode != "batch" and units == 0 and group is None:
            raise ValueError(f"every target equals ignore_index={ignore_index}: no token to estimate from")
        for bi, ok in finite:
            if not bool(ok):
                raise ValueError(f"batch {bi}: loss_fn returned non-finite losses (NaN or inf)")
    except Exception:
        if group is not None:
            _dist.agree_ok(group, False)  # so that the other ranks raise instead of waiting
        raise
    finally:
        _LOCAL.depth -= 1
        if it is not data and hasattr(it, "close"):
            it.close()
        state["active"] = False
        for hd in handles:
            hd.remove()
        for h in hooked:
            h.calls.clear()
            h.versions.clear()
            h.taps.clear()
        for m, t in modes.items():
            m.training = t
        for p, g in zip(params, grads):
            p.grad = g

    if group is not None:  # sums and counts over all ranks' samples
        if not _dist.agree_ok(group, True):
            raise RuntimeError("estimate_fisher failed on another rank (see its error)")
        count, n_batches, units = _dist.all_reduce_counts((count, n_batches, units), group)
        if count == 0:
            raise ValueError("data yielded no samples on any rank")
        if granularity == "token" and mode != "batch" and units == 0:
            raise ValueError(f"every target equals ignore_index={ignore_index} on every rank: no token to estimate from")
        _dist.all_reduce_sum_(batch_acc if mode == "batch" else [b for h in hooked for b in bufs[h.path].values()],
                              group)

    out: dict[str, Tensor] = {}
    if mode == "batch":
        return {names[id(p)]: a.div_(n_batches) for p, a in zip(params, batch_acc)}
    by_id = {id(p): (h.path, k) for h in hooked for k, p in h.params.items()}
    for p in model.parameters():
        if id(p) in names and names[id(p)] not in out:
            path, k = by_id[id(p)]
            out[names[id(p)]] = bufs[path][k].div_(units)
    return out


class _Opts:
    """The per-call options of estimate_fisher that every batch needs."""

    def __init__(self, mode: str, n_samples: int, granularity: str, ignore_index: int, backend: str) -> None:
        self.mode, self.n_samples, self.granularity = mode, n_samples, granularity
        self.ignore_index, self.backend = ignore_index, backend

    @property
    def token(self) -> bool:
        return self.granularity == "token"


def _check_losses(losses: Any, shape: tuple, bi: int, what: str) -> Tensor:
    if not isinstance(losses, Tensor):
        raise ValueError(f"batch {bi}: loss_fn must return a tensor of per-sample losses, got {type(losses).__name__}")
    if tuple(losses.shape) != shape:
        kind = ("one loss per token (reduction='none', not summed)" if len(shape) == 2
                else "one loss per sample (use reduction='none', and sum over tokens yourself)")
        raise ValueError(f"batch {bi}: loss_fn{what} returned shape {tuple(losses.shape)}, expected {shape}: {kind}")
    if not losses.requires_grad:
        raise ValueError(f"batch {bi}: the losses do not depend on the model through autograd")
    return losses


def _token_mask(targets: Any, n: int, bi: int, opts: _Opts) -> Tensor:
    if not isinstance(targets, Tensor) or targets.dim() != 2 or targets.shape[0] != n or targets.is_floating_point():
        got = tuple(targets.shape) if isinstance(targets, Tensor) else type(targets).__name__
        raise ValueError(
            f"batch {bi}: granularity='token' needs integer targets of shape (N, T) with padding marked by "
            f"ignore_index={opts.ignore_index}; got {got}")
    return targets != opts.ignore_index


def _one_batch_mean(model, params, acc, inputs, targets, n, bi, loss_fn, opts, finite) -> None:
    """mode="batch": the squared gradient of the batch-mean loss (no per-sample terms)."""
    with torch.enable_grad():
        if opts.token:
            mask = _token_mask(targets, n, bi, opts)
            losses = _check_losses(loss_fn(_call(model, inputs), targets), tuple(mask.shape), bi, "")
            finite.append((bi, torch.isfinite(losses.detach()[mask]).all()))
            mean = (losses * mask).sum() / mask.sum().clamp_min(1)
        else:
            losses = _check_losses(loss_fn(_call(model, inputs), targets), (n,), bi, "")
            finite.append((bi, torch.isfinite(losses.detach()).all()))
            mean = losses.mean()
        grads = torch.autograd.grad(mean, params, allow_unused=True)
    with torch.no_grad():
        for a, g in zip(acc, grads):
            if g is not None:
                a.add_(g.float().square())


def _class_outputs(outputs: Any, n: int, bi: int, opts: _Opts, targets: Any) -> Tensor:
    """The logits of modes exact/sampled: (N, C), or (N, T, C) with (N, T) targets."""
    ok = isinstance(outputs, Tensor) and outputs.shape[:1] == (n,) and (
        outputs.dim() == 2 or (outputs.dim() == 3 and isinstance(targets, Tensor)
                               and tuple(targets.shape) == tuple(outputs.shape[:2])))
    if not ok:
        shape = tuple(outputs.shape) if isinstance(outputs, Tensor) else type(outputs).__name__
        raise ValueError(
            f"mode={opts.mode!r} needs class logits: model outputs of shape (N, C) = ({n}, C), or (N, T, C) with "
            f"targets of shape (N, T); got {shape}")
    if not isinstance(targets, Tensor):
        raise ValueError(f"batch {bi}: mode={opts.mode!r} needs tensor targets, got {type(targets).__name__}")
    if opts.mode == "exact" and outputs.dim() == 3 and not opts.token:
        raise ValueError(
            "mode='exact' with (N, T, C) outputs needs granularity='token' (each token a sample); "
            "for per-sequence Fisher use mode='sampled' or 'empirical'")
    return outputs


def _weighted_losses(outputs, targets, losses, n, bi, loss_fn, opts, finite) -> tuple[list[tuple[Tensor, float]], int]:
    """The scalars whose output gradients, squared per sample, add up to the Fisher sum:
    [(Σ_n w_n ℓ_n, scale)], and how many units (samples or tokens) the batch holds."""
    mode = opts.mode
    mask = _token_mask(targets, n, bi, opts) if opts.token else None
    shape = tuple(mask.shape) if opts.token else (n,)
    _check_losses(losses, shape, bi, "")
    finite.append((bi, torch.isfinite(losses.detach()[mask] if opts.token else losses.detach()).all()))
    units = int(mask.sum()) if opts.token else n

    def per_unit(total_losses: Tensor, weight: Optional[Tensor] = None) -> list[Tensor]:
        """One scalar per sample group: Σ_n (w·ℓ)_n, or one per position with token granularity."""
        wl = total_losses if weight is None else total_losses * weight
        if not opts.token:
            return [wl.sum()]
        wl = wl * mask
        return [wl[:, t].sum() for t in range(wl.shape[1]) if bool(mask[:, t].any())]

    if mode == "empirical":
        return [(x, 1.0) for x in per_unit(losses)], units
    logits = _class_outputs(outputs, n, bi, opts, targets)
    probs = torch.softmax(logits.detach().to(torch.promote_types(logits.dtype, torch.float32)), -1)
    out: list[tuple[Tensor, float]] = []
    if mode == "sampled":  # labels drawn from the model: an unbiased estimate of "exact"
        if not bool(torch.isfinite(probs).all()):
            raise ValueError(f"batch {bi}: the model's outputs are non-finite (NaN or inf); cannot sample labels")
        flat = probs.reshape(-1, probs.shape[-1])
        for _ in range(opts.n_samples):
            ys = torch.multinomial(flat, 1).squeeze(1).to(targets.dtype).reshape(targets.shape)
            if logits.dim() == 3:
                ys = torch.where(targets == opts.ignore_index, targets, ys)
            ls = _check_losses(loss_fn(outputs, ys), shape, bi, " (sampled labels)")
            out += [(x, 1.0 / opts.n_samples) for x in per_unit(ls)]
    else:  # exact: Σ_c p_c (∇ℓ(c))², each class's loss weighted by √p_c before squaring
        for c in range(logits.shape[-1]):
            yc = torch.full_like(targets, c)
            if logits.dim() == 3:
                yc = torch.where(targets == opts.ignore_index, targets, yc)
            lc = _check_losses(loss_fn(outputs, yc), shape, bi, f" (class {c})")
            out += [(x, 1.0) for x in per_unit(lc, probs[..., c].sqrt().to(lc.dtype))]
    return out, units


def _streams(h: _Hooked) -> bool:
    """Whether ``h``'s output gradient goes to its rule inside the backward pass: one call with one
    tensor output, and a rule without autograd of its own (the generic rule runs torch.func)."""
    return h.kind != "generic" and len(h.calls) == 1 and isinstance(h.calls[0][2], Tensor)


def _tap_outputs(output: Any, h: _Hooked, ci: int, state: dict[str, Any]) -> Any:
    """``output`` with every leaf that needs a gradient replaced by ``leaf + z`` (z a −0.0 scalar
    leaf: x + (−0.0) is x bit for bit, signed zeros, NaN and inf included) and a hook on the new
    tensor that receives its gradient G.

    The backward pass then differentiates the z's (scalar gradients) rather than the outputs, so
    the output gradients are not all returned, and held, together at its end: a one-call module's G
    goes to its rule as soon as it is computed and is freed; the others' are kept in
    ``state["got"]`` until the pass ends, as before. Leaves that cannot take a scalar summand
    (DTensors) are differentiated directly, and so is any leaf that something else still holds
    after the forward (a module caching its own output): gradient could reach it around the tap."""
    leaves, spec = tree_flatten(output)
    taps: dict[int, tuple[Tensor, Any]] = {}
    for li, o in enumerate(leaves):
        if not (isinstance(o, Tensor) and o.requires_grad and o.is_floating_point()) or _dist.is_dtensor(o):
            continue
        z = torch.full((), -0.0, dtype=o.dtype, device=o.device, requires_grad=True)
        leaves[li] = o + z

        def on_grad(g: Tensor, li: int = li) -> None:
            if li not in h.taps[ci]:  # differentiated directly instead (see _one_batch)
                return
            if _streams(h) and li == 0:
                with torch.no_grad():
                    _RULES[h.kind](h, [(h.calls[0][0], h.calls[0][1], g)], state["n"], state["bufs"][h.path],
                                   state["backend"], state["scale"])
            else:
                state["got"].setdefault(id(h), {}).setdefault(ci, {})[li] = g

        leaves[li].register_hook(on_grad)
        taps[li] = (z, weakref.ref(o))
    h.taps.append(taps)
    return tree_unflatten(leaves, spec) if taps else output


def _one_batch(model, hooked, bufs, state, inputs, targets, n, bi, loss_fn, opts, finite) -> int:
    with torch.enable_grad():
        for _attempt in range(2):
            for h in hooked:
                h.calls.clear()
                h.versions.clear()
                h.taps.clear()
            state["active"] = True
            try:
                outputs = _call(model, inputs)
            finally:
                state["active"] = False
            losses = loss_fn(outputs, targets)
            rewritten = any(
                o._version != v
                for h in hooked for (_, _, out), vs in zip(h.calls, h.versions)
                for o, v in zip([o for o in tree_flatten(out)[0] if isinstance(o, Tensor)], vs))
            if not rewritten:
                break
            if state["clone"]:  # pragma: no cover - cloned outputs are never modified
                raise RuntimeError("module outputs modified in place even after cloning")
            state["clone"] = True  # e.g. ReLU(inplace=True): redo this batch with cloned outputs
        weighted, units = _weighted_losses(outputs, targets, losses, n, bi, loss_fn, opts, finite)

        # the tensors to differentiate: every saved output leaf that is in the graph, through its zero
        # scalar where it has one (its gradient then reaches on_grad in _tap_outputs, not the result);
        # an untapped output that is still alive (held by something else) is differentiated directly
        slots = []  # (hooked, call index, leaf index)
        targets_t = []
        for h in hooked:
            for ci, (_, _, out) in enumerate(h.calls):
                taps = h.taps[ci]
                for li, o in enumerate(tree_flatten(out)[0]):
                    if isinstance(o, Tensor) and o.requires_grad:
                        if li in taps:
                            z, raw = taps[li][0], taps[li][1]()
                            if raw is None:
                                o = z
                            else:  # held elsewhere: its gradient may arrive around the tap
                                del taps[li]
                                o = raw
                            del z, raw
                        slots.append((h, ci, li))
                        targets_t.append(o)
        if not targets_t:
            return units

        state["n"] = n
        for wi, (total, scale) in enumerate(weighted):
            state["scale"], state["got"] = scale, {}
            try:
                gs = torch.autograd.grad(total, targets_t, retain_graph=wi + 1 < len(weighted), allow_unused=True)
            finally:
                per_h: dict[int, dict[int, dict[int, Tensor]]] = state["got"]
                state["got"] = {}
            for (h, ci, li), g in zip(slots, gs):
                if li not in h.taps[ci]:  # differentiated directly
                    per_h.setdefault(id(h), {}).setdefault(ci, {})[li] = g
            del gs
            for h in hooked:
                got = per_h.get(id(h))
                if not got:
                    continue
                calls = []
                for ci, (args, kwargs, out) in enumerate(h.calls):
                    leaves, spec = tree_flatten(out)
                    g_leaves = [got.get(ci, {}).get(li) for li in range(len(leaves))]
                    if all(g is None for g in g_leaves):
                        continue
                    if h.kind != "generic":
                        if not isinstance(out, Tensor):
                            raise ValueError(f"module {h.desc} returned {type(out).__name__}, expected a tensor")
                        calls.append((args, kwargs, g_leaves[0]))
                    else:
                        g_leaves = [g if g is not None or not isinstance(o, Tensor) else torch.zeros_like(o)
                                    for g, o in zip(g_leaves, leaves)]
                        calls.append((args, kwargs, [g for g, o in zip(g_leaves, leaves) if isinstance(o, Tensor)]))
                if calls:
                    with torch.no_grad() if h.kind != "generic" else contextlib.nullcontext():
                        _RULES[h.kind](h, calls, n, bufs[h.path], opts.backend, scale)
    return units

