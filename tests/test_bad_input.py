"""Bad input gets a clear error naming the parameter and the problem, raised before
any state changes: the optimizer's state (compared tensor by tensor through a deep
copy of ``state_dict()``), its param groups and the parameters are all checked to be
untouched after every failed call.

backend="triton" runs in the Triton interpreter on CPU tensors (tests/conftest.py),
so every tensor here has a handful of elements.
"""
import copy
import math
import re

import pytest
import torch
from torch import nn

from ewc_fused import FusedEWCAdam
from tests.helpers import assert_same_state

BACKENDS = ["torch", "triton"]


# ---------------------------------------------------------------------- helpers


def _grad(p):
    """A random gradient with magnitude in [0.5, 1.5): never zero."""
    mag = torch.rand_like(p) + 0.5
    return torch.where(torch.rand_like(p) < 0.5, -mag, mag)


def _set_grads(params):
    for p in params:
        if p.requires_grad:
            p.grad = _grad(p)


def _params():
    """Three small plain parameters (a weight, a bias, another matrix)."""
    return [nn.Parameter(torch.randn(3, 4)), nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(2, 5))]


def _model():
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))


def _trained(backend="torch", steps=2, named=False, **kw):
    """A model and its optimizer after a few steps (so Adam state exists)."""
    model = _model()
    params = model.named_parameters() if named else model.parameters()
    opt = FusedEWCAdam(params, lr=1e-2, backend=backend, **kw)
    for _ in range(steps):
        _set_grads(model.parameters())
        opt.step()
    return model, opt


class Snapshot:
    """Optimizer state, param groups and parameter values at one moment."""

    def __init__(self, opt, params):
        self.opt = opt
        self.params = list(params)
        self.sd = copy.deepcopy(opt.state_dict())
        self.values = [p.detach().clone() for p in self.params]
        self.state_keys = {id(p): set(opt.state[p]) if p in opt.state else None for p in self.params}

    def assert_unchanged(self):
        assert_same_state(self.sd, self.opt.state_dict())
        for p, v in zip(self.params, self.values):
            assert torch.equal(p.detach(), v), "a parameter changed"
        for p in self.params:
            now = set(self.opt.state[p]) if p in self.opt.state else None
            assert now == self.state_keys[id(p)], f"state keys changed: {self.state_keys[id(p)]} -> {now}"


def _no_ewc_state(opt, params):
    for p in params:
        assert not any(k in opt.state.get(p, {}) for k in ("ewc_fisher", "ewc_anchor", "ewc_const"))


# ---------------------------------------------------------------------- consolidate(): the Fisher


@pytest.fixture
def trained():
    model, opt = _trained()
    return model, opt, Snapshot(opt, model.parameters())


def _first(model):
    return next(iter(model.parameters()))


@pytest.mark.parametrize(
    "make_bad, exc, match",
    [
        (lambda p: torch.rand(p.shape[0] + 1, *p.shape[1:]), ValueError, r"shape \(4, 4\), expected \(3, 4\)"),
        (lambda p: torch.rand(p.numel()), ValueError, r"shape \(12,\), expected \(3, 4\)"),
        (lambda p: torch.rand(p.shape, device="meta"), ValueError, r"is on meta.*parameter is on cpu"),
        (lambda p: -torch.rand(p.shape) - 0.1, ValueError, r"negative"),
        (lambda p: torch.rand(p.shape).index_put_((torch.tensor([1]), torch.tensor([2])), torch.tensor(-1e-3)),
         ValueError, r"negative"),
        (lambda p: torch.rand(p.shape).index_put_((torch.tensor([1]), torch.tensor([2])), torch.tensor(math.nan)),
         ValueError, r"non-finite|NaN"),
        (lambda p: torch.rand(p.shape).index_put_((torch.tensor([0]), torch.tensor([0])), torch.tensor(math.inf)),
         ValueError, r"non-finite|inf"),
        (lambda p: torch.rand(p.shape).index_put_((torch.tensor([0]), torch.tensor([0])), torch.tensor(-math.inf)),
         ValueError, r"non-finite|inf"),
        (lambda p: torch.rand(p.shape).tolist(), TypeError, r"must be a tensor, got list"),
        (lambda p: 1.0, TypeError, r"must be a tensor, got float"),
        (lambda p: torch.ones(p.shape, dtype=torch.int64), TypeError, r"floating point.*int64"),
        (lambda p: torch.ones(p.shape, dtype=torch.int32), TypeError, r"floating point.*int32"),
        (lambda p: torch.ones(p.shape, dtype=torch.bool), TypeError, r"floating point.*bool"),
    ],
    ids=["shape", "flat", "device", "negative", "one-negative", "nan", "inf", "-inf", "list", "float",
         "int64", "int32", "bool"],
)
@pytest.mark.parametrize("named", [False, True], ids=["by-param", "by-name"])
def test_consolidate_bad_fisher(make_bad, exc, match, named):
    model, opt = _trained(named=named)
    snap = Snapshot(opt, model.parameters())
    p = _first(model)
    key = "0.weight" if named else p
    label = r"'0\.weight'" if named else r"0 of param group 0 \(shape \(3, 4\)\)"
    with pytest.raises(exc, match=match) as info:
        opt.consolidate({key: make_bad(p)})
    # The message names the parameter.
    assert re.search(label, str(info.value)), str(info.value)
    snap.assert_unchanged()
    _no_ewc_state(opt, model.parameters())


