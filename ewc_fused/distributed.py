"""Distributed training: DDP and FSDP2 (DTensor parameters).

**DDP.** Gradients arrive averaged, so the step and the running Fisher (g² of the
averaged gradient) need nothing: every rank computes the same numbers. A Fisher
estimated from each rank's *own* samples is a local mean and must be combined
exactly, ``F = Σ_r n_r F_r / Σ_r n_r``: :func:`all_reduce_fisher` does that, and
:func:`ewc_fused.estimate_fisher` does it itself for a DDP-wrapped model (or with
``process_group=``). ``track_fisher`` sums its per-sample Σ_n (∇ℓ_n)² and N over the
ranks at every step (:func:`all_reduce_tracked_`); :func:`all_reduce_sum_` sums any
other per-rank sums.

**FSDP2** (``fully_shard``; parameters are DTensors). The step runs on each rank's
local shards (:func:`local`), and the EWC state (F, c, the running Fisher) is a
DTensor with the parameter's mesh and placements, so
``torch.distributed.checkpoint`` saves and reshards it like Adam's moments. The
per-parameter constant K of the exact multi-task penalty is a global (replicated)
float64 scalar. ``consolidate`` and ``ewc_penalty`` are collectives over the
parameters' meshes when there are DTensor parameters: every rank must call them.

Supported placements: ``Shard(d)``, ``_StridedShard`` and ``Replicate``, on any
mesh; ``Partial`` parameters are refused (their local values are not the weights).
All elementwise work is local, which is exact as long as θ, its gradient and its
state share mesh, placements and global shape; anything else is an error naming
the parameter, never a silent fallback.
"""
from __future__ import annotations

import math
import sys
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Optional, TypeVar

import torch
from torch import Tensor

__all__ = ["all_reduce_fisher", "all_reduce_sum_", "init_ewc_state", "is_dtensor", "local"]

K = TypeVar("K", bound=Hashable)
# Elements per float64 all-reduce buffer (bounds the temporary copy of the Fisher).
_REDUCE_NUMEL = 1 << 22
# Parameter tensors of the per-parameter state, which must follow the parameter's placement.
PARAM_SHAPED_STATE = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "ewc_fisher", "ewc_anchor", "fisher_ema")


# --------------------------------------------------------------------------- DTensor basics
def _dtensor_cls():
    # A DTensor can only exist once torch.distributed.tensor was imported: no import cost here.
    mod = sys.modules.get("torch.distributed.tensor")
    return getattr(mod, "DTensor", None)


def is_dtensor(t: object) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (FSDP2/TP parameters and their state)."""
    cls = _dtensor_cls()
    return cls is not None and isinstance(t, cls)


def local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (a view: in-place updates reach the DTensor), else ``t``."""
    if is_dtensor(t):
        return t._local_tensor  # what to_local() returns under no_grad, without the autograd wrapper
    return t


def local_list(ts: Optional[Sequence[Tensor]]) -> Optional[list[Tensor]]:
    """:func:`local` of every element (None stays None)."""
    if ts is None:
        return None
    return [local(t) for t in ts]


def _shard_dims(p: Tensor) -> list[int]:
    """Mesh dimensions over which ``p`` is split (its other dims replicate it)."""
    from torch.distributed.tensor import Replicate

    return [i for i, pl in enumerate(p.placements) if not isinstance(pl, Replicate)]


