"""Property-based tests: random step / consolidate / reset / add_param_group / lr and λ
sequences against the float64 textbook reference (:class:`ReferenceEWCAdam`).

Hypothesis draws a scenario: a precision profile (fp32/bf16/fp16 parameters with fp32 EWC
state; float64 parameters and state; or all mixed), 1–4 parameters in 1–2 param groups,
named or not (shapes with empty and 1-element tensors, sizes around the kernel's
1024-element block and, for the torch backend, of 2¹⁶ elements and more (its chunked
path); contiguous, channels-last, transposed, non-dense strided and frozen
parameters; gradients in θ's layout or contiguous), every constructor option (lr as a
float or a tensor, betas, eps, coupled and decoupled weight decay, amsgrad, maximize,
foreach/fused, ewc_dtype, nonfinite, per-group λ and fisher_ema), and up to
:data:`MAX_OPS` operations (10; 8 under the interpreter): steps (some gradients None),
consolidations (multi/online, decay, an explicit Fisher for some parameters or the running
Fisher, which must be refused while there is none), reset_ewc, add_param_group, lr and λ
changes, and ``reload`` (a torch.save/torch.load round trip of the state dict into a fresh
optimizer). After every operation θ, m, v, v̂max, step counts, the running Fisher and the
penalty value are compared.

Lockstep. The reference runs in float64 on the *same* values as ours: the parameters
start equal (ours' values converted exactly to float64), every gradient and Fisher is
drawn representable in the dtypes ours stores it in, and after each operation the
reference's θ, m, v, v̂max and running Fisher are set to ours (exactly, in float64). So
each check bounds the error of one operation and nothing accumulates. An operation other
than a step must leave θ, m, v and v̂max bit for bit as they were. After a step, every
element must satisfy ``|ours − ref| <= bound``, where the bound propagates a relative error
``r`` in every quantity the step combines, to first order, through the update
(:meth:`Pair._step_bounds`): the combined gradient G = ±g + λ Σ_t F_t (θ − θ*_t) (+ wd·θ)
gets r·(|g| + λ Σ_t F_t (|θ| + |θ*_t|) + wd|θ|), which covers the anchor c rounded to
``ewc_dtype`` however much the terms cancel; m and v get r times the magnitudes they
combine; θ gets r·(|θ before| + |θ after|) plus lr times the error of m/(√v/√bc2 + ε). The
running Fisher (non-negative terms) gets r relative; the penalty r relative plus what c's
rounding does to (θ − c)². ``r`` is per dtype (the coarser of the parameter dtype and
``ewc_dtype``):

=========  ==========  ===================================================  ==========
dtype      r (TOL)     source of the error                                  observed
=========  ==========  ===================================================  ==========
float64    1e-13       torch's Adam in float64; the merged anchor c          ≤ 0.05 r
float32    5e-7        fp32 arithmetic (kernel or torch), about 8 ulps        ≤ 0.30 r
bfloat16   2⁻⁷         one bf16 ulp: the interpreter truncates on store;      ≤ 0.49 r
                       torch's foreach Adam rounds every op in bf16
float16    2⁻¹⁰        one fp16 ulp of storage rounding                       ≤ 0.33 r
=========  ==========  ===================================================  ==========

("observed": the largest error / bound over 1,500 torch and 1,000 triton random scenarios
while writing this; 2,000 per backend with --slow passed.) Gradients have magnitude in
[0.5, 1.5) with a random sign, because Adam's first step is lr·sign(g): a gradient within
rounding error of zero would turn a one-ulp difference into 2·lr.

Sensitivity: the CI example set (200 per backend, derandomized) fails for each of the
three bugs it found (see the regression tests at the end) and for each of twelve
deliberate one-line breakages tried while writing it (a missing bias correction, the
running Fisher taken after the penalty, decoupled weight decay without lr, λ off by 0.1%
in the kernel, the torch path or its chunked path, the maximize sign, the multi-task
anchor weights, K not decayed, the running-Fisher count lost on load, reset_ewc keeping
it, gradients not copied into θ's layout).

Not fuzzed here: ``ewc_dtype`` bf16/fp16 (a lossy anchor; ``test_bf16_ewc_state``),
GradScaler and non-finite gradients (test_amp.py, test_faults.py), the tracker
(test_tracker.py, test_resume.py).

Profiles (tests/conftest.py): CI runs ``max_examples=200`` per backend, derandomized;
``--slow`` runs 2000 per backend with a random seed (printed on failure).
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import given, note
from hypothesis import strategies as st

from ewc_fused import FusedEWCAdam
from ewc_fused.reference import ReferenceEWCAdam

# Operations per scenario: the Triton interpreter is slow, the torch backend is not.
MAX_OPS = {"torch": 10, "triton": 8}
MAX_NUMEL = 240  # multi-dimensional shapes
TOL = {torch.float64: 1e-13, torch.float32: 5e-7, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}
_MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
# Precision profiles, drawn per scenario: (parameter dtypes, ewc_dtype choices). The kernel
# stores fp32/fp16/bf16; float64 rows take the torch path under either backend and must
# keep float64 accuracy. Hypothesis favours the first entry of a sampled_from inside a
# composite, so each backend lists its main profile first.
_LOWP = ([torch.float32, torch.bfloat16, torch.float16], [torch.float32])
_FP64 = ([torch.float64], [torch.float64])
_MIXED = ([torch.float32, torch.float64, torch.bfloat16, torch.float16], [torch.float32, torch.float64])
PROFILES = {"torch": [_FP64, _MIXED, _LOWP], "triton": [_LOWP, _FP64, _MIXED]}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# --------------------------------------------------------------------------- scenarios


@dataclass
class TensorSpec:
    shape: tuple
    dtype: torch.dtype
    layout: str  # contiguous | channels_last | transposed | strided
    grad_like_param: bool  # gradient in θ's strides, else contiguous
    frozen: bool


@dataclass
class Scenario:
    seed: int
    named: bool
    ctor: dict
    groups: list  # [(specs, group options)]
    ops: list = field(default_factory=list)


def _shape(draw, layout, big):
    if big and layout in ("contiguous", "transposed") and draw(st.integers(0, 19)) == 0:
        # the torch backend's chunked path for tensors of 2¹⁶ elements or more
        return (draw(st.sampled_from([1 << 16, 70_001])),) if layout == "contiguous" else (300, 251)
    if layout == "channels_last":
        return tuple(draw(st.lists(st.integers(0, 4), min_size=4, max_size=4)))
    if layout == "transposed":
        return (draw(st.integers(1, 9)), draw(st.integers(1, 9)))
    nd = draw(st.integers(1 if layout == "strided" else 0, 3))
    if nd == 1 and layout == "contiguous" and draw(st.integers(0, 9)) == 0:
        return (draw(st.sampled_from([1023, 1025, 2049])),)  # around the kernel's 1024-element block
    dims = draw(st.lists(st.sampled_from([1, 1, 2, 3, 5, 7, 9, 16, 1, 2, 3, 5, 7, 9, 16, 0]), min_size=nd, max_size=nd))
    if layout == "strided" and dims and dims[-1] == 0:
        dims[-1] = 1
    return tuple(dims)


@st.composite
def tensor_spec(draw, dtypes, big=False):
    layout = draw(st.sampled_from(["contiguous", "contiguous", "contiguous", "channels_last", "transposed",
                                   "strided"]))
    shape = _shape(draw, layout, big)
    while len(shape) > 1 and MAX_NUMEL < math.prod(shape) < 1 << 16:  # 1-D: at most 2049, or big
        shape = tuple(max(1, s // 2) if s > 1 else s for s in shape)
    return TensorSpec(shape, draw(st.sampled_from(dtypes)), layout, draw(st.booleans()),
                      frozen=draw(st.sampled_from([False, False, False, False, True])))


def group_options(draw, first):
    opts = {}
    if first or draw(st.booleans()):
        opts["ewc_lambda"] = draw(st.sampled_from([0.0, 0.5, 3.0, 50.0]))
    if first or draw(st.booleans()):
        opts["fisher_ema"] = draw(st.sampled_from([None, 0.0, 0.5, 0.9]))
    if not first and draw(st.booleans()):
        opts["lr"] = draw(st.sampled_from([1e-3, 3e-2]))
    return opts


@st.composite
def scenarios(draw, backend):
    dtypes, ewc_dtypes = draw(st.sampled_from(PROFILES[backend]))
    foreach = draw(st.sampled_from([None, True, False]))
    fused = draw(st.sampled_from([None, False] if foreach else [None, True, True, False]))
    lr = draw(st.sampled_from([1e-3, 1e-2, 5e-2]))
    lr_tensor = not foreach and draw(st.booleans())  # torch refuses a tensor lr with foreach=True
    ctor = dict(
        lr=lr, lr_tensor=lr_tensor,
        betas=(draw(st.sampled_from([0.0, 0.5, 0.9])), draw(st.sampled_from([0.5, 0.9, 0.999]))),
        eps=draw(st.sampled_from([1e-8, 1e-6, 1e-3])),
        weight_decay=draw(st.sampled_from([0.0, 0.0, 0.01, 0.1])),
        amsgrad=draw(st.booleans()), maximize=draw(st.booleans()),
        decoupled_weight_decay=draw(st.booleans()),
        foreach=foreach, fused=fused,
        ewc_dtype=draw(st.sampled_from(ewc_dtypes)),
        nonfinite=draw(st.sampled_from(["propagate", "skip", "raise"])),
        backend=backend,
    )
    n_groups = draw(st.integers(1, 2))
    groups = []
    for gi in range(n_groups):
        specs = draw(st.lists(tensor_spec(dtypes, big=backend == "torch"), min_size=1,
                              max_size=2 if n_groups == 2 else 3))
        groups.append((specs, group_options(draw, gi == 0)))
    sc = Scenario(seed=draw(st.integers(0, 2 ** 31 - 1)), named=draw(st.booleans()), ctor=ctor, groups=groups)
    if draw(st.booleans()):  # EWC on from the start (no kernel launch: it does not count as an op)
        sc.ops.append(("consolidate", "multi", 1.0, "explicit", 0))
    n_ops = draw(st.sampled_from(range(MAX_OPS[backend], 0, -1)))  # about uniform; shrinks to short ones
    for _ in range(n_ops):
        kind = draw(st.sampled_from(["step"] * 5 + ["consolidate"] * 4 + ["reload"] * 2
                                    + ["reset", "add_group", "lr", "lambda"]))
        if kind == "step":
            sc.ops.append(("step", draw(st.sampled_from([0, 0, 0, 0, 1, 2, 5, 6]))))  # bitmask: grad None
        elif kind == "consolidate":
            sc.ops.append(("consolidate", draw(st.sampled_from(["multi", "multi", "multi", "online"])),
                           draw(st.sampled_from([1.0, 0.5, 0.0, 0.5])),
                           draw(st.sampled_from(["explicit", "explicit", "running"])),
                           draw(st.sampled_from([0, 0, 1, 2]))))  # bitmask: left out of the Fisher
        elif kind == "add_group":
            sc.ops.append(("add_group", draw(st.lists(tensor_spec(dtypes), min_size=1, max_size=2)),
                           group_options(draw, False)))
        elif kind == "lr":
            sc.ops.append(("lr", draw(st.sampled_from([1e-3, 2e-2]))))
        elif kind == "lambda":
            sc.ops.append(("lambda", draw(st.integers(0, 2)), draw(st.sampled_from([0.0, 1.0, 20.0]))))
        else:
            sc.ops.append((kind,))
    return sc


# --------------------------------------------------------------------------- running both


def _representable(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float64 values exactly representable in ``dtype`` (and not subnormal there)."""
    y = x.to(dtype)
    y = torch.where(y.abs() < torch.finfo(dtype).tiny, torch.zeros_like(y), y)
    return y.to(torch.float64)


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "transposed":
        return x.t().contiguous().t()
    if layout == "strided":  # every other element of a wider tensor: not dense
        wide = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype)
        wide[..., ::2] = x
        return wide[..., ::2]
    return x


