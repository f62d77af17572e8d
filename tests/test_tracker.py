"""FusedEWCAdam.track_fisher: the per-sample Fisher accumulated during training.

Oracle: before every step, estimate_fisher on the same batch at the same weights
(itself checked against the per-sample loop in test_fisher.py); the tracked running
Fisher must equal the bias-corrected EMA of those per-batch Fishers. Models are
float64; the running Fisher is stored in fp32, so rtol 1e-5.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ewc_fused import FusedEWCAdam, estimate_fisher

from .helpers import assert_same_state
from .test_fisher import _Seq, _seq_batches, _seq_loss

RTOL = 1e-5
BACKENDS = ["torch", "triton"]


def _ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


def _mlp(inplace=False):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(7, 13), nn.ReLU(inplace=inplace), nn.Linear(13, 5), nn.LayerNorm(5),
                         nn.Linear(5, 3)).double()


def _mlp_batches(sizes=(6, 4, 9, 5)):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(n, 7, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g))
            for n in sizes]


def _ema(fishers, beta):
    acc = {}
    for f in fishers:
        for k, v in f.items():
            acc[k] = beta * acc.get(k, torch.zeros_like(v, dtype=torch.float64)) + (1 - beta) * v.double()
    return {k: v / (1 - beta ** len(fishers)) for k, v in acc.items()}


def _close(got, want):
    assert set(got) == set(want), (sorted(got), sorted(want))
    for k in want:
        atol = 1e-7 * float(want[k].abs().max()) + 1e-30
        torch.testing.assert_close(got[k].double(), want[k], rtol=RTOL, atol=atol, msg=lambda m: f"{k}: {m}")


def _train_tracked(model, batches, loss_fn, *, reduction="mean", beta=0.8, backend="torch"):
    """Train with a tracker; return (running Fisher, the per-batch Fishers at the same weights)."""
    opt = FusedEWCAdam(model.named_parameters(), lr=1e-2, fisher_ema=beta, backend=backend)
    tracker = opt.track_fisher(model, loss_reduction=reduction)
    per_batch = []
    for x, y in batches:
        per_batch.append(estimate_fisher(model, [(x, y)], loss_fn, backend=backend))
        opt.zero_grad()
        losses = loss_fn(model(x), y)
        (losses.mean() if reduction == "mean" else losses.sum()).backward()
        opt.step()
    tracker.remove()
    return opt.running_fisher(), per_batch, opt


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_mlp_tracked_equals_ema_of_per_sample_fisher(backend, reduction):
    run, per_batch, _ = _train_tracked(_mlp(), _mlp_batches(), _ce, reduction=reduction, backend=backend)
    _close(run, _ema(per_batch, 0.8))


@pytest.mark.parametrize("backend", BACKENDS)
def test_sequence_model_tracked_equals_ema(backend):
    """Embedding (repeated tokens, padding) → Linear → GELU → LayerNorm → Linear."""
    torch.manual_seed(3)
    run, per_batch, _ = _train_tracked(_Seq().double(), _seq_batches(), _seq_loss, backend=backend)
    _close(run, _ema(per_batch, 0.8))
    assert float(run["emb.weight"][0].abs().max()) == 0.0  # the padding row


def test_inplace_relu_after_linear():
    run, per_batch, _ = _train_tracked(_mlp(inplace=True), _mlp_batches(), _ce)
    _close(run, _ema(per_batch, 0.8))


def test_gradient_accumulation_counts_every_sample():
    """Two mean-reduced backward passes, one step: s is the per-sample Fisher of their union."""
    model = _mlp()
    (x1, y1), (x2, y2) = _mlp_batches((6, 4))[:2]
    want = estimate_fisher(model, [(x1, y1), (x2, y2)], _ce)
    opt = FusedEWCAdam(model.named_parameters(), lr=1e-2, fisher_ema=0.5)
    with opt.track_fisher(model):
        for x, y in ((x1, y1), (x2, y2)):
            F.cross_entropy(model(x), y).backward()
        opt.step()
    _close(opt.running_fisher(), {k: v.double() for k, v in want.items()})


class _Twice(nn.Module):
    """One Linear applied twice (weights shared across the two calls) and a module with a
    parameter of its own that only the generic torch.func rule handles."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 5)
        self.gain = _Gain(5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(self.gain(torch.tanh(self.fc(torch.tanh(self.fc(x))))))


class _Gain(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.g = nn.Parameter(torch.rand(d) + 0.5)

    def forward(self, x):
        return x * self.g + x.square() * self.g.square()


def test_shared_module_and_generic_rule():
    torch.manual_seed(4)
    model = _Twice().double()
    batches = [(torch.randn(n, 5, dtype=torch.float64), torch.randint(0, 3, (n,))) for n in (4, 6, 3)]
    run, per_batch, _ = _train_tracked(model, batches, _ce)
    _close(run, _ema(per_batch, 0.8))


def test_per_sample_false_is_the_squared_batch_gradient():
    a, b = _mlp(), _mlp()
    oa = FusedEWCAdam(a.parameters(), lr=1e-2, fisher_ema=0.9)
    ob = FusedEWCAdam(b.parameters(), lr=1e-2, fisher_ema=0.9)
    tracker = ob.track_fisher(b, per_sample=False)
    for x, y in _mlp_batches():
        for m, o in ((a, oa), (b, ob)):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            o.step()
    tracker.remove()
    assert_same_state(oa.state_dict(), ob.state_dict())
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_remove_restores_the_model_and_plain_steps():
    model = _mlp()
    before = copy.deepcopy(model)
    opt = FusedEWCAdam(model.parameters(), lr=1e-2, fisher_ema=0.9)
    ref_model = copy.deepcopy(model)
    ref = FusedEWCAdam(ref_model.parameters(), lr=1e-2, fisher_ema=0.9)
    tracker = opt.track_fisher(model)
    assert len(model._forward_pre_hooks) == 1 and len(model[0]._forward_hooks) == 1
    tracker.remove()
    for m, m0 in zip(model.modules(), before.modules()):
        assert len(m._forward_hooks) == len(m0._forward_hooks) == 0
        assert len(m._forward_pre_hooks) == len(m0._forward_pre_hooks) == 0
    assert opt._tracker is None
    for x, y in _mlp_batches()[:2]:  # after removal: g², exactly like an optimizer that never tracked
        for m, o in ((model, opt), (ref_model, ref)):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            o.step()
    assert_same_state(opt.state_dict(), ref.state_dict())
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref_model.parameters()))
    opt.track_fisher(model).remove()  # a new tracker may be installed after removal