def check_placements(p: Tensor, label: str) -> None:
    """Raise unless every placement of DTensor ``p`` splits or replicates it."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    for i, pl in enumerate(p.placements):
        if not isinstance(pl, (Shard, _StridedShard, Replicate)):
            raise ValueError(
                f"parameter {label} is a DTensor with placement {pl} on mesh dim {i}; FusedEWCAdam "
                "supports Shard, _StridedShard and Replicate placements only (a Partial tensor's local "
                "values are not the parameter's values)"
            )


def _same_spec(p: Tensor, t: Tensor) -> bool:
    return (is_dtensor(t) and t.shape == p.shape
            and (t.device_mesh is p.device_mesh or t.device_mesh == p.device_mesh)
            and tuple(t.placements) == tuple(p.placements))


def _spec_str(t: Tensor) -> str:
    if not is_dtensor(t):
        return f"a plain tensor of shape {tuple(t.shape)}"
    return f"a DTensor of shape {tuple(t.shape)} with placements {tuple(t.placements)} on {t.device_mesh}"


def check_like(p: Tensor, t: Tensor, what: str, label: str) -> None:
    """Raise unless ``t`` (the gradient or state ``what`` of DTensor ``p``) has p's mesh, placements and shape."""
    if not _same_spec(p, t):
        raise ValueError(
            f"{what} of parameter {label} is {_spec_str(t)}, but the parameter is {_spec_str(p)}; "
            "the step works on local shards, so they must be placed alike"
        )


def check_step(p: Tensor, state: Mapping[str, Any], label: Callable[[], str]) -> None:
    """Validate a DTensor parameter's gradient and state before a step (``label()`` names it)."""
    if not all(isinstance(pl, _supported()) for pl in p.placements):
        check_placements(p, label())
    if not _same_spec(p, p.grad):
        check_like(p, p.grad, "the gradient", label())
    for k in PARAM_SHAPED_STATE:
        t = state.get(k)
        if t is not None and not _same_spec(p, t):
            check_like(p, t, f"optimizer state {k!r}", label())


@lru_cache(maxsize=None)
def _supported() -> tuple:
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    return (Shard, _StridedShard, Replicate)


def wrap_like(t: Tensor, p: Tensor) -> Tensor:
    """A DTensor with ``p``'s mesh, placements and global shape whose local shard is ``t``."""
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(t, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())


def shard_like(t: Tensor, p: Tensor, what: str) -> Tensor:
    """``t`` placed like DTensor ``p`` (``what`` names ``t`` in errors).

    A DTensor on p's mesh is redistributed to p's placements (a collective); a plain
    tensor of p's global shape is taken as the full value, identical on every rank,
    and each rank keeps its own shard (no communication).
    """
    from torch.distributed.tensor import distribute_tensor

    if tuple(t.shape) != tuple(p.shape):
        local_hint = (" (that is this rank's shard shape: pass the full tensor or a DTensor)"
                      if not is_dtensor(t) and tuple(t.shape) == tuple(local(p).shape) else "")
        raise ValueError(f"{what} has shape {tuple(t.shape)}, expected the parameter's "
                         f"global shape {tuple(p.shape)}{local_hint}")
    if is_dtensor(t):
        if not (t.device_mesh is p.device_mesh or t.device_mesh == p.device_mesh):
            raise ValueError(
                f"{what} lives on {t.device_mesh}, but the parameter on "
                f"{p.device_mesh}; the EWC state cannot follow a tensor to another mesh")
        if tuple(t.placements) != tuple(p.placements):
            t = t.redistribute(p.device_mesh, p.placements)
        return t
    if t.device.type != p.device.type:
        raise ValueError(f"{what} is on {t.device}, but the parameter is on {p.device}")
    return distribute_tensor(t.to(p.device), p.device_mesh, p.placements, src_data_rank=None)


# --------------------------------------------------------------------------- consolidation
@dataclass
class ShardedFisher:
    """A Fisher placed like a DTensor parameter: the local shard, validated collectively later.

    ``digest`` is set when the caller passed a full plain tensor: each rank keeps its
    own shard of *its* tensor, so the tensors must agree across ranks.
    """

    local: Tensor
    digest: Optional[Tensor]
    label: str