class Pair:
    """FusedEWCAdam and the float64 reference on the same parameters."""

    def __init__(self, sc: Scenario):
        self.sc = sc
        self.gen = torch.Generator().manual_seed(sc.seed)
        c = sc.ctor
        self.lr_tensor = c["lr_tensor"]
        self.specs: list[TensorSpec] = []
        self.ours: list[torch.nn.Parameter] = []
        self.refs: list[torch.nn.Parameter] = []
        self.names: list[str] = []
        ours_groups, ref_groups = [], []
        for specs, opts in sc.groups:
            ps, qs = self._new_params(specs)
            ours_groups.append(self._group(ps, opts))
            ref_groups.append({"params": qs, **opts})
        self.ctor = dict(
            betas=c["betas"], eps=c["eps"], weight_decay=c["weight_decay"], amsgrad=c["amsgrad"],
            maximize=c["maximize"], decoupled_weight_decay=c["decoupled_weight_decay"],
            foreach=c["foreach"], fused=c["fused"], ewc_dtype=c["ewc_dtype"], nonfinite=c["nonfinite"],
            backend=c["backend"],
        )
        lr = torch.tensor(c["lr"], dtype=torch.float64) if self.lr_tensor else c["lr"]
        self.opt = FusedEWCAdam(ours_groups, lr=lr, ewc_lambda=1.0, fisher_ema=None, **self.ctor)
        self.ref = ReferenceEWCAdam(
            ref_groups, ewc_lambda=1.0, fisher_ema=None, lr=c["lr"],
            betas=c["betas"], eps=c["eps"],
            weight_decay=c["weight_decay"], amsgrad=c["amsgrad"], maximize=c["maximize"],
            decoupled_weight_decay=c["decoupled_weight_decay"], foreach=False)

    # ---------------------------------------------------------------- construction
    def _new_params(self, specs):
        ps, qs = [], []
        for spec in specs:
            base = _representable(torch.randn(spec.shape, generator=self.gen, dtype=torch.float64), spec.dtype)
            p = torch.nn.Parameter(_layout(base.to(spec.dtype), spec.layout), requires_grad=not spec.frozen)
            q = torch.nn.Parameter(base.clone(), requires_grad=not spec.frozen)
            assert torch.equal(p.detach().double(), q.detach())
            self.specs.append(spec)
            self.names.append(f"p{len(self.names)}")
            ps.append(p)
            qs.append(q)
            self.ours.append(p)
            self.refs.append(q)
        return ps, qs

    def _group(self, ps, opts):
        names = self.names[len(self.names) - len(ps):]
        g = {"params": list(zip(names, ps)) if self.sc.named else ps, **opts}
        if "lr" in g and self.lr_tensor:
            g["lr"] = torch.tensor(g["lr"], dtype=torch.float64)
        return g

    def key(self, i):
        return self.names[i] if self.sc.named else self.ours[i]

    def tol_dtype(self, i):
        """The coarser of the parameter's dtype and the EWC state's."""
        pd, ed = self.specs[i].dtype, self.ctor["ewc_dtype"]
        return pd if torch.finfo(pd).eps >= torch.finfo(ed).eps else ed

    # ---------------------------------------------------------------- operations
    def step(self, none_mask):
        for i, (p, q) in enumerate(zip(self.ours, self.refs)):
            if self.specs[i].frozen or (none_mask >> i) & 1:
                p.grad = q.grad = None
                continue
            mag = torch.rand(p.shape, generator=self.gen, dtype=torch.float64) + 0.5
            sign = torch.rand(p.shape, generator=self.gen) < 0.5
            g = _representable(torch.where(sign, -mag, mag), p.dtype)
            q.grad = g.clone()
            self.grads[i] = g
            p.grad = torch.empty_like(p).copy_(g) if self.specs[i].grad_like_param else g.to(p.dtype)
        self.opt.step()
        self.ref.step()

    def consolidate(self, mode, decay, source, out_mask):
        if source == "running":
            if not self.ref.running_fisher():
                with pytest.raises(ValueError, match="running Fisher"):
                    self.opt.consolidate(mode=mode, decay=decay)
                return
            self.opt.consolidate(mode=mode, decay=decay)
            self.ref.consolidate(mode=mode, decay=decay)
            return
        ours, theirs = {}, {}
        for i, (p, q) in enumerate(zip(self.ours, self.refs)):
            if (out_mask >> i) & 1:
                continue
            f = torch.rand(p.shape, generator=self.gen, dtype=torch.float64) * 2
            # the same values in ours' parameter dtype and in ewc_dtype as in the reference
            f = _representable(torch.where(torch.rand(p.shape, generator=self.gen) < 0.2, 0.0, f), self.tol_dtype(i))
            ours[self.key(i)] = f.to(p.dtype)
            theirs[q] = f
        self.opt.consolidate(ours, mode=mode, decay=decay)
        self.ref.consolidate(theirs, mode=mode, decay=decay)

    def reset(self):
        self.opt.reset_ewc()
        self.ref.ewc.terms = [[] for _ in self.ref.ewc.named]
        self.ref.fisher_run.clear()
        self.ref.fisher_count.clear()

    def add_group(self, specs, opts):
        ps, qs = self._new_params(specs)
        self.opt.add_param_group(self._group(ps, opts))
        ref_group = {"params": qs, "ewc_lambda": opts.get("ewc_lambda", 1.0),
                     "fisher_ema": opts.get("fisher_ema", None)}
        # torch's default (a tensor lr is shared with group 0, so set_lr's fill_ reached it)
        ref_group["lr"] = float(self.opt.param_groups[-1]["lr"])
        self.ref.opt.add_param_group(ref_group)
        self.ref.ewc.named.extend((None, q) for q in qs)
        self.ref.ewc.terms.extend([] for _ in qs)
        self.ref.group_of.extend(len(self.ref.groups) - 1 for _ in qs)

    def set_lr(self, lr):
        for g in self.opt.param_groups:
            if isinstance(g["lr"], torch.Tensor):
                g["lr"].fill_(lr)
            else:
                g["lr"] = lr
        for g in self.ref.groups:
            g["lr"] = lr

    def set_lambda(self, gi, lam):
        gi = min(gi, len(self.opt.param_groups) - 1)
        self.opt.param_groups[gi]["ewc_lambda"] = lam
        self.ref.groups[gi]["ewc_lambda"] = lam

    def reload(self):
        """Checkpoint (torch.save) and load into a fresh optimizer over the same parameters."""
        buf = io.BytesIO()
        torch.save(self.opt.state_dict(), buf)
        buf.seek(0)
        sd = torch.load(buf, weights_only=True)
        groups = []
        for g in self.opt.param_groups:
            ps = g["params"]
            groups.append({"params": list(zip(g["param_names"], ps)) if "param_names" in g else list(ps)})
        fresh = FusedEWCAdam(groups, lr=1e-3, **self.ctor)
        fresh.load_state_dict(sd)
        self.opt = fresh

    # ---------------------------------------------------------------- comparison
    def snapshot(self):
        """The reference's values before an operation (scales of the tolerance)."""
        out = []
        for q in self.refs:
            st_ = self.ref.opt.state.get(q, {})
            out.append({"theta": q.detach().clone(),
                        **{k: st_[k].clone() for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if k in st_}})
        return out

    def check(self, before, what):
        """Compare everything after one operation. Parameters that took a step get the
        per-dtype bound propagated through that step (:func:`_step_bounds`); everything
        else must not have changed at all: the reference holds ours' values exactly."""
        for i, (p, q) in enumerate(zip(self.ours, self.refs)):
            tiny = torch.finfo(self.specs[i].dtype).tiny
            prev = before[i] if i < len(before) else {"theta": q.detach()}
            where = f"{what}: parameter {i} {self.specs[i]}"
            st_o, st_r = self.opt.state.get(p, {}), self.ref.opt.state.get(q, {})
            bounds = (self._step_bounds(i, prev, st_r) if i in self.grads
                      else {k: torch.zeros_like(q, dtype=torch.float64) for k in ("theta", *_MOMENTS)})
            _close(p, q, bounds["theta"], where + " θ")
            if "exp_avg" not in st_r:  # never stepped: ours holds only zeros (consolidate made them)
                assert float(st_o.get("step", 0.0)) == 0.0, where
                for k in _MOMENTS:
                    assert k not in st_o or not bool(st_o[k].any()), where + " " + k
                continue
            assert float(st_o["step"]) == float(st_r["step"]), where + " step"
            for k in _MOMENTS[:3 if self.ctor["amsgrad"] else 2]:
                _close(st_o[k], st_r[k], bounds[k] + (tiny if i in self.grads else 0.0), f"{where} {k}")
        rf_o, rf_r = self.opt.running_fisher(), self.ref.running_fisher()
        index = {id(q): i for i, q in enumerate(self.refs)}
        by_key = {self.key(index[id(q)]): (index[id(q)], f) for q, f in rf_r.items()}
        assert set(rf_o) == set(by_key), f"{what}: running Fisher keys"
        for k, (i, f) in by_key.items():  # a sum of non-negative terms: relative error
            _close(rf_o[k], f, TOL[self.tol_dtype(i)] * f.abs() + torch.finfo(torch.float32).tiny,
                   f"{what}: running Fisher of parameter {i}")
        # The penalty: with c rounded to ewc_dtype, off by δ ≤ r(|θ| + |θ*|), (θ − c)² is off by
        # 2|θ − c|δ + δ², so each term gets r·(its value) + (λ/2) Σ F_t (2|θ − θ*_t|δ_t + δ_t²);
        # ewc_penalty() returns float32 (one more rounding).
        pen_r, bound = 0.0, 0.0
        for i, (_, q) in enumerate(self.ref.ewc.named):
            lam, r = self.ref._lambda(i), TOL[self.tol_dtype(i)]
            for f, a in self.ref.ewc.terms[i]:
                d = (q.detach() - a).abs()
                delta = r * (q.detach().abs() + a.abs())
                part = 0.5 * lam * float((f * d * d).sum())
                pen_r += part
                bound += r * part + 0.5 * lam * float((f * (2 * d * delta + delta * delta)).sum())
        pen_o = float(self.opt.ewc_penalty())
        assert abs(pen_o - pen_r) <= bound + 2.0 ** -24 * abs(pen_r), f"{what}: penalty {pen_o} vs {pen_r}"

    def _step_bounds(self, i, prev, st_r):
        """Elementwise error bounds of one step of parameter i: a relative error r (the
        dtype's TOL) in every quantity the step combines, propagated to first order.

        G = ±g + λ Σ_t F_t (θ − θ*_t) (+ wd·θ) is bounded by S = |g| + λ Σ_t F_t (|θ| + |θ*_t|)
        (+ wd|θ|), so an error r·S covers fp32 arithmetic and an anchor c rounded to
        ewc_dtype, however much the terms cancel. Then m, v (v̂max) carry r times the
        magnitudes they combine, and θ's update lr/bc1 · m/(√v/√bc2 + ε) the error of m
        plus that of its denominator."""
        r = TOL[self.tol_dtype(i)]
        q = self.refs[i]
        group = self.ref.groups[self.ref.group_of[i]]
        lam, lr, wd = float(group["ewc_lambda"]), float(group["lr"]), float(group["weight_decay"])
        b1, b2 = group["betas"]
        eps, decoupled, amsgrad = group["eps"], group["decoupled_weight_decay"], group["amsgrad"]
        theta0 = prev["theta"]
        s = self.grads[i].abs()
        for f, a in self.ref.ewc.terms[i]:
            s = s + lam * f * (theta0.abs() + a.abs())
        if not decoupled:
            s = s + wd * theta0.abs()
        zero = torch.zeros_like(theta0)
        m, v = st_r["exp_avg"], st_r["exp_avg_sq"]
        out = {"exp_avg": r * (prev.get("exp_avg", zero).abs() + m.abs() + s),
               "exp_avg_sq": r * (prev.get("exp_avg_sq", zero).abs() + v.abs() + 2 * s * s)}
        vv, dvv = v, out["exp_avg_sq"]
        if amsgrad:
            vv = st_r["max_exp_avg_sq"]
            out["max_exp_avg_sq"] = dvv = out["exp_avg_sq"] + r * vv.abs()
        t = float(st_r["step"])
        bc1, sbc2 = 1 - b1 ** t, math.sqrt(1 - b2 ** t)
        root = vv.sqrt()
        den = root / sbc2 + eps
        dden = torch.minimum(dvv / (2 * root).clamp_min(1e-300), dvv.sqrt()) / sbc2
        dupd = (out["exp_avg"] + m.abs() * dden / den + 2 * r * m.abs()) / (bc1 * den)
        out["theta"] = r * (theta0.abs() + q.detach().abs()) + lr * dupd + (lr * wd * r * theta0.abs() if decoupled
                                                                            else 0.0)
        return out

    def sync(self):
        """Lockstep: the reference continues from ours' values (exact in float64)."""
        with torch.no_grad():
            for i, (p, q) in enumerate(zip(self.ours, self.refs)):
                q.copy_(p.detach().double())
                st_o, st_r = self.opt.state.get(p, {}), self.ref.opt.state.get(q, {})
                for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                    if k in st_r:
                        st_r[k].copy_(st_o[k].double())
                if i in self.ref.fisher_run:
                    self.ref.fisher_run[i] = self.opt.state[p]["fisher_ema"].double().clone()
                    assert float(self.opt.state[p]["fisher_ema_step"]) == self.ref.fisher_count[i]