def test_consolidate_without_argument_uses_tracked_fisher():
    model = _mlp()
    opt = FusedEWCAdam(model.named_parameters(), lr=1e-2, fisher_ema=0.8, ewc_lambda=3.0)
    with opt.track_fisher(model):
        for x, y in _mlp_batches():
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    run = opt.running_fisher()
    opt.consolidate()
    for name, p in model.named_parameters():
        torch.testing.assert_close(opt.state[p]["ewc_fisher"], run[name])
        torch.testing.assert_close(opt.state[p]["ewc_anchor"], p.detach().float())


def test_eval_forward_and_forward_without_backward_do_not_count():
    model = _mlp()
    opt = FusedEWCAdam(model.named_parameters(), lr=1e-2, fisher_ema=0.8)
    tracker = opt.track_fisher(model)
    (x, y), (xv, _) = _mlp_batches()[:2]
    want = estimate_fisher(model, [(x, y)], _ce)
    with torch.no_grad():
        model(xv)  # evaluation
    model(xv)  # a forward with grad enabled whose graph is never differentiated
    F.cross_entropy(model(x), y).backward()
    assert tracker.samples == x.shape[0]
    opt.step()
    _close(opt.running_fisher(), {k: v.double() for k, v in want.items()})
    assert tracker.samples == 0 and not tracker._calls