def fisher_shard(f: object, p: Tensor, label: str) -> ShardedFisher:
    """Structural checks of a Fisher for DTensor ``p`` and this rank's shard of it.

    Errors raised here depend only on types and shapes, so every rank raises them
    alike; value checks (finite, non-negative) happen in :func:`check_sharded`.
    """
    check_placements(p, label)
    if not isinstance(f, Tensor):
        raise TypeError(f"Fisher for parameter {label} must be a tensor, got {type(f).__name__}")
    if not f.is_floating_point():
        raise TypeError(f"Fisher for parameter {label} must be floating point, got {f.dtype}")
    digest = None
    if not is_dtensor(f) and tuple(f.shape) == tuple(p.shape):
        f64 = f.detach().to(torch.float64)
        digest = torch.stack([f64.sum(), f64.square().sum()]).cpu()
    placed = shard_like(f, p, f"Fisher for parameter {label}")
    return ShardedFisher(local(placed).detach(), digest, label)


def check_sharded(items: Sequence[tuple[Tensor, ShardedFisher]], check: Callable[[Tensor, Tensor, str], None]) -> None:
    """Validate the local shards with ``check`` and agree on the outcome across ranks.

    One all-reduce (max) per mesh dimension of each mesh: every rank raises if any
    rank found a bad shard, or if full Fisher tensors differ between ranks.
    """
    import torch.distributed as dist

    errors: dict[int, str] = {}
    for i, (p, sf) in enumerate(items):
        try:
            check(sf.local, local(p), sf.label)
        except (TypeError, ValueError) as e:
            errors[i] = str(e)
    for mesh, idx in _by_mesh([p for p, _ in items]).items():
        first_bad = next((i for i in idx if i in errors), None)
        # max over ranks of −(index + 1): the first refused parameter on any rank (−inf: none)
        vec = [-(first_bad + 1.0) if first_bad is not None else -math.inf]
        for i in idx:
            d = items[i][1].digest
            if d is not None:  # max of d and of −d: equal on every rank iff max == min
                vec += [float(d[0]), float(d[1]), -float(d[0]), -float(d[1])]
        t = torch.tensor(vec, dtype=torch.float64, device=_comm_device(mesh))
        for dim in range(mesh.ndim):
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=mesh.get_group(dim))
        t = t.cpu().tolist()
        if t[0] != -math.inf:
            if first_bad is not None:
                raise ValueError(errors[first_bad])
            raise ValueError(f"Fisher for parameter {items[int(-t[0]) - 1][1].label} was refused on another rank "
                             "(its shard there has negative or non-finite values; see that rank's error); "
                             "nothing changed")
        j = 1
        for i in idx:
            if items[i][1].digest is not None:
                hi, lo = t[j:j + 2], [-v for v in t[j + 2:j + 4]]
                j += 4
                if hi != lo:
                    raise ValueError(
                        f"Fisher for parameter {items[i][1].label} is a full tensor for a sharded parameter, "
                        "but it differs between ranks; reduce it first (all_reduce_fisher, or "
                        "estimate_fisher with the data-parallel process group) or pass a DTensor")


def _comm_device(mesh: Any) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if mesh.device_type == "cuda" else torch.device(mesh.device_type)


def _by_mesh(ps: Iterable[Tensor]) -> dict[Any, list[int]]:
    out: dict[Any, list[int]] = {}
    for i, p in enumerate(ps):
        out.setdefault(p.device_mesh, []).append(i)
    return out


def owns_replica(p: Tensor) -> bool:
    """True on the rank holding the first shard along every split mesh dim of ``p``
    (so a global scalar added there once is counted once by :func:`sum_over_shards`)."""
    coord = p.device_mesh.get_coordinate()
    return coord is not None and all(coord[d] == 0 for d in _shard_dims(p))


