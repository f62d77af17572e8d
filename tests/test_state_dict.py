"""Checkpoints: FusedEWCAdam's state_dict round-trips bit for bit, is compatible with
torch.optim.Adam's both ways, keeps the EWC state in ewc_dtype, refuses the state of
another model, and works with named parameters.

backend="triton" runs in the Triton interpreter on CPU tensors (tests/conftest.py),
so the models are tiny.
"""
import copy
import io

import pytest
import torch
from torch import nn

from ewc_fused import FusedEWCAdam
from tests.helpers import assert_same_state

BACKENDS = ["torch", "triton"]
ADAM_KEYS = {"step", "exp_avg", "exp_avg_sq"}
EWC_KEYS = {"ewc_fisher", "ewc_anchor", "ewc_const"}
EMA_KEYS = {"fisher_ema", "fisher_ema_step"}


# ---------------------------------------------------------------------- helpers


def _grad(p):
    """A random gradient with magnitude in [0.5, 1.5) and random sign: never zero."""
    mag = torch.rand(p.shape) + 0.5
    return torch.where(torch.rand(p.shape) < 0.5, -mag, mag).to(p.dtype)


def _grads(params):
    return [_grad(p) for p in params]


def _apply(params, grads):
    for p, g in zip(params, grads):
        p.grad = g.clone()


def _model(dtype=torch.float32):
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).to(dtype)


def _train(opt, params, steps):
    for _ in range(steps):
        _apply(params, _grads(params))
        opt.step()


def _continue_both(opt_a, params_a, opt_b, params_b, steps):
    """Step both optimizers ``steps`` times with the same gradients."""
    for _ in range(steps):
        gs = _grads(params_a)
        _apply(params_a, gs)
        _apply(params_b, gs)
        opt_a.step()
        opt_b.step()


def _ewc_setup(backend, named=False, amsgrad=True, fisher_ema=0.9, steps=3):
    """A model trained a few steps, consolidated with a random Fisher, trained on."""
    model = _model()
    params = list(model.parameters())
    opt = FusedEWCAdam(model.named_parameters() if named else params, lr=1e-2, amsgrad=amsgrad,
                       fisher_ema=fisher_ema, ewc_lambda=3.0, backend=backend)
    _train(opt, params, steps)
    if named:
        opt.consolidate({n: torch.rand_like(p) for n, p in model.named_parameters()})
    else:
        opt.consolidate({p: torch.rand_like(p) for p in params})
    _train(opt, params, 2)
    return model, params, opt


def _fresh_copy(model, backend, named=False, **kw):
    model2 = copy.deepcopy(model)
    params2 = list(model2.parameters())
    opt2 = FusedEWCAdam(model2.named_parameters() if named else params2, lr=1e-2, backend=backend, **kw)
    return model2, params2, opt2


def _assert_same_run(params_a, opt_a, params_b, opt_b):
    for pa, pb in zip(params_a, params_b):
        assert torch.equal(pa, pb)
    assert torch.equal(opt_a.ewc_penalty(), opt_b.ewc_penalty())
    rf_a, rf_b = opt_a.running_fisher(), opt_b.running_fisher()
    assert len(rf_a) == len(rf_b) == len(params_a)
    for (ka, fa), (kb, fb) in zip(rf_a.items(), rf_b.items()):
        assert torch.equal(fa, fb)