def _close(got, want, bound, where):
    got, want = got.detach().double(), want.detach().double()
    assert got.shape == want.shape, where
    if got.numel() == 0:
        return
    err = (got - want).abs()
    bad = ~(err <= bound)
    if bool(bad.any()):
        j = int(bad.flatten().nonzero()[0])
        raise AssertionError(f"{where}: element {j}: {float(got.flatten()[j])!r} vs {float(want.flatten()[j])!r} "
                             f"(error {float(err.flatten()[j]):.3g}, bound {float(bound.flatten()[j]):.3g})")


def run_scenario(sc: Scenario) -> Pair:
    pair = Pair(sc)
    pair.grads = {}
    pair.check(pair.snapshot(), "start")
    for n, op in enumerate(sc.ops):
        before = pair.snapshot()
        pair.grads = {}  # parameter index -> the gradient of this step (float64)
        kind = op[0]
        if kind == "step":
            pair.step(op[1])
        elif kind == "consolidate":
            pair.consolidate(*op[1:])
        elif kind == "reset":
            pair.reset()
        elif kind == "add_group":
            pair.add_group(*op[1:])
        elif kind == "lr":
            pair.set_lr(op[1])
        elif kind == "lambda":
            pair.set_lambda(*op[1:])
        elif kind == "reload":
            pair.reload()
        pair.check(before, f"after op {n} {kind}")
        pair.sync()
    return pair