def sum_over_shards(items: Sequence[tuple[Tensor, Tensor]]) -> list[Tensor]:
    """Sum per-rank float64 scalars ``x`` of each (DTensor parameter, x) over the mesh
    dims that split the parameter: one all-reduce per (mesh, split dims) and dim."""
    import torch.distributed as dist

    groups: dict[tuple, list[int]] = {}
    for i, (p, _) in enumerate(items):
        groups.setdefault((p.device_mesh, tuple(_shard_dims(p))), []).append(i)
    out: list[Optional[Tensor]] = [None] * len(items)
    for (mesh, dims), idx in groups.items():
        t = torch.stack([items[i][1].detach().to(torch.float64).reshape(()).cpu() for i in idx])
        t = t.to(_comm_device(mesh))
        for d in dims:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=mesh.get_group(d))
        t = t.cpu()
        for j, i in enumerate(idx):
            out[i] = t[j].clone()
    return out  # type: ignore[return-value]


def init_ewc_state(optimizer: Any) -> None:
    """Give every trainable parameter without EWC state a zero one (F = 0, c = θ, K = 0).

    ``torch.distributed.checkpoint`` loads into the keys the optimizer already has:
    call this on a fresh optimizer before ``get_optimizer_state_dict`` and
    ``dcp.load`` when the checkpoint holds EWC state. A collective under FSDP2.
    """
    zeros = {p: torch.zeros_like(p) for g in optimizer.param_groups for p in g["params"]
             if p.requires_grad and "ewc_fisher" not in optimizer.state.get(p, {})}
    if zeros:
        optimizer.consolidate(zeros)


# --------------------------------------------------------------------------- reductions
def _default_group(group: Any) -> Any:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("torch.distributed is not initialised: call init_process_group first")
    return group if group is not None else dist.group.WORLD


def _reduce_flat_(tensors: Sequence[Tensor], scale: float, group: Any) -> list[Tensor]:
    """Σ_ranks scale·t for each tensor, in float64 buffers of bounded size; returns float64 results."""
    import torch.distributed as dist

    out: list[Tensor] = []
    i = 0
    while i < len(tensors):
        j, n = i, 0
        while j < len(tensors) and (j == i or n + tensors[j].numel() <= _REDUCE_NUMEL):
            n += tensors[j].numel()
            j += 1
        dev = tensors[i].device
        flat = torch.cat([t.detach().reshape(-1).to(device=dev, dtype=torch.float64) for t in tensors[i:j]])
        if scale != 1.0:
            flat.mul_(scale)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        out += [piece.view(t.shape) for piece, t in zip(flat.split([t.numel() for t in tensors[i:j]]), tensors[i:j])]
        i = j
    return out


def _check_same_layout(entries: list[tuple[str, tuple[int, ...], str]], group: Any, what: str) -> None:
    """Every rank must reduce the same tensors in the same order (else the sums mix parameters)."""
    import torch.distributed as dist

    world = dist.get_world_size(group)
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, entries, group=group)
    for r, other in enumerate(gathered):
        if other != entries:
            diff = next((f"entry {i}: {a} here, {b} on rank {r}" for i, (a, b) in enumerate(zip(entries, other))
                         if a != b), f"{len(entries)} entries here, {len(other)} on rank {r}")
            raise ValueError(f"{what}: ranks hold different tensors ({diff}); every rank must pass the same "
                             "parameters, in the same order, with the same shapes")


def _count(n: object, what: str) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"{what} must be a non-negative int, got {n!r}")
    return n