def test_consolidate_fisher_key_not_owned(trained):
    model, opt, snap = trained
    stranger = nn.Parameter(torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"does not own.*shape \(3, 4\)"):
        opt.consolidate({stranger: torch.rand(3, 4)})
    # A copy of an owned parameter (same values, another tensor) is not owned either.
    with pytest.raises(ValueError, match=r"does not own"):
        opt.consolidate({_first(model).detach().clone(): torch.rand(3, 4)})
    snap.assert_unchanged()


def test_consolidate_unknown_name():
    model, opt = _trained(named=True)
    snap = Snapshot(opt, model.parameters())
    with pytest.raises(KeyError, match=r"unknown parameter name 'nope\.weight'.*known names.*'0\.weight'"):
        opt.consolidate({"nope.weight": torch.rand(3, 4)})
    snap.assert_unchanged()


def test_consolidate_name_without_names(trained):
    model, opt, snap = trained
    with pytest.raises(KeyError, match=r"'0\.weight'.*built without parameter names"):
        opt.consolidate({"0.weight": torch.rand(3, 4)})
    snap.assert_unchanged()


@pytest.mark.parametrize("key", [0, 1.5, None, ("a",)], ids=["int", "float", "None", "tuple"])
def test_consolidate_bad_key_type(trained, key):
    model, opt, snap = trained
    with pytest.raises(TypeError, match=r"keys must be parameter names or Parameters"):
        opt.consolidate({key: torch.rand(3, 4)})
    snap.assert_unchanged()


@pytest.mark.parametrize("fisher", [[torch.rand(3, 4)], torch.rand(3, 4), "fisher"], ids=["list", "tensor", "str"])
def test_consolidate_fisher_not_a_mapping(trained, fisher):
    model, opt, snap = trained
    with pytest.raises(TypeError, match=r"fisher must be a mapping"):
        opt.consolidate(fisher)
    snap.assert_unchanged()


def test_consolidate_same_parameter_twice():
    model, opt = _trained(named=True)
    snap = Snapshot(opt, model.parameters())
    p = _first(model)
    with pytest.raises(ValueError, match=r"two entries for parameter '0\.weight'"):
        opt.consolidate({"0.weight": torch.rand(3, 4), p: torch.rand(3, 4)})
    snap.assert_unchanged()


@pytest.mark.parametrize("mode", ["Multi", "offline", "", None, 1])
def test_consolidate_invalid_mode(trained, mode):
    model, opt, snap = trained
    with pytest.raises(ValueError, match=r"Invalid mode.*'multi' or 'online'"):
        opt.consolidate({_first(model): torch.rand(3, 4)}, mode=mode)
    snap.assert_unchanged()


@pytest.mark.parametrize("decay", [-0.1, 1.0001, 2, math.nan, math.inf, "0.5", torch.tensor(0.5)],
                         ids=["neg", "above1", "two", "nan", "inf", "str", "tensor"])