@pytest.mark.parametrize("backend", ["torch", "triton"])
@given(data=st.data())
def test_random_sequences_match_float64_reference(backend, data):
    sc = data.draw(scenarios(backend), label="scenario")
    note(repr(sc))
    run_scenario(sc)


# --------------------------------------------------------------------------- regressions found by the fuzzer


def test_float64_parameters_keep_float64_math_under_triton():
    """backend="triton" used to run float64 rows through the fp32 kernel (3e-8 off);
    the README promises float64 parameters the torch path: bit-identical to torch's Adam."""
    p = torch.nn.Parameter(torch.randn(10, dtype=torch.float64))
    q = torch.nn.Parameter(p.detach().clone())
    opt = FusedEWCAdam([p], lr=0.1, backend="triton")
    ref = torch.optim.Adam([q], lr=0.1, foreach=False)
    for _ in range(3):
        g = torch.randn(10, dtype=torch.float64)
        p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    assert (p - q).abs().max() <= 1e-15 * q.abs().max()


@pytest.mark.parametrize("layout", ["strided", "channels_last"])
def test_fused_true_on_layouts_torch_fused_adam_gets_wrong(layout):
    """fused=True was handed to torch's fused Adam even for a non-dense θ (torch 2.13
    walks it as flat memory and mixes elements, 0.1 off at lr=0.1); such rows now take
    torch's foreach Adam, whose numbers are the same to rounding. (Channels-last θ with a
    contiguous gradient: the gradient is copied into θ's layout, as without fused=True.)"""
    if layout == "strided":
        x = torch.randn(3, 10)[:, ::2]
    else:
        x = torch.randn(2, 3, 2, 2).contiguous(memory_format=torch.channels_last)
    p = torch.nn.Parameter(x)  # not x.clone(): that would be contiguous
    assert p.stride() == x.stride() and not p.is_contiguous()
    q = torch.nn.Parameter(x.contiguous().double())
    opt = FusedEWCAdam([p], lr=0.1, fused=True, ewc_lambda=3.0, backend="torch")
    ref = ReferenceEWCAdam([q], lr=0.1, ewc_lambda=3.0, foreach=False)
    for t in range(3):
        g = torch.randn(x.shape)
        p.grad, q.grad = g.clone(), g.double()  # a contiguous gradient, as a hook might leave it
        opt.step()
        ref.step()
        if t == 0:
            f = torch.rand(x.shape)
            opt.consolidate({p: f})
            ref.consolidate({q: f.double()})
    assert (p.detach().double() - q.detach()).abs().max() <= 1e-6


