"""Faults: non-finite gradients under each ``nonfinite`` policy never change F, c, m, v or
the running Fisher silently; a checkpoint with a corrupt Fisher, or of another model, is
refused with the optimizer unchanged and still usable.

Already covered elsewhere (README "Failure policy and bad input"): skip and raise on a
whole non-finite batch (test_amp.py), a refused step's tracked sums (test_tracker.py),
GradScaler (test_amp.py), bad Fishers given to consolidate (test_bad_input.py), Fisher
files with NaN and a kill during save_fisher (test_fisher_io.py), checkpoints with other
shapes or group structure and torch.optim.Adam checkpoints both ways (test_state_dict.py).
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ewc_fused import FusedEWCAdam
from tests.helpers import assert_same_state

BACKENDS = ["torch", "triton"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))


def _batch(k):
    g = torch.Generator().manual_seed(10 + k)
    return torch.randn(8, 5, generator=g), torch.randint(0, 3, (8,), generator=g)


def _setup(backend, nonfinite):
    """A model with EWC consolidated, a running Fisher fed by the tracker, two steps taken."""
    model = _model()
    opt = FusedEWCAdam(model.named_parameters(), lr=1e-2, amsgrad=True, ewc_lambda=4.0, fisher_ema=0.9,
                       nonfinite=nonfinite, backend=backend)
    tracker = opt.track_fisher(model)
    for k in range(2):
        _step(model, opt, k)
        if k == 0:
            opt.consolidate()
    return model, opt, tracker


def _step(model, opt, k, poison=None, poison_input=False):
    opt.zero_grad()
    x, y = _batch(k)
    if poison_input:  # one NaN input: NaN in every gradient and every tracked sum
        x[0, 0] = math.nan
    F.cross_entropy(model(x), y).backward()
    if poison is not None:
        name, value = poison
        dict(model.named_parameters())[name].grad.view(-1)[1] = value
    opt.step()


class Snapshot:
    def __init__(self, model, opt):
        self.model, self.opt = model, opt
        self.sd = copy.deepcopy(opt.state_dict())
        self.params = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.penalty = opt.ewc_penalty()
        self.running = {k: v.clone() for k, v in opt.running_fisher().items()}

    def assert_unchanged(self):
        """Bit for bit, NaN equal to NaN (nonfinite="propagate" states hold NaN)."""
        _same(self.sd, self.opt.state_dict(), "state_dict")
        _same(self.params, {n: p.detach() for n, p in self.model.named_parameters()}, "parameters")
        _same(self.penalty, self.opt.ewc_penalty(), "penalty")
        _same(self.running, self.opt.running_fisher(), "running Fisher")


def _same(a, b, path):
    if isinstance(a, torch.Tensor):
        torch.testing.assert_close(b, a, rtol=0, atol=0, equal_nan=True, msg=path)
    elif isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            _same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{path}[{i}]")
    else:
        assert_same_state(a, b, path)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("policy", ["skip", "raise"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_one_nonfinite_element_changes_nothing_and_the_run_goes_on_as_without_it(backend, policy, value):
    """One bad element in one gradient (the others finite): θ, m, v, v̂max, F, c, K, the
    running Fisher and the step counts of every parameter stay as they were, the tracked
    sums of that batch are dropped, and the next step equals that of a run that never saw
    the bad batch, bit for bit."""
    model, opt, tracker = _setup(backend, policy)
    twin, twin_opt, twin_tracker = _setup(backend, policy)
    snap = Snapshot(model, opt)
    if policy == "raise":
        with pytest.raises(FloatingPointError, match=r"non-finite gradient .*'2\.weight'.*nothing was updated"):
            _step(model, opt, 2, poison=("2.weight", value))
    else:
        _step(model, opt, 2, poison=("2.weight", value))
        assert opt.skipped_steps == 1
    snap.assert_unchanged()
    assert tracker.samples == 0
    _step(model, opt, 3)
    _step(twin, twin_opt, 3)
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(p, q), n
    for o in (opt, twin_opt):
        for f in o.running_fisher().values():
            assert bool(torch.isfinite(f).all())
    tracker.remove()
    twin_tracker.remove()


@pytest.mark.parametrize("backend", BACKENDS)
def test_propagate_poisons_visibly_and_consolidate_refuses_it(backend):
    """nonfinite="propagate" (torch's behaviour): NaN reaches θ, m, v and the running Fisher,
    where it can be seen; consolidating that running Fisher is refused, naming the
    parameter, and changes nothing."""
    model, opt, tracker = _setup(backend, "propagate")
    _step(model, opt, 2, poison_input=True)
    assert not bool(torch.isfinite(model[0].bias).all())
    assert not bool(torch.isfinite(opt.state[model[0].bias]["exp_avg"]).all())
    assert not bool(torch.isfinite(opt.running_fisher()["0.bias"]).all())
    snap = Snapshot(model, opt)
    with pytest.raises(ValueError, match=r"'0\.weight'.*non-finite"):
        opt.consolidate()
    snap.assert_unchanged()
    tracker.remove()


def test_grad_scaler_decides_under_amp_whatever_the_policy():
    """Under GradScaler the scaler's found_inf rules: with nonfinite="raise" an inf step is
    skipped, not raised (the scaler lowers its scale and goes on), as documented."""
    m1, m2 = _model(), _model()
    o1 = FusedEWCAdam(m1.parameters(), lr=1e-2, nonfinite="raise", backend="torch")
    o2 = FusedEWCAdam(m2.parameters(), lr=1e-2, backend="torch")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    for k in range(3):
        x, y = _batch(k)
        o1.zero_grad()
        xb = x.clone()
        if k == 1:
            xb[0, 0] = math.inf
        scaler.scale(F.cross_entropy(m1(xb), y)).backward()
        scaler.step(o1)
        scaler.update()
        if k != 1:
            o2.zero_grad()
            F.cross_entropy(m2(x), y).backward()
            o2.step()
    assert scaler.get_scale() == 2.0 ** 7
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p, q)


# --------------------------------------------------------------------------- corrupt checkpoints


def _trained(backend="torch", named=False):
    model = _model()
    opt = FusedEWCAdam(model.named_parameters() if named else model.parameters(), lr=1e-2, ewc_lambda=2.0,
                       fisher_ema=0.9, backend=backend)
    for k in range(2):
        _step(model, opt, k)
    opt.consolidate({(n if named else p): torch.rand_like(p) for n, p in model.named_parameters()})
    _step(model, opt, 2)
    return model, opt


@pytest.mark.parametrize("value", [math.nan, math.inf, -1.0], ids=["nan", "inf", "negative"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_checkpoint_with_a_corrupt_fisher_is_refused(backend, value):
    """consolidate, save_fisher and load_fisher refuse such a Fisher; so does a checkpoint.
    The optimizer is unchanged and steps on exactly as one that never tried."""
    model, opt = _trained(backend)
    twin, twin_opt = _trained(backend)
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][2]["ewc_fisher"].view(-1)[4] = value
    snap = Snapshot(model, opt)
    with pytest.raises(ValueError, match=r"Fisher \(ewc_fisher\) with NaN, inf or negative values.*\(3, 6\).*unchanged"):
        opt.load_state_dict(sd)
    snap.assert_unchanged()
    _step(model, opt, 3)
    _step(twin, twin_opt, 3)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_checkpoint_with_a_nonfinite_running_fisher_loads_and_consolidate_refuses():
    """A NaN running Fisher is a state nonfinite="propagate" can reach and save: it loads,
    and consolidating it is refused then, as before the checkpoint."""
    model, opt = _trained()
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0]["fisher_ema"].view(-1)[0] = math.nan
    opt.load_state_dict(sd)
    with pytest.raises(ValueError, match=r"non-finite"):
        opt.consolidate()


def test_named_checkpoint_of_another_model_with_the_same_shapes_is_refused():
    """Same shapes in the same order, other names: refused (the Fisher and the running
    Fisher are keyed by name), optimizer unchanged; without names nothing can tell such a
    state apart. Deleting the saved names loads it by position, as the message says."""
    model, opt = _trained(named=True)
    other = nn.ModuleDict({"enc": nn.Linear(5, 6), "act": nn.Tanh(), "head": nn.Linear(6, 3)})
    other_opt = FusedEWCAdam(other.named_parameters(), lr=1e-2, backend="torch")
    for p in other.parameters():
        p.grad = torch.randn_like(p)
    other_opt.step()
    sd = copy.deepcopy(other_opt.state_dict())
    snap = Snapshot(model, opt)
    with pytest.raises(ValueError, match=r"names parameter 0 of param group 0 'enc\.weight', but this optimizer's "
                                         r"is '0\.weight' \(state of another model\?\).*unchanged.*param_names"):
        opt.load_state_dict(sd)
    snap.assert_unchanged()
    for g in sd["param_groups"]:
        del g["param_names"]
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["param_names"] == [n for n, _ in model.named_parameters()]
    assert "ewc_fisher" not in opt.state[model[0].weight]  # the other model's state, by position