def test_consolidate_invalid_decay(trained, decay):
    model, opt, snap = trained
    with pytest.raises(ValueError, match=r"Invalid decay"):
        opt.consolidate({_first(model): torch.rand(3, 4)}, decay=decay)
    snap.assert_unchanged()


@pytest.mark.parametrize("decay", [0, 0.0, 0.5, 1, 1.0])
def test_consolidate_decay_bounds_accepted(trained, decay):
    model, opt, _ = trained
    opt.consolidate({_first(model): torch.rand(3, 4)}, decay=decay)
    opt.consolidate({_first(model): torch.rand(3, 4)}, decay=decay)
    assert "ewc_fisher" in opt.state[_first(model)]


def test_consolidate_none_without_fisher_ema(trained):
    model, opt, snap = trained
    with pytest.raises(ValueError, match=r"running Fisher.*fisher_ema"):
        opt.consolidate()
    with pytest.raises(ValueError, match=r"running Fisher.*fisher_ema"):
        opt.consolidate(None, mode="online")
    snap.assert_unchanged()


def test_consolidate_none_before_any_step():
    model = _model()
    opt = FusedEWCAdam(model.parameters(), fisher_ema=0.9, backend="torch")
    snap = Snapshot(opt, model.parameters())
    with pytest.raises(ValueError, match=r"running Fisher.*take steps first"):
        opt.consolidate()
    snap.assert_unchanged()
    assert len(opt.state) == 0


@pytest.mark.parametrize("named", [False, True], ids=["by-param", "by-name"])
@pytest.mark.parametrize(
    "bad",
    [lambda p: torch.rand(2, 2), lambda p: torch.full(p.shape, math.nan), lambda p: -torch.ones(p.shape), "unknown"],
    ids=["shape", "nan", "negative", "unknown-key"],
)
def test_consolidate_no_partial_update(named, bad):
    """Several good entries followed by a bad one: no parameter gets EWC state."""
    model, opt = _trained(named=named, fisher_ema=0.9)
    items = list(model.named_parameters())
    fisher = {(n if named else p): torch.rand_like(p) for n, p in items[:-1]}
    last_name, last = items[-1]
    if bad == "unknown":
        key = "nope" if named else nn.Parameter(torch.randn(2))
        fisher[key] = torch.rand(2)
        exc = KeyError if named else ValueError
    else:
        fisher[last_name if named else last] = bad(last)
        exc = ValueError
    snap = Snapshot(opt, model.parameters())
    with pytest.raises(exc):
        opt.consolidate(fisher)
    snap.assert_unchanged()
    _no_ewc_state(opt, model.parameters())
    # And the good part alone is accepted afterwards.
    del fisher[list(fisher)[-1]]
    opt.consolidate(fisher)
    assert all("ewc_fisher" in opt.state[p] for _, p in items[:-1])
    assert "ewc_fisher" not in opt.state[last]


@pytest.mark.parametrize("backend", BACKENDS)
def test_consolidate_frozen_parameter_skipped(backend):
    model = _model()
    frozen = model[0].bias
    frozen.requires_grad_(False)
    opt = FusedEWCAdam(model.named_parameters(), lr=1e-2, backend=backend)
    for _ in range(2):
        _set_grads(model.parameters())
        opt.step()
    before = frozen.detach().clone()
    fisher = {n: torch.rand_like(p) for n, p in model.named_parameters()}
    opt.consolidate(fisher)  # no error
    assert len(opt.state.get(frozen, {})) == 0
    for n, p in model.named_parameters():
        if p is not frozen:
            assert "ewc_fisher" in opt.state[p], n
    # Keyed by the Parameter as well.
    opt.consolidate({frozen: torch.rand_like(frozen)})
    assert len(opt.state.get(frozen, {})) == 0
    _set_grads(model.parameters())
    opt.step()
    assert torch.equal(frozen, before)
    assert len(opt.state.get(frozen, {})) == 0
    assert float(opt.ewc_penalty()) > 0


# ---------------------------------------------------------------------- constructor / param groups


@pytest.mark.parametrize(
    "value, match",
    [(-1.0, r"-1\.0"), (-1e-12, r"-1e-12"), (math.nan, r"nan"), (math.inf, r"inf"), ("1.0", r"'1\.0'"),
     (None, r"None"), (torch.tensor(1.0), r"tensor")],
    ids=["neg", "tiny-neg", "nan", "inf", "str", "None", "tensor"],
)
def test_constructor_bad_ewc_lambda(value, match):
    with pytest.raises(ValueError, match=r"Invalid ewc_lambda: .*" + match + r".*finite float >= 0"):
        FusedEWCAdam(_params(), ewc_lambda=value)