def all_reduce_fisher(
    fisher: Mapping[K, Tensor], n_samples: int, group: Any = None
) -> tuple[dict[K, Tensor], int]:
    """Combine per-rank Fisher means into the global one: ``Σ_r n_r F_r / Σ_r n_r``.

    A collective: every rank calls it with the same keys (names, or parameters in the
    same order) and shapes; ``n_samples`` is the number of samples behind this rank's
    mean (it may be 0, then this rank's values are ignored). The sums are taken in
    float64, so the result equals the Fisher over all ranks' samples up to rounding.

    Returns the global Fisher (each value in its input's dtype and device) and the
    total sample count. Raises on every rank if the ranks disagree on the layout or
    no rank has samples. DTensor values are refused: those are already global.
    """
    import torch.distributed as dist

    group = _default_group(group)
    n = _count(n_samples, "n_samples")
    if not isinstance(fisher, Mapping):
        raise TypeError(f"fisher must be a mapping of tensors, got {type(fisher).__name__}")
    keys = list(fisher)
    for i, k in enumerate(keys):
        v = fisher[k]
        name = repr(k) if isinstance(k, str) else f"entry {i}"
        if not isinstance(v, Tensor) or not v.is_floating_point():
            raise TypeError(f"Fisher {name} must be a floating-point tensor, got "
                            f"{v.dtype if isinstance(v, Tensor) else type(v).__name__}")
        if is_dtensor(v):
            raise TypeError(f"Fisher {name} is a DTensor: it is already one global tensor (e.g. the running "
                            "Fisher under FSDP2); pass it to consolidate() as it is")
    entries = [(k if isinstance(k, str) else f"#{i}", tuple(fisher[k].shape), str(fisher[k].dtype))
               for i, k in enumerate(keys)]
    _check_same_layout(entries, group, "all_reduce_fisher")
    dev = fisher[keys[0]].device if keys else torch.device("cpu")
    total_t = torch.tensor([float(n)], dtype=torch.float64, device=dev)
    dist.all_reduce(total_t, op=dist.ReduceOp.SUM, group=group)
    total = int(total_t.item())
    if total == 0:
        raise ValueError("all_reduce_fisher: no rank has samples (every n_samples is 0)")
    sums = _reduce_flat_([fisher[k] for k in keys], float(n), group)
    return {k: (s / total).to(fisher[k].dtype) for k, s in zip(keys, sums)}, total


def all_reduce_sum_(tensors: Sequence[Tensor], group: Any = None) -> None:
    """In place, ``t ← Σ_ranks t`` for each tensor (float64 accumulation).

    For per-rank *sums* such as a per-sample Σ_n g_n² buffer under DDP. A collective
    with the same layout check as :func:`all_reduce_fisher`.
    """
    group = _default_group(group)
    tensors = list(tensors)
    for i, t in enumerate(tensors):
        if not isinstance(t, Tensor) or not t.is_floating_point() or is_dtensor(t):
            raise TypeError(f"all_reduce_sum_: entry {i} must be a plain floating-point tensor")
    _check_same_layout([(f"#{i}", tuple(t.shape), str(t.dtype)) for i, t in enumerate(tensors)],
                       group, "all_reduce_sum_")
    for t, s in zip(tensors, _reduce_flat_(tensors, 1.0, group)):
        t.copy_(s)


