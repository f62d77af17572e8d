"""The command line example and the textbook reference itself."""
from __future__ import annotations

import io
import subprocess
import sys

import pytest
import torch
from torch import nn

from ewc_fused import cli
from ewc_fused.reference import EWCPenalty, ReferenceEWCAdam, per_sample_fisher


def test_example_runs_and_ewc_keeps_task_a():
    out = io.StringIO()
    res = cli.run_example(ewc_lambda=500.0, epochs=2, out=out)
    text = out.getvalue()
    assert "task A after B" in text and "FusedEWCAdam" in text
    plain, ewc = res["Adam (no EWC)"], res["FusedEWCAdam (λ=500)"]
    assert ewc["a_after"] > plain["a_after"] + 0.1  # EWC remembers task A
    assert plain["a_before"] == ewc["a_before"]  # same model and data before the penalty


def test_cli_entry_point_errors_and_version():
    r = subprocess.run([sys.executable, "-m", "ewc_fused", "example", "--epochs", "0"], capture_output=True, text=True)
    assert r.returncode == 2 and "--epochs" in r.stderr
    r = subprocess.run([sys.executable, "-m", "ewc_fused", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and "ewc-fused" in r.stdout


def test_reference_penalty_value_and_gradient_by_hand():
    p = nn.Parameter(torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64))
    pen = EWCPenalty([("w", p)])
    pen.consolidate({"w": torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)})  # anchor (1, 2, -1)
    with torch.no_grad():
        p.copy_(torch.tensor([2.0, 0.0, -1.0]))
    pen.consolidate({"w": torch.tensor([3.0, 1.0, 1.0], dtype=torch.float64)})  # anchor (2, 0, -1)
    with torch.no_grad():
        p.copy_(torch.tensor([0.0, 1.0, 1.0]))
    # Σ_t F_t (θ − a_t)²: t1: 1·1 + 0.5·1 + 2·4 = 9.5; t2: 3·4 + 1·1 + 1·4 = 17.
    value = pen.penalty(2.0)
    assert float(value.detach()) == pytest.approx((2.0 / 2) * (9.5 + 17.0))
    value.backward()
    # d/dθ = λ Σ_t F_t (θ − a_t) = 2·[(1·−1 + 3·−2), (0.5·−1 + 1·1), (2·2 + 1·2)]
    torch.testing.assert_close(p.grad, torch.tensor([-14.0, 1.0, 12.0], dtype=torch.float64))


def test_reference_online_merges_terms():
    p = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    pen = EWCPenalty([p])
    pen.consolidate({p: torch.ones(2, dtype=torch.float64)}, mode="multi")
    pen.consolidate({p: torch.full((2,), 2.0, dtype=torch.float64)}, mode="online", decay=0.5)
    assert len(pen.terms[0]) == 1
    torch.testing.assert_close(pen.terms[0][0][0], torch.full((2,), 2.5, dtype=torch.float64))


def test_reference_adam_without_penalty_is_torch_adam():
    a, b = nn.Parameter(torch.randn(5)), None
    b = nn.Parameter(a.detach().clone())
    ref = ReferenceEWCAdam([a], lr=0.1)
    opt = torch.optim.Adam([b], lr=0.1)
    for _ in range(3):
        g = torch.randn(5)
        a.grad, b.grad = g.clone(), g.clone()
        ref.step()
        opt.step()
    assert torch.equal(a, b)


def test_per_sample_fisher_modes_by_hand():
    """Empirical: mean of per-sample g²; exact: Σ_c p_c g_c²; batch: squared batch-mean gradient."""
    torch.manual_seed(0)
    model = nn.Linear(3, 4).double()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(4, (6,))
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    emp = per_sample_fisher(model, [(x[:4], y[:4]), (x[4:], y[4:])], loss_fn)
    manual = torch.zeros_like(model.weight)
    for n in range(6):
        g, = torch.autograd.grad(loss_fn(model(x[n : n + 1]), y[n : n + 1]).sum(), [model.weight])
        manual += g ** 2 / 6
    torch.testing.assert_close(emp["weight"], manual)
    # Exact Fisher of softmax-linear: for one sample, Σ_c p_c (e_c − p)(e_c − p)ᵀ ⊙ x², diagonal.
    exact = per_sample_fisher(model, [(x, y)], loss_fn, mode="exact")
    p = torch.softmax(model(x), -1).detach()
    diag = (p * (1 - p) ** 2 + p ** 2 * (p.sum(-1, keepdim=True) - p)).clone()  # Σ_c p_c (δ_ck − p_k)²
    want = (diag[:, :, None] * x[:, None, :] ** 2).mean(0)
    torch.testing.assert_close(exact["weight"], want)
    batch = per_sample_fisher(model, [(x, y)], loss_fn, mode="batch")
    g, = torch.autograd.grad(loss_fn(model(x), y).mean(), [model.weight])
    torch.testing.assert_close(batch["weight"], g ** 2)