@pytest.mark.parametrize("value", [0, 0.0, 1, 1e6])
def test_constructor_good_ewc_lambda(value):
    FusedEWCAdam(_params(), ewc_lambda=value)


@pytest.mark.parametrize("value", [1.0, 1, -0.1, 2, math.nan, "0.9", torch.tensor(0.9)],
                         ids=["one", "int-one", "neg", "two", "nan", "str", "tensor"])
def test_constructor_bad_fisher_ema(value):
    with pytest.raises(ValueError, match=r"Invalid fisher_ema: .*None or a float in \[0, 1\)"):
        FusedEWCAdam(_params(), fisher_ema=value)


@pytest.mark.parametrize("value", [None, 0.0, 0, 0.5, 0.999])
def test_constructor_good_fisher_ema(value):
    FusedEWCAdam(_params(), fisher_ema=value)


@pytest.mark.parametrize(
    "extra, match",
    [({"ewc_lambda": -1.0}, r"Invalid ewc_lambda in param group 1: -1\.0"),
     ({"ewc_lambda": "big"}, r"Invalid ewc_lambda in param group 1: 'big'"),
     ({"ewc_lambda": math.nan}, r"Invalid ewc_lambda in param group 1: nan"),
     ({"fisher_ema": 1.0}, r"Invalid fisher_ema in param group 1: 1\.0"),
     ({"fisher_ema": -0.1}, r"Invalid fisher_ema in param group 1: -0\.1"),
     ({"fisher_ema": 2}, r"Invalid fisher_ema in param group 1: 2")],
)
def test_add_param_group_bad_ewc_values(extra, match):
    ps = _params()
    opt = FusedEWCAdam(ps[:2], lr=1e-2, backend="torch")
    _set_grads(ps[:2])
    opt.step()
    snap = Snapshot(opt, ps)
    groups_before = copy.deepcopy(opt.param_groups)
    with pytest.raises(ValueError, match=match):
        opt.add_param_group({"params": [ps[2]], **extra})
    assert len(opt.param_groups) == 1
    assert_same_state(groups_before, opt.param_groups, "param_groups")
    snap.assert_unchanged()
    # The optimizer still works, and the parameter can be added with good values.
    opt.add_param_group({"params": [ps[2]], "ewc_lambda": 3.0, "fisher_ema": 0.5})
    assert opt.param_groups[1]["ewc_lambda"] == 3.0 and opt.param_groups[1]["fisher_ema"] == 0.5


@pytest.mark.parametrize(
    "group, match",
    [({"ewc_lambda": -2.0}, r"Invalid ewc_lambda in param group 0: -2\.0"),
     ({"fisher_ema": 1.5}, r"Invalid fisher_ema in param group 0: 1\.5")],
)
def test_constructor_bad_group_values(group, match):
    ps = _params()
    with pytest.raises(ValueError, match=match):
        FusedEWCAdam([{"params": ps[:2], **group}, {"params": ps[2:]}])


def test_constructor_bad_value_in_second_group():
    ps = _params()
    with pytest.raises(ValueError, match=r"Invalid ewc_lambda in param group 1: -1"):
        FusedEWCAdam([{"params": ps[:2]}, {"params": ps[2:], "ewc_lambda": -1}])


@pytest.mark.parametrize(
    "kw, match",
    [({"lr": -1e-3}, r"Invalid learning rate: -0\.001"),
     ({"eps": -1e-8}, r"Invalid epsilon value: -1e-08"),
     ({"betas": (1.0, 0.999)}, r"Invalid beta parameter at index 0: 1\.0"),
     ({"betas": (-0.1, 0.999)}, r"Invalid beta parameter at index 0: -0\.1"),
     ({"betas": (0.9, 1.0)}, r"Invalid beta parameter at index 1: 1\.0"),
     ({"betas": (0.9, -0.5)}, r"Invalid beta parameter at index 1: -0\.5"),
     ({"weight_decay": -0.1}, r"Invalid weight_decay value: -0\.1")],
)
def test_constructor_bad_adam_hyperparameters_as_torch(kw, match):
    with pytest.raises(ValueError, match=match):
        torch.optim.Adam(_params(), **kw)
    with pytest.raises(ValueError, match=match):
        FusedEWCAdam(_params(), **kw)