def agree_ok(group: Any, ok: bool) -> bool:
    """All-reduce a failure flag: True when every rank of ``group`` is ``ok``.

    A rank that fails calls this (with ``ok=False``) before raising, so that the
    others raise too instead of waiting in the next collective.
    """
    import torch.distributed as dist

    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else torch.device("cpu")
    t = torch.tensor([0.0 if ok else 1.0], device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return float(t.item()) == 0.0


def fisher_group(model: torch.nn.Module, process_group: Any) -> tuple[torch.nn.Module, Any]:
    """For :func:`ewc_fused.estimate_fisher`: the module to call and the group to reduce over.

    A ``DistributedDataParallel`` model is called through ``.module`` (DDP's reducer
    expects weight gradients after its forward, and a Fisher pass forms none) and
    reduces over DDP's group. FSDP2 parameters on one 1-D mesh reduce over that mesh.
    """
    runner, group = model, process_group
    ddp = getattr(torch.nn.parallel, "DistributedDataParallel", None)
    if ddp is not None and isinstance(model, ddp):
        runner = model.module
        if group is None:
            group = model.process_group
    if group is None:
        meshes = {p.device_mesh for p in model.parameters() if p.requires_grad and is_dtensor(p)}
        if len(meshes) == 1 and next(iter(meshes)).ndim == 1:
            group = next(iter(meshes)).get_group()
        elif meshes:
            raise ValueError(
                "estimate_fisher: the model's DTensor parameters live on several meshes or on a multi-dimensional "
                "mesh; pass process_group= (the data-parallel group whose ranks see different samples)")
    if group is not None:
        _default_group(group)
    return runner, group


def combine_sharded(p: Tensor, f_local: Tensor, state: Mapping[str, Any], *, mode: str, decay: float,
                    dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`ewc_fused.consolidation.combine` on the local shards of DTensor ``p``.

    Returns F and c as DTensors placed like ``p``, and this rank's part of the new K
    (the old, global K enters on one rank only): :func:`sum_over_shards` totals it.
    """
    from .consolidation import combine

    k_old = state.get("ewc_const")
    if k_old is not None and not owns_replica(p):
        k_old = torch.zeros_like(k_old)
    f_old, c_old = state.get("ewc_fisher"), state.get("ewc_anchor")
    f, c, k = combine(local(p).detach(), f_local, None if f_old is None else local(f_old),
                      None if c_old is None else local(c_old), k_old, mode=mode, decay=decay, dtype=dtype)
    return wrap_like(f, p), wrap_like(c, p), k


def quadratic_part(p: Tensor, state: Mapping[str, Any]) -> Tensor:
    """This rank's part of Σ_i F_i (θ_i − c_i)² + K for DTensor ``p`` (K on one rank only)."""
    from .consolidation import quadratic

    k = state["ewc_const"]
    if not owns_replica(p):
        k = torch.zeros_like(k)
    return quadratic(local(p).detach(), local(state["ewc_fisher"]), local(state["ewc_anchor"]), k).cpu()


def all_reduce_counts(counts: Sequence[int], group: Any = None) -> tuple[int, ...]:
    """Σ_ranks of each integer count (one small all-reduce)."""
    import torch.distributed as dist

    group = _default_group(group)
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else torch.device("cpu")
    t = torch.tensor([int(c) for c in counts], dtype=torch.int64, device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return tuple(int(v) for v in t.tolist())


def all_reduce_tracked_(bufs: Sequence[Tensor], samples: int, group: Any) -> int:
    """For the per-sample Fisher tracker under DDP/FSDP2: in place ``S ← Σ_ranks S`` for its
    buffers of Σ_n (∇ℓ_n)², and the total sample count (one all-reduce per 4M elements).

    Every rank calls it at every step (with 0 samples if it saw none); the buffers are
    plain full-shape tensors laid out alike on every rank (the tracker builds them so).
    """
    import torch.distributed as dist

    bufs = list(bufs)
    dev = bufs[0].device if bufs else torch.device("cpu")
    count = torch.tensor([float(samples)], dtype=torch.float64, device=dev)
    ranges, i = [], 0
    while i < len(bufs):
        j, n = i, 0
        while j < len(bufs) and (j == i or n + bufs[j].numel() <= _REDUCE_NUMEL):
            n += bufs[j].numel()
            j += 1
        ranges.append((i, j))
        i = j
    for ci, (i, j) in enumerate(ranges or [(0, 0)]):
        parts = [b.reshape(-1).to(torch.float64) for b in bufs[i:j]] + ([count] if ci == 0 else [])
        flat = torch.cat(parts)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        for b, piece in zip(bufs[i:j], flat.split([b.numel() for b in bufs[i:j]] + ([1] if ci == 0 else []))):
            b.copy_(piece.view(b.shape))
        if ci == 0:
            count = flat[-1:]
    return int(round(float(count.item())))


def tracked_fisher_group(model: torch.nn.Module, process_group: Any) -> Any:
    """The group over which :meth:`FusedEWCAdam.track_fisher` sums its per-sample buffers:
    ``process_group``, else DDP's group or the 1-D mesh of FSDP2 parameters, else None."""
    return fisher_group(model, process_group)[1]