def _roundtrip_io(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# ---------------------------------------------------------------------- round trip


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("via", ["memory", "torch.save"])
def test_round_trip_bit_identical(backend, via):
    model, params, opt = _ewc_setup(backend)
    sd = opt.state_dict()
    if via == "torch.save":
        sd = _roundtrip_io(sd)
    else:
        sd = copy.deepcopy(sd)
    # The fresh optimizer gets the same hyperparameters through the loaded param groups.
    _, params2, opt2 = _fresh_copy(model, backend)
    opt2.load_state_dict(sd)
    assert opt2.param_groups[0]["amsgrad"] is True
    assert opt2.param_groups[0]["fisher_ema"] == 0.9
    assert opt2.param_groups[0]["ewc_lambda"] == 3.0
    assert_same_state(opt.state_dict(), opt2.state_dict())
    _assert_same_run(params, opt, params2, opt2)

    _continue_both(opt, params, opt2, params2, 4)
    _assert_same_run(params, opt, params2, opt2)
    assert float(opt.ewc_penalty()) > 0

    # A second task from the running Fisher, then more steps: still identical.
    opt.consolidate()
    opt2.consolidate()
    _continue_both(opt, params, opt2, params2, 3)
    _assert_same_run(params, opt, params2, opt2)
    assert_same_state(opt.state_dict(), opt2.state_dict())


@pytest.mark.parametrize("backend", BACKENDS)
def test_round_trip_online_mode_and_group_values(backend):
    """Per-group ewc_lambda/fisher_ema set after construction survive the round trip."""
    model = _model()
    params = list(model.parameters())
    opt = FusedEWCAdam([{"params": params[:2], "ewc_lambda": 5.0}, {"params": params[2:], "fisher_ema": 0.5}],
                       lr=1e-2, backend=backend, fisher_ema=0.9)
    _train(opt, params, 2)
    opt.consolidate({p: torch.rand_like(p) for p in params}, mode="online")
    _train(opt, params, 1)
    opt.consolidate(mode="online", decay=0.5)
    opt.param_groups[1]["ewc_lambda"] = 0.25
    sd = _roundtrip_io(opt.state_dict())
    params2 = list(copy.deepcopy(model).parameters())
    opt2 = FusedEWCAdam([{"params": params2[:2]}, {"params": params2[2:]}], lr=1e-2, backend=backend)
    opt2.load_state_dict(sd)
    assert [g["ewc_lambda"] for g in opt2.param_groups] == [5.0, 0.25]
    assert [g["fisher_ema"] for g in opt2.param_groups] == [0.9, 0.5]
    _continue_both(opt, params, opt2, params2, 3)
    _assert_same_run(params, opt, params2, opt2)


# ---------------------------------------------------------------------- keys


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("fisher_ema", [None, 0.9])
def test_state_dict_keys(amsgrad, fisher_ema):
    model = _model()
    params = list(model.parameters())
    opt = FusedEWCAdam(params, lr=1e-2, amsgrad=amsgrad, fisher_ema=fisher_ema, ewc_lambda=2.0, backend="torch")
    ref = torch.optim.Adam(copy.deepcopy(params), lr=1e-2, amsgrad=amsgrad)
    _train(opt, params, 2)
    _train(ref, ref.param_groups[0]["params"], 2)

    adam_keys = ADAM_KEYS | ({"max_exp_avg_sq"} if amsgrad else set())
    ema_keys = EMA_KEYS if fisher_ema is not None else set()
    sd = opt.state_dict()
    ref_sd = ref.state_dict()
    assert set(sd["state"]) == set(ref_sd["state"]) == set(range(len(params)))
    for i, st in sd["state"].items():
        assert set(ref_sd["state"][i]) == adam_keys
        assert set(st) == adam_keys | ema_keys
        for k in adam_keys:
            assert st[k].dtype == ref_sd["state"][i][k].dtype, k
            assert st[k].shape == ref_sd["state"][i][k].shape, k

    # Param groups: torch's keys plus the EWC ones.
    (g,) = sd["param_groups"]
    (rg,) = ref_sd["param_groups"]
    assert set(g) == set(rg) | {"ewc_lambda", "fisher_ema"}
    assert g["ewc_lambda"] == 2.0 and g["fisher_ema"] == fisher_ema
    for k in rg:
        assert g[k] == rg[k], k

    opt.consolidate({p: torch.rand_like(p) for p in params})
    sd = opt.state_dict()
    for i, st in sd["state"].items():
        assert set(st) == adam_keys | ema_keys | EWC_KEYS
        p = params[i]
        assert st["ewc_fisher"].shape == p.shape and st["ewc_anchor"].shape == p.shape
        assert st["ewc_const"].dim() == 0
        if fisher_ema is not None:
            assert st["fisher_ema"].shape == p.shape and st["fisher_ema_step"].dim() == 0
            assert float(st["fisher_ema_step"]) == 2

    # And through torch.save / weights_only load, unchanged.
    assert_same_state(sd, _roundtrip_io(sd))


def test_state_dict_keys_before_step():
    params = list(_model().parameters())
    opt = FusedEWCAdam(params, fisher_ema=0.9)
    sd = opt.state_dict()
    assert sd["state"] == {}
    assert sd["param_groups"][0]["ewc_lambda"] == 1.0 and sd["param_groups"][0]["fisher_ema"] == 0.9


# ---------------------------------------------------------------------- torch.optim.Adam <-> FusedEWCAdam


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("amsgrad", [False, True])
def test_torch_adam_checkpoint_into_fused(backend, amsgrad):
    model = _model()
    params = list(model.parameters())
    adam = torch.optim.Adam(params, lr=1e-2, amsgrad=amsgrad, weight_decay=0.01)
    _train(adam, params, 3)
    sd = _roundtrip_io(adam.state_dict())

    model2 = copy.deepcopy(model)
    params2 = list(model2.parameters())
    ours = FusedEWCAdam(params2, lr=0.5, backend=backend)  # lr etc. come from the checkpoint
    ours.load_state_dict(sd)
    g = ours.param_groups[0]
    assert g["lr"] == 1e-2 and g["amsgrad"] is amsgrad and g["weight_decay"] == 0.01
    assert g["ewc_lambda"] == 1.0 and g["fisher_ema"] is None

    _continue_both(adam, params, ours, params2, 4)
    for p, q in zip(params, params2):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=0)
    for p, q in zip(params, params2):
        for k in adam.state[p]:
            if k == "step":
                assert float(ours.state[q][k]) == float(adam.state[p][k]) == 7
            else:
                # m and v are sums of O(1) terms that may cancel: an absolute tolerance of a
                # few fp32 ulps of 1 (the triton kernel rounds the EMA differently from lerp).
                torch.testing.assert_close(ours.state[q][k], adam.state[p][k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_adam_checkpoint_into_fused_then_consolidate(backend):
    """After loading torch Adam's state, EWC works (and the running Fisher starts)."""
    model = _model()
    params = list(model.parameters())
    adam = torch.optim.Adam(params, lr=1e-2)
    _train(adam, params, 2)
    model2 = copy.deepcopy(model)
    params2 = list(model2.parameters())
    ours = FusedEWCAdam(model2.named_parameters(), lr=1e-2, backend=backend, fisher_ema=0.9)
    ours.load_state_dict(adam.state_dict())
    assert ours.param_groups[0]["fisher_ema"] == 0.9  # defaults fill the missing EWC keys
    _train(ours, params2, 2)
    assert set(ours.running_fisher()) == {n for n, _ in model2.named_parameters()}
    ours.consolidate()
    assert float(ours.ewc_penalty()) == 0.0
    _train(ours, params2, 2)
    assert float(ours.ewc_penalty()) > 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("amsgrad", [False, True])
def test_fused_checkpoint_into_torch_adam(backend, amsgrad):
    model = _model()
    params = list(model.parameters())
    ours = FusedEWCAdam(params, lr=1e-2, amsgrad=amsgrad, weight_decay=0.01, backend=backend)
    _train(ours, params, 3)
    sd = _roundtrip_io(ours.state_dict())

    model2 = copy.deepcopy(model)
    params2 = list(model2.parameters())
    adam = torch.optim.Adam(params2, lr=0.5)
    adam.load_state_dict(sd)
    assert adam.param_groups[0]["lr"] == 1e-2 and adam.param_groups[0]["amsgrad"] is amsgrad

    _continue_both(ours, params, adam, params2, 4)
    for p, q in zip(params, params2):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=0)


@pytest.mark.parametrize("direction", ["adam-to-ours", "ours-to-adam"])
def test_torch_backend_checkpoint_exact_vs_fused_torch_adam(direction):
    """Without EWC state the torch backend is torch.optim.Adam(fused=True) on the CPU,
    bit for bit, across a checkpoint in either direction."""
    model = _model()
    params = list(model.parameters())
    params2 = list(copy.deepcopy(model).parameters())
    kw = dict(lr=1e-2, amsgrad=True, weight_decay=0.01)

    def ours(ps):
        return FusedEWCAdam(ps, backend="torch", **kw)

    def adam(ps):
        return torch.optim.Adam(ps, fused=True, **kw)

    first, second = (adam, ours) if direction == "adam-to-ours" else (ours, adam)
    a = first(params)
    _train(a, params, 3)
    with torch.no_grad():
        for p, q in zip(params, params2):
            q.copy_(p)
    b = second(params2)
    b.load_state_dict(_roundtrip_io(a.state_dict()))
    # Loading replaces the group's options, "fused" included (None from ours).
    b.param_groups[0]["fused"] = True
    _continue_both(a, params, b, params2, 4)
    for p, q in zip(params, params2):
        assert torch.equal(p, q)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_checkpoint_with_ewc_into_torch_adam(backend):
    model, params, ours = _ewc_setup(backend)
    sd = _roundtrip_io(ours.state_dict())
    model2 = copy.deepcopy(model)
    params2 = list(model2.parameters())
    adam = torch.optim.Adam(params2, lr=1e-2, amsgrad=True)
    adam.load_state_dict(sd)  # no error: torch ignores the EWC keys
    before = [p.detach().clone() for p in params2]
    _train(adam, params2, 2)  # and steps
    assert all(not torch.equal(p, b) for p, b in zip(params2, before))
    assert all(float(adam.state[p]["step"]) == 7 for p in params2)


# ---------------------------------------------------------------------- EWC state dtype


@pytest.mark.parametrize("backend", BACKENDS)
def test_ewc_state_dtype_kept_on_load(backend):
    model = _model(torch.bfloat16)
    params = list(model.parameters())
    opt = FusedEWCAdam(params, lr=1e-2, ewc_dtype=torch.float32, fisher_ema=0.9, backend=backend)
    _train(opt, params, 2)
    # A Fisher with values bf16 cannot hold (fp32 state must not be rounded on load).
    opt.consolidate({p: torch.rand(p.shape, dtype=torch.float32) for p in params})
    _train(opt, params, 2)
    for p in params:
        assert opt.state[p]["ewc_fisher"].dtype == torch.float32
        assert opt.state[p]["exp_avg"].dtype == torch.bfloat16

    sd = _roundtrip_io(opt.state_dict())
    model2 = copy.deepcopy(model)
    params2 = list(model2.parameters())
    opt2 = FusedEWCAdam(params2, lr=1e-2, ewc_dtype=torch.float32, backend=backend)
    opt2.load_state_dict(sd)
    for p, q in zip(params, params2):
        st, st2 = opt.state[p], opt2.state[q]
        for k in ("ewc_fisher", "ewc_anchor", "fisher_ema"):
            assert st2[k].dtype == torch.float32, k
            assert torch.equal(st2[k], st[k]), k
        assert st2["ewc_const"].dtype == st["ewc_const"].dtype and torch.equal(st2["ewc_const"], st["ewc_const"])
        assert st2["fisher_ema_step"].dtype == st["fisher_ema_step"].dtype
        assert torch.equal(st2["fisher_ema_step"], st["fisher_ema_step"])
        # Adam's own state follows the parameter, as in torch.
        assert st2["exp_avg"].dtype == torch.bfloat16

    # torch's own loader casts the EWC tensors to bf16; ours must not.
    plain = torch.optim.Adam(copy.deepcopy(params), lr=1e-2)
    plain.load_state_dict(copy.deepcopy(sd))
    assert any(s["ewc_fisher"].dtype == torch.bfloat16 for s in plain.state.values())

    _continue_both(opt, params, opt2, params2, 3)
    for p, q in zip(params, params2):
        assert torch.equal(p, q)
    assert torch.equal(opt.ewc_penalty(), opt2.ewc_penalty())


# ---------------------------------------------------------------------- another model's state


def _other_model_sd(with_ewc):
    """State of a model with the same number of parameters but other shapes."""
    other = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 5))
    params = list(other.parameters())
    opt = FusedEWCAdam(params, lr=1e-2, fisher_ema=0.9, backend="torch")
    _train(opt, params, 2)
    if with_ewc:
        opt.consolidate({p: torch.rand_like(p) for p in params})
    return opt.state_dict()