def test_frozen_and_foreign_parameters_are_not_tracked():
    model = _mlp()
    model[0].weight.requires_grad_(False)
    opt = FusedEWCAdam([{"params": [model[0].bias, model[2].weight], "fisher_ema": 0.8},
                        {"params": [model[2].bias], "fisher_ema": None}], lr=1e-2)
    tracker = opt.track_fisher(model)
    assert set(tracker._by_param) == {model[0].bias, model[2].weight}
    x, y = _mlp_batches()[0]
    want = estimate_fisher(model, [(x, y)], _ce)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    run = opt.running_fisher()
    assert set(map(id, run)) == {id(model[0].bias), id(model[2].weight)}
    _close({"0.bias": run[model[0].bias], "2.weight": run[model[2].weight]},
           {"0.bias": want["0.bias"].double(), "2.weight": want["2.weight"].double()})


# --------------------------------------------------------------------------- bad input
def test_bad_input():
    model = _mlp()
    opt = FusedEWCAdam(model.parameters(), lr=1e-2)
    with pytest.raises(ValueError, match="fisher_ema"):
        opt.track_fisher(model)
    opt = FusedEWCAdam(model.parameters(), lr=1e-2, fisher_ema=0.9)
    with pytest.raises(TypeError, match="nn.Module"):
        opt.track_fisher(model.parameters())
    with pytest.raises(ValueError, match="loss_reduction"):
        opt.track_fisher(model, loss_reduction="batchmean")
    with pytest.raises(ValueError, match="none of the model's trainable parameters is in this optimizer"):
        opt.track_fisher(_mlp())
    bn = nn.Sequential(nn.Linear(7, 4), nn.BatchNorm1d(4)).double()
    with pytest.raises(ValueError, match="batch statistics"):
        FusedEWCAdam(bn.parameters(), fisher_ema=0.9).track_fisher(bn)
    tracker = opt.track_fisher(model)
    with pytest.raises(RuntimeError, match="already has a tracker"):
        opt.track_fisher(model)
    tracker.remove()