def test_constructor_differentiable_not_implemented():
    with pytest.raises(NotImplementedError, match=r"differentiable=True"):
        FusedEWCAdam(_params(), differentiable=True)


# (ids avoid the bare word "cuda": conftest skips tests with that keyword on CPU-only machines)
@pytest.mark.parametrize("backend", ["cuda", "Triton", "", None, "pytorch"],
                         ids=["str-cuda", "Triton", "empty", "None", "pytorch"])
def test_constructor_invalid_backend(backend):
    with pytest.raises(ValueError, match=r"Invalid backend: .*expected one of"):
        FusedEWCAdam(_params(), backend=backend)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.complex64, "float32"])
def test_constructor_invalid_ewc_dtype(dtype):
    with pytest.raises(ValueError, match=r"Invalid ewc_dtype"):
        FusedEWCAdam(_params(), ewc_dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_constructor_valid_ewc_dtype(dtype):
    FusedEWCAdam(_params(), ewc_dtype=dtype)


def test_constructor_complex_parameter():
    ps = _params() + [nn.Parameter(torch.randn(3, dtype=torch.complex64))]
    with pytest.raises(ValueError, match=r"complex parameters \(parameter 3 in param group 0, dtype torch\.complex64\)"):
        FusedEWCAdam(ps)
    opt = FusedEWCAdam(_params())
    snap_groups = len(opt.param_groups)
    with pytest.raises(ValueError, match=r"complex parameters \(parameter 0 in param group 1"):
        opt.add_param_group({"params": nn.Parameter(torch.randn(2, dtype=torch.complex128))})
    assert len(opt.param_groups) == snap_groups


def test_constructor_fused_and_foreach_as_torch():
    match = r"`fused` and `foreach` cannot be `True` together"
    with pytest.raises(RuntimeError, match=match):
        torch.optim.Adam(_params(), fused=True, foreach=True)
    with pytest.raises(RuntimeError, match=match):
        FusedEWCAdam(_params(), fused=True, foreach=True)


# ---------------------------------------------------------------------- step()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("first_step", [True, False], ids=["fresh", "after-steps"])
def test_step_sparse_grad(backend, first_step):
    ps = _params()
    opt = FusedEWCAdam(ps, lr=1e-2, backend=backend, fisher_ema=0.9)
    if not first_step:
        _set_grads(ps)
        opt.step()
        opt.consolidate({p: torch.rand_like(p) for p in ps})
    _set_grads(ps)
    # The sparse gradient is on the last parameter: the others come first in the group.
    ps[2].grad = _grad(ps[2]).to_sparse()
    snap = Snapshot(opt, ps)
    with pytest.raises(RuntimeError, match=r"sparse"):
        opt.step()
    snap.assert_unchanged()
    if first_step:
        assert len(opt.state) == 0 or all(len(opt.state[p]) == 0 for p in ps)


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_sparse_grad_in_later_group(backend):
    ps = _params()
    opt = FusedEWCAdam([{"params": ps[:2]}, {"params": ps[2:]}], lr=1e-2, backend=backend)
    _set_grads(ps)
    opt.step()
    _set_grads(ps)
    ps[2].grad = ps[2].grad.to_sparse()
    snap = Snapshot(opt, ps)
    with pytest.raises(RuntimeError, match=r"sparse"):
        opt.step()
    snap.assert_unchanged()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "key, value, match",
    [("ewc_lambda", -1, r"Invalid ewc_lambda in param group 1: -1"),
     ("ewc_lambda", math.nan, r"Invalid ewc_lambda in param group 1: nan"),
     ("ewc_lambda", "1", r"Invalid ewc_lambda in param group 1: '1'"),
     ("fisher_ema", 1.0, r"Invalid fisher_ema in param group 1: 1\.0"),
     ("fisher_ema", -0.5, r"Invalid fisher_ema in param group 1: -0\.5")],
)
def test_step_group_value_set_bad_after_construction(backend, key, value, match):
    ps = _params()
    opt = FusedEWCAdam([{"params": ps[:2]}, {"params": ps[2:]}], lr=1e-2, backend=backend, fisher_ema=0.9)
    _set_grads(ps)
    opt.step()
    opt.consolidate({p: torch.rand_like(p) for p in ps})
    _set_grads(ps)
    snap = Snapshot(opt, ps)
    # Group 0 is fine and comes first: it must not be stepped either.
    opt.param_groups[1][key] = value
    snap.sd["param_groups"][1][key] = value
    with pytest.raises(ValueError, match=match):
        opt.step()
    snap.assert_unchanged()


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_ewc_lambda_minus_one_group0(backend):
    ps = _params()
    opt = FusedEWCAdam(ps, lr=1e-2, backend=backend)
    _set_grads(ps)
    opt.step()
    opt.consolidate({p: torch.rand_like(p) for p in ps})
    _set_grads(ps)
    opt.param_groups[0]["ewc_lambda"] = -1
    snap = Snapshot(opt, ps)
    with pytest.raises(ValueError, match=r"Invalid ewc_lambda in param group 0: -1"):
        opt.step()
    snap.assert_unchanged()
    # Fixing the value lets the step go on.
    opt.param_groups[0]["ewc_lambda"] = 1.0
    opt.step()
    assert not torch.equal(ps[0], snap.values[0])