@pytest.mark.parametrize("with_ewc", [False, True], ids=["adam-state", "ewc-state"])
@pytest.mark.parametrize("trained", [False, True], ids=["fresh", "trained"])
def test_load_other_model_state_raises(with_ewc, trained):
    model = _model()
    params = list(model.parameters())
    opt = FusedEWCAdam(params, lr=3e-3, fisher_ema=0.5, ewc_lambda=7.0, backend="torch")
    if trained:
        _train(opt, params, 2)
        opt.consolidate({p: torch.rand_like(p) for p in params})
    before_sd = copy.deepcopy(opt.state_dict())
    before_groups = copy.deepcopy(opt.param_groups)
    before_params = [p.detach().clone() for p in params]
    other = _other_model_sd(with_ewc)
    assert len(other["state"]) == len(params)

    with pytest.raises(ValueError, match=r"shape"):
        opt.load_state_dict(other)
    assert_same_state(before_sd, opt.state_dict())
    assert_same_state(before_groups, opt.param_groups, "param_groups")
    for p, b in zip(params, before_params):
        assert torch.equal(p, b)
    # The optimizer still works.
    _train(opt, params, 1)


def test_load_other_model_state_only_ewc_mismatch():
    """Adam state of the right shape but EWC state of another model: refused too."""
    model = _model()
    params = list(model.parameters())
    opt = FusedEWCAdam(params, lr=1e-2, backend="torch")
    _train(opt, params, 1)
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0]["ewc_fisher"] = torch.rand(4, 3)
    sd["state"][0]["ewc_anchor"] = torch.rand(4, 3)
    sd["state"][0]["ewc_const"] = torch.zeros((), dtype=torch.float64)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=r"ewc_fisher of shape \(4, 3\).*shape \(3, 4\)"):
        opt.load_state_dict(sd)
    assert_same_state(before, opt.state_dict())