def test_running_fisher_keeps_float64_ewc_dtype():
    """running_fisher() used to return fp32 even with ewc_dtype=float64 (so consolidate()
    stored a rounded F); it returns at least fp32, float64 when F_run is float64."""
    p = torch.nn.Parameter(torch.randn(5, dtype=torch.float64))
    for ewc_dtype, want in ((torch.float64, torch.float64), (torch.float32, torch.float32),
                            (torch.bfloat16, torch.float32)):
        opt = FusedEWCAdam([p], fisher_ema=0.9, ewc_dtype=ewc_dtype, backend="torch")
        g = torch.randn(5, dtype=torch.float64) / 3
        p.grad = g
        opt.step()
        f = opt.running_fisher()[p]
        assert f.dtype == want
        if ewc_dtype == torch.float64:
            want_f = g * g  # (1 − β)g² / (1 − β¹), float64 rounding only (fp32 was 3e-8 off)
            assert (f - want_f).abs().max() <= 1e-15 * want_f.abs().max()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_decay_scales_the_constant_of_earlier_tasks(backend):
    """Three tasks in mode "multi", the third with decay 0.5: the penalty's constant K
    (earlier tasks' spread) must decay with their Fisher. The fixed tests never had K ≠ 0
    when a decay < 1 came (the fuzzer's penalty check caught a K that ignored decay)."""
    p = torch.nn.Parameter(torch.randn(6))
    q = torch.nn.Parameter(p.detach().double().clone())
    opt = FusedEWCAdam([p], lr=5e-2, ewc_lambda=2.0, backend=backend)
    ref = ReferenceEWCAdam([q], lr=5e-2, ewc_lambda=2.0, foreach=False)
    gen = torch.Generator().manual_seed(4)
    for t, decay in enumerate((1.0, 1.0, 0.5)):
        for _ in range(3):
            g = torch.randn(6, generator=gen)
            p.grad, q.grad = g.clone(), g.double()
            opt.step()
            ref.step()
        with torch.no_grad():
            q.copy_(p.detach().double())  # the same anchors, so the penalties compare to fp32 rounding
        f = torch.rand(6, generator=gen)
        opt.consolidate({p: f}, decay=decay)
        ref.consolidate({q: f.double()}, decay=decay)
    assert float(opt.state[p]["ewc_const"]) > 0
    pen, want = float(opt.ewc_penalty()), float(ref.penalty().detach())
    assert abs(pen - want) <= 1e-6 * want, (pen, want)