@pytest.mark.parametrize("first_step", [True, False], ids=["fresh", "after-steps"])
def test_step_triton_cpu_without_interpreter(monkeypatch, first_step):
    ps = _params()
    opt = FusedEWCAdam(ps, lr=1e-2, backend="triton", fisher_ema=0.9)
    if not first_step:
        _set_grads(ps)
        opt.step()  # interpreter on (conftest): fine
        opt.consolidate({p: torch.rand_like(p) for p in ps})
    _set_grads(ps)
    snap = Snapshot(opt, ps)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"backend='triton' needs CUDA.*cpu"):
        opt.step()
    snap.assert_unchanged()
    if first_step:
        assert all(len(opt.state.get(p, {})) == 0 for p in ps)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    opt.step()
    assert not torch.equal(ps[0], snap.values[0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("consolidated", [False, True], ids=["plain", "ewc"])
def test_step_grad_none_skipped(backend, consolidated):
    """As in torch: a parameter whose grad is None is neither stepped nor given state,
    even when it has EWC state (the penalty rides on the gradient)."""
    ps = _params()
    opt = FusedEWCAdam(ps, lr=1e-2, backend=backend, fisher_ema=0.9, amsgrad=True)
    ref = torch.optim.Adam([p.detach().clone().requires_grad_() for p in ps], lr=1e-2, amsgrad=True)
    if consolidated:
        _set_grads(ps)
        opt.step()
        opt.consolidate({p: torch.rand_like(p) + 0.5 for p in ps})
        # Move ps[1] off its anchor so a penalty gradient would move it.
        with torch.no_grad():
            ps[1].add_(1.0)
    before = [p.detach().clone() for p in ps]
    state1 = copy.deepcopy(dict(opt.state.get(ps[1], {})))
    for _ in range(3):
        ps[0].grad, ps[1].grad, ps[2].grad = _grad(ps[0]), None, _grad(ps[2])
        opt.step()
    assert torch.equal(ps[1], before[1])
    assert not torch.equal(ps[0], before[0]) and not torch.equal(ps[2], before[2])
    if consolidated:
        assert_same_state(state1, dict(opt.state[ps[1]]), "state of the skipped parameter")
    else:
        assert len(opt.state.get(ps[1], {})) == 0
        # torch.optim.Adam does the same.
        rp = ref.param_groups[0]["params"]
        for _ in range(2):
            rp[0].grad, rp[1].grad, rp[2].grad = _grad(rp[0]), None, _grad(rp[2])
            ref.step()
        assert len(ref.state.get(rp[1], {})) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_all_grads_none(backend):
    ps = _params()
    opt = FusedEWCAdam(ps, lr=1e-2, backend=backend)
    snap = Snapshot(opt, ps)
    opt.step()
    snap.assert_unchanged()
    assert all(len(opt.state.get(p, {})) == 0 for p in ps)