def test_load_wrong_group_structure_raises():
    model = _model()
    params = list(model.parameters())
    opt = FusedEWCAdam(params, lr=1e-2, backend="torch")
    _train(opt, params, 1)
    before = copy.deepcopy(opt.state_dict())
    two = FusedEWCAdam([{"params": params[:2]}, {"params": params[2:]}], lr=1e-2)
    with pytest.raises(ValueError, match=r"number of parameter groups"):
        opt.load_state_dict(two.state_dict())
    short = FusedEWCAdam(params[:3], lr=1e-2)
    with pytest.raises(ValueError, match=r"doesn't match the size"):
        opt.load_state_dict(short.state_dict())
    assert_same_state(before, opt.state_dict())


# ---------------------------------------------------------------------- named parameters


@pytest.mark.parametrize("backend", BACKENDS)
def test_named_round_trip_and_consolidate_after_load(backend):
    model, params, opt = _ewc_setup(backend, named=True)
    sd = _roundtrip_io(opt.state_dict())
    names = [n for n, _ in model.named_parameters()]
    assert sd["param_groups"][0]["param_names"] == names

    model2, params2, opt2 = _fresh_copy(model, backend, named=True)
    opt2.load_state_dict(sd)
    assert opt2.param_groups[0]["param_names"] == names
    assert list(opt2.running_fisher()) == names
    _continue_both(opt, params, opt2, params2, 2)
    _assert_same_run(params, opt, params2, opt2)

    fisher = {n: torch.rand_like(p) for n, p in model.named_parameters()}
    opt.consolidate(fisher)
    opt2.consolidate({n: f.clone() for n, f in fisher.items()})
    _continue_both(opt, params, opt2, params2, 2)
    _assert_same_run(params, opt, params2, opt2)
    assert_same_state(opt.state_dict(), opt2.state_dict())


