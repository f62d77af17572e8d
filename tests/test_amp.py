"""Mixed precision: torch.amp.GradScaler hands the step grad_scale/found_inf, and the
non-finite-gradient policy (nonfinite="propagate" | "skip" | "raise").

Oracle: the same training without a scaler, where the step the scaler skips is not
taken. The scale is a power of two, so unscaling is exact and the runs agree bit for bit.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ewc_fused import FusedEWCAdam
from ewc_fused.kernels import ewc_adam as K

from .helpers import assert_same_state

BACKENDS = ["torch", "triton"]


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def _batches(n=5, bad=2):
    g = torch.Generator().manual_seed(1)
    out = []
    for k in range(n):
        x = torch.randn(8, 5, generator=g)
        if k == bad:
            x[0, 0] = float("inf")  # inf loss and gradients in this step
        out.append((x, torch.randint(0, 3, (8,), generator=g)))
    return out


def _opt(model, backend, **kw):
    return FusedEWCAdam(model.named_parameters(), lr=1e-2, fisher_ema=0.9, ewc_lambda=2.0, backend=backend, **kw)


@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_scaler_equals_unscaled_run_without_the_inf_step(backend, per_sample):
    m1 = _model()
    m2 = copy.deepcopy(m1)
    o1, o2 = _opt(m1, backend), _opt(m2, backend)
    t1, t2 = o1.track_fisher(m1, per_sample=per_sample), o2.track_fisher(m2, per_sample=per_sample)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=2)
    for k, (x, y) in enumerate(_batches()):
        o1.zero_grad()
        scaler.scale(F.cross_entropy(m1(x), y)).backward()
        scaler.step(o1)
        scaler.update()
        o2.zero_grad()
        if k != 2:
            F.cross_entropy(m2(x), y).backward()
            o2.step()
        if k == 0:
            o1.consolidate()
            o2.consolidate()
    assert scaler.get_scale() != 2.0 ** 12  # the inf step halved it (and growth changed it)
    t1.remove()
    t2.remove()
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p, q)
    assert_same_state(o1.state_dict()["state"], o2.state_dict()["state"])
    assert float(o1.state[m1[0].weight]["step"]) == 4.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_scaler_after_explicit_unscale(backend):
    """unscale_ then step (gradient clipping): GradScaler passes found_inf only."""
    m1 = _model()
    m2 = copy.deepcopy(m1)
    o1, o2 = _opt(m1, backend), _opt(m2, backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    for k, (x, y) in enumerate(_batches(4, bad=1)):
        o1.zero_grad()
        scaler.scale(F.cross_entropy(m1(x), y)).backward()
        scaler.unscale_(o1)
        torch.nn.utils.clip_grad_norm_(m1.parameters(), 1.0)
        scaler.step(o1)
        scaler.update()
        o2.zero_grad()
        if k != 1:
            F.cross_entropy(m2(x), y).backward()
            torch.nn.utils.clip_grad_norm_(m2.parameters(), 1.0)
            o2.step()
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_skip(backend):
    m1 = _model()
    m2 = copy.deepcopy(m1)
    o1, o2 = _opt(m1, backend, nonfinite="skip"), _opt(m2, backend)
    for k, (x, y) in enumerate(_batches()):
        o1.zero_grad()
        F.cross_entropy(m1(x), y).backward()
        o1.step()
        if k != 2:
            o2.zero_grad()
            F.cross_entropy(m2(x), y).backward()
            o2.step()
        if k == 0:
            o1.consolidate()
            o2.consolidate()
    assert o1.skipped_steps == 1
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p, q)
    assert_same_state(o1.state_dict()["state"], o2.state_dict()["state"])


def test_nonfinite_raise_names_the_parameter_and_changes_nothing():
    model = _model()
    opt = FusedEWCAdam(model.named_parameters(), lr=1e-2, fisher_ema=0.9, nonfinite="raise")
    x, y = _batches()[0]
    F.cross_entropy(model(x), y).backward()
    opt.step()
    before = copy.deepcopy(opt.state_dict())
    params = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    model[2].bias.grad[1] = float("nan")
    with pytest.raises(FloatingPointError, match=r"non-finite gradient .* '2\.bias'"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    assert_same_state(opt.state_dict(), before)


def test_nonfinite_propagate_is_torch_adam():
    model = _model()
    ref = copy.deepcopy(model)
    opt = FusedEWCAdam(model.parameters(), lr=1e-2)
    ropt = torch.optim.Adam(ref.parameters(), lr=1e-2)
    for m, o in ((model, opt), (ref, ropt)):
        x, y = _batches()[2]
        F.cross_entropy(m(x), y).backward()
        o.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, equal_nan=True)
    assert not bool(torch.isfinite(model[0].weight).all())


def test_bad_nonfinite_option():
    with pytest.raises(ValueError, match="Invalid nonfinite"):
        FusedEWCAdam(_model().parameters(), nonfinite="ignore")


@pytest.mark.parametrize("sq", [False, True])
def test_kernel_grad_scale_and_found_inf(sq):
    """In the interpreter: g/scale (s/scale²) equals the unscaled update bit for bit
    (power-of-two scale); found_inf = 1 leaves every tensor untouched."""
    n = 1500
    gen = torch.Generator().manual_seed(3)
    base = [torch.randn(n, generator=gen) for _ in range(2)] + [torch.rand(n, generator=gen) * 0.01]
    f, c, frun, s = torch.rand(n, generator=gen), torch.randn(n, generator=gen), torch.rand(n, generator=gen), \
        torch.rand(n, generator=gen)
    g = torch.randn(n, generator=gen)
    scale = torch.tensor([2.0 ** 14])
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, ewc_lambda=2.0, fisher_beta=0.9,
              amsgrad=False, maximize=False, decoupled_weight_decay=True)

    def run(grad, src, **extra):
        p, m, v = (t.clone() for t in base)
        fr = frun.clone()
        K.ewc_adam_([p], [grad], [m], [v], None, [f], [c], [fr], [src] if sq else None, [torch.tensor(1.0)],
                    **kw, **extra)
        return p, m, v, fr

    plain = run(g, s)
    scaled = run(g * scale, s * scale * scale, grad_scale=scale, found_inf=torch.zeros(1))
    assert all(torch.equal(a, b) for a, b in zip(plain, scaled))
    skipped = run(g * scale, s, grad_scale=scale, found_inf=torch.ones(1))
    assert all(torch.equal(a, b) for a, b in zip(skipped, (*base, frun)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_skip_with_every_gradient_non_finite_counts_one_step(backend):
    """found_inf is a flag, not a count of bad tensors: step counts never go backwards."""
    model = _model()
    opt = _opt(model, backend, nonfinite="skip")
    x, y = _batches()[0]
    F.cross_entropy(model(x), y).backward()
    opt.step()
    for p in model.parameters():
        p.grad.fill_(float("nan"))
    opt.step()
    assert opt.skipped_steps == 1
    for p in model.parameters():
        assert float(opt.state[p]["step"]) == 1.0 and float(opt.state[p]["fisher_ema_step"]) == 1.0
    assert all(bool(torch.isfinite(f).all()) for f in opt.running_fisher().values())


@pytest.mark.parametrize("backend", BACKENDS)
def test_unscale_then_step_with_tracker_needs_and_uses_the_scaler(backend):
    m1 = _model()
    m2 = copy.deepcopy(m1)
    o1, o2 = _opt(m1, backend), _opt(m2, backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    t1 = o1.track_fisher(m1, scaler=scaler)
    t2 = o2.track_fisher(m2)
    for x, y in _batches(3, bad=-1):
        o1.zero_grad()
        scaler.scale(F.cross_entropy(m1(x), y)).backward()
        scaler.unscale_(o1)
        scaler.step(o1)
        scaler.update()
        o2.zero_grad()
        F.cross_entropy(m2(x), y).backward()
        o2.step()
    t1.remove()
    t2.remove()
    for (k, a), b in zip(o1.running_fisher().items(), o2.running_fisher().values()):
        assert torch.equal(a, b), k

    m3 = _model()
    o3 = _opt(m3, backend)
    o3.track_fisher(m3)  # no scaler
    x, y = _batches()[0]
    scaler.scale(F.cross_entropy(m3(x), y)).backward()
    scaler.unscale_(o3)
    with pytest.raises(RuntimeError, match="pass the scaler"):
        scaler.step(o3)
    assert float(o3.state[m3[0].weight].get("step", torch.tensor(0.0))) == 0.0