def test_step_without_a_tracked_backward_is_refused_and_changes_nothing():
    model = _mlp()
    opt = FusedEWCAdam(model.named_parameters(), lr=1e-2, fisher_ema=0.9)
    x, y = _mlp_batches()[0]
    F.cross_entropy(model(x), y).backward()
    opt.step()
    tracker = opt.track_fisher(model)
    before = copy.deepcopy(opt.state_dict())
    params = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        out = model(x)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    with pytest.raises(RuntimeError, match="no backward pass through the tracked model"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    after = opt.state_dict()
    for k, s in before["state"].items():
        for name, t in s.items():
            assert torch.equal(t, after["state"][k][name]), name
    tracker.remove()
    del out


# --------------------------------------------------------------------------- how batches are counted
def _fisher_after_one_step(model, opt):
    """The running Fisher after exactly one step, un-bias-corrected back to s."""
    return opt.running_fisher()


def test_gradient_accumulation_with_divided_loss():
    """loss / K per micro-batch (the usual accumulation) with accumulation_steps=K."""
    model = _mlp()
    (x1, y1), (x2, y2) = _mlp_batches((6, 6))[:2]
    want = estimate_fisher(model, [(x1, y1), (x2, y2)], _ce)
    opt = FusedEWCAdam(model.named_parameters(), lr=1e-2, fisher_ema=0.5)
    with opt.track_fisher(model, accumulation_steps=2):
        for x, y in ((x1, y1), (x2, y2)):
            (F.cross_entropy(model(x), y) / 2).backward()
        opt.step()
    _close(opt.running_fisher(), {k: v.double() for k, v in want.items()})


class _Parts(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(7, 9), nn.Tanh())
        self.head = nn.Linear(9, 3)

    def forward(self, x):
        return self.head(self.enc(x))


def test_submodules_called_directly_with_accumulation():
    """The training loop calls model.enc and model.head, never model: each backward is a batch."""
    torch.manual_seed(6)
    model = _Parts().double()
    (x1, y1), (x2, y2) = _mlp_batches((6, 4))[:2]
    want = estimate_fisher(model, [(x1, y1), (x2, y2)], _ce)
    opt = FusedEWCAdam(model.named_parameters(), lr=1e-2, fisher_ema=0.5)
    tracker = opt.track_fisher(model)
    for x, y in ((x1, y1), (x2, y2)):
        F.cross_entropy(model.head(model.enc(x)), y).backward()
    assert tracker.samples == 10
    opt.step()
    tracker.remove()
    _close(opt.running_fisher(), {k: v.double() for k, v in want.items()})


def test_model_applied_twice_to_one_batch():
    """R-Drop-like: ℓ_n = CE(f(x_n)) + CE(f(x_n)); the two calls' gradients add before squaring."""
    model = _mlp()
    x, y = _mlp_batches()[0]
    single = estimate_fisher(model, [(x, y)], _ce)
    opt = FusedEWCAdam(model.named_parameters(), lr=1e-2, fisher_ema=0.5)
    with opt.track_fisher(model) as tracker:
        (F.cross_entropy(model(x), y) + F.cross_entropy(model(x), y)).backward()
        assert tracker.samples == x.shape[0]
        opt.step()
    _close(opt.running_fisher(), {k: 4 * v.double() for k, v in single.items()})


def test_paused_backward_is_not_counted():
    """An autograd.grad probe (e.g. an input-gradient penalty) inside tracker.paused()."""
    model = _mlp()
    x, y = _mlp_batches()[0]
    want = estimate_fisher(model, [(x, y)], _ce)
    opt = FusedEWCAdam(model.named_parameters(), lr=1e-2, fisher_ema=0.5)
    with opt.track_fisher(model) as tracker:
        with tracker.paused():
            xi = x.clone().requires_grad_(True)
            torch.autograd.grad(model(xi).sum(), xi)
        assert tracker.samples == 0 and not tracker._calls
        F.cross_entropy(model(x), y).backward()
        opt.step()
    _close(opt.running_fisher(), {k: v.double() for k, v in want.items()})


def test_module_without_the_sample_dimension_first_is_refused():
    """The head applied to flattened (N·T, D) rows: per-sample gradients would be per-token."""
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            h = self.fc(x)
            return self.head(h.reshape(-1, 4)).reshape(x.shape[0], x.shape[1], 3).sum(1)

    model = Flat().double()
    opt = FusedEWCAdam(model.parameters(), lr=1e-2, fisher_ema=0.5)
    opt.track_fisher(model)
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="sample dimension first"):
        F.cross_entropy(model(x), torch.randint(0, 3, (5,))).backward()


def test_saved_inputs_are_released_after_each_backward():
    model = _mlp()
    opt = FusedEWCAdam(model.parameters(), lr=1e-2, fisher_ema=0.5)
    tracker = opt.track_fisher(model)
    x, y = _mlp_batches()[0]
    loss = F.cross_entropy(model(x), y)
    calls = list(tracker._calls)
    assert calls and all(c.args is not None for c in calls)
    loss.backward()
    assert not tracker._calls and all(c.args is None and c.done for c in calls)
    model(x)  # a forward whose graph is dropped: released at the step
    assert tracker._calls
    opt.step()
    assert not tracker._calls
    tracker.remove()


def test_refused_step_discards_its_sums():
    """nonfinite='raise' refuses a step: its per-sample sums must not reach the next step."""
    model = _mlp()
    opt = FusedEWCAdam(model.named_parameters(), lr=1e-2, fisher_ema=0.5, nonfinite="raise")
    tracker = opt.track_fisher(model)
    (x, y), (x2, y2) = _mlp_batches()[:2]
    bad = x.clone()
    bad[0, 0] = float("nan")
    F.cross_entropy(model(bad), y).backward()
    with pytest.raises(FloatingPointError):
        opt.step()
    assert tracker.samples == 0
    opt.zero_grad()
    want = estimate_fisher(model, [(x2, y2)], _ce)
    F.cross_entropy(model(x2), y2).backward()
    opt.step()
    tracker.remove()
    _close(opt.running_fisher(), {k: v.double() for k, v in want.items()})