def test_named_checkpoint_into_unnamed_optimizer():
    """torch keeps the loaded param_names; the optimizer then takes name keys."""
    model, params, opt = _ewc_setup("torch", named=True)
    sd = opt.state_dict()
    model2, params2, opt2 = _fresh_copy(model, "torch", named=False, amsgrad=True, fisher_ema=0.9)
    opt2.load_state_dict(sd)
    opt2.consolidate({"0.weight": torch.rand(3, 4)})
    assert "ewc_fisher" in opt2.state[params2[0]]


# ---------------------------------------------------------------------- edge cases


def test_consolidate_before_any_step_checkpoint_into_torch_adam():
    """A fresh optimizer that consolidates a Fisher it was given (e.g. task A's, for a
    new run on task B) before its first step still writes a checkpoint that
    torch.optim.Adam can load and continue from, with torch's per-parameter keys."""
    model = _model()
    params = list(model.parameters())
    ours = FusedEWCAdam(params, lr=1e-2, backend="torch")
    ours.consolidate({p: torch.rand_like(p) for p in params})
    sd = _roundtrip_io(ours.state_dict())

    params2 = list(copy.deepcopy(model).parameters())
    params3 = list(copy.deepcopy(model).parameters())
    adam = torch.optim.Adam(params2, lr=1e-2)
    adam.load_state_dict(copy.deepcopy(sd))  # torch's loader keeps (and steps) sd's tensors
    fresh = torch.optim.Adam(params3, lr=1e-2)
    _continue_both(adam, params2, fresh, params3, 2)
    for p, q in zip(params2, params3):
        assert torch.equal(p, q)

    for st in sd["state"].values():
        assert ADAM_KEYS | EWC_KEYS <= set(st)

    # And FusedEWCAdam itself resumes from it as from the live optimizer.
    params4 = list(copy.deepcopy(model).parameters())
    ours2 = FusedEWCAdam(params4, lr=1e-2, backend="torch")
    ours2.load_state_dict(copy.deepcopy(sd))
    _continue_both(ours, params, ours2, params4, 2)
    for p, q in zip(params, params4):
        assert torch.equal(p, q)
    assert torch.equal(ours.ewc_penalty(), ours2.ewc_penalty())


def test_load_state_dict_hooks_see_the_whole_state():
    """torch's load_state_dict pre-hooks (documented as the way to adapt a checkpoint
    whose parameters differ) and post-hooks see the EWC state as well."""
    model, params, opt = _ewc_setup("torch")
    sd = copy.deepcopy(opt.state_dict())

    # The same model, its parameters handed to the optimizer in reverse order.
    params2 = list(copy.deepcopy(model).parameters())[::-1]
    opt2 = FusedEWCAdam(params2, lr=1e-2, backend="torch")
    n = len(params2)
    seen_pre, seen_post = [], []

    def pre_hook(optimizer, state_dict):
        seen_pre.append(set(state_dict["state"][0]))
        state_dict["state"] = {j: state_dict["state"][n - 1 - j] for j in range(n)}
        return state_dict

    def post_hook(optimizer):
        seen_post.append(set(optimizer.state[params2[0]]))

    opt2.register_load_state_dict_pre_hook(pre_hook)
    opt2.register_load_state_dict_post_hook(post_hook)
    saved_state = sd["state"]
    opt2.load_state_dict(sd)
    # As torch: the hook gets a copy of the caller's dict, whose "state" stays the same
    # object (so the checkpoint can be loaded again, e.g. into a second optimizer).
    assert sd["state"] is saved_state and sd["state"][0]["exp_avg"].shape == (3, 4)

    assert EWC_KEYS <= seen_pre[0], f"pre-hook saw {seen_pre}"
    assert EWC_KEYS <= seen_post[0], f"post-hook saw {seen_post}"
    for p, q in zip(params, params2[::-1]):
        assert_same_state(dict(opt.state[p]), dict(opt2.state[q]))
    _continue_both(opt, params, opt2, params2[::-1], 2)
    for p, q in zip(params, params2[::-1]):
        assert torch.equal(p, q)
    assert torch.equal(opt.ewc_penalty(), opt2.ewc_penalty())


def test_ewc_state_keys_must_come_together():
    """A checkpoint with ewc_fisher but no anchor/constant would fail mid-step later: refused at load."""
    p = torch.nn.Parameter(torch.randn(6))
    opt = FusedEWCAdam([p], lr=1e-2, backend="torch")
    p.grad = torch.randn(6)
    opt.step()
    opt.consolidate({p: torch.rand(6)})
    sd = copy.deepcopy(opt.state_dict())
    del sd["state"][0]["ewc_anchor"]
    fresh_p = torch.nn.Parameter(p.detach().clone())
    fresh = FusedEWCAdam([fresh_p], lr=1e-2, backend="torch")
    with pytest.raises(ValueError, match="ewc_anchor"):
        fresh.load_state_dict(sd)
    assert len(fresh.state) == 0
