"""Tests for ewc_fused.fisher.estimate_fisher against the per-sample loop oracle.

Models are float64 so the oracle is (near) exact; the estimator returns fp32 (Linear
kernels take fp32), hence rtol 1e-4 with a tiny absolute floor relative to the largest entry.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ewc_fused.fisher import estimate_fisher
from ewc_fused.reference import per_sample_fisher

RTOL = 1e-4


def _close(got, want):
    assert set(got) == set(want), (sorted(got), sorted(want))
    for k in want:
        g, w = got[k], want[k].to(torch.float64)
        assert g.dtype == torch.float32, k
        assert g.shape == w.shape, k
        atol = 1e-6 * float(w.abs().max()) + 1e-30
        torch.testing.assert_close(g.double(), w, rtol=RTOL, atol=atol, msg=lambda m: f"{k}: {m}")


def _ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


def _mlp_batches(sizes=(5, 3, 7), d_in=6, classes=4):
    return [(torch.randn(n, d_in, dtype=torch.float64), torch.randint(0, classes, (n,))) for n in sizes]


def _mlp():
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4)).double()


# --------------------------------------------------------------------------- whole models
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("mode", ["empirical", "exact"])
def test_mlp_matches_reference(mode, backend):
    model, data = _mlp(), _mlp_batches()
    _close(estimate_fisher(model, data, _ce, mode=mode, backend=backend),
           per_sample_fisher(model, data, _ce, mode=mode))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_sampled_mode_is_empirical_at_drawn_labels(backend):
    model, data = _mlp(), _mlp_batches()
    torch.manual_seed(1)
    got = estimate_fisher(model, data, _ce, mode="sampled", backend=backend)
    torch.manual_seed(1)
    with torch.no_grad():
        drawn = [(x, torch.multinomial(torch.softmax(model(x), -1), 1).squeeze(1)) for x, _ in data]
    _close(got, per_sample_fisher(model, drawn, _ce))


def test_batch_mode_matches_reference_even_with_batchnorm_training():
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4)).double()
    data = _mlp_batches()
    _close(estimate_fisher(model, data, _ce, mode="batch"), per_sample_fisher(model, data, _ce, mode="batch"))


def test_inplace_relu_after_linear():
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(inplace=True), nn.Linear(8, 4)).double()
    data = _mlp_batches((4, 3))
    _close(estimate_fisher(model, data, _ce), per_sample_fisher(model, data, _ce))


class _Seq(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16, padding_idx=0)
        self.fc1 = nn.Linear(16, 32)
        self.act = nn.GELU()
        self.ln = nn.LayerNorm(32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, idx):
        return self.fc2(self.ln(self.act(self.fc1(self.emb(idx)))))


def _seq_loss(out, y):
    """Sum of token cross-entropies per sample; target -1 marks padding (contributes nothing)."""
    n, t, c = out.shape
    tok = F.cross_entropy(out.reshape(n * t, c), y.reshape(-1).clamp_min(0), reduction="none").reshape(n, t)
    return (tok * (y >= 0)).sum(1)


def _seq_batches():
    out = []
    for n, t in ((3, 7), (4, 5)):
        idx = torch.randint(1, 50, (n, t))
        idx[0, :3] = 7  # a repeated token within one sample
        idx[1, -2:] = 0  # padding
        y = torch.randint(0, 10, (n, t))
        y[idx == 0] = -1
        out.append((idx, y))
    return out


def _loop_fisher(model, data, loss_fn):
    """Plain per-sample autograd loop (empirical), for inputs of any kind."""
    named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
    acc = {k: torch.zeros_like(p) for k, p in named}
    count = 0
    for x, y in data:
        for i in range(y.shape[0]):
            xi = x[i:i + 1]
            loss = loss_fn(model(xi), y[i:i + 1]).sum()
            grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
            for (k, _), g in zip(named, grads):
                if g is not None:
                    acc[k] += g ** 2
            count += 1
    return {k: a / count for k, a in acc.items()}


def test_sequence_model_empirical():
    model = _Seq().double()
    data = _seq_batches()
    got = estimate_fisher(model, data, _seq_loss)
    _close(got, _loop_fisher(model, data, _seq_loss))
    assert float(got["emb.weight"][0].abs().max()) == 0.0  # padding row gets no gradient


def test_sequence_model_exact_needs_token_granularity():
    model = _Seq().double()
    with pytest.raises(ValueError, match=r"mode='exact' with \(N, T, C\) outputs needs granularity='token'"):
        estimate_fisher(model, _seq_batches(), _seq_loss, mode="exact")


def _tok_loss(out, y):
    """Per-token cross-entropy (N, T); target -1 is padding (loss 0, no gradient)."""
    n, t, c = out.shape
    return F.cross_entropy(out.reshape(n * t, c), y.reshape(-1), ignore_index=-1, reduction="none").reshape(n, t)


def _token_loop_fisher(model, data, mode="empirical", labels=None):
    """Per-token oracle: one autograd call per (sample, unmasked token[, class])."""
    named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
    acc = {k: torch.zeros_like(p) for k, p in named}
    count = 0
    for bi, (x, y) in enumerate(data):
        for i in range(y.shape[0]):
            for t in range(y.shape[1]):
                if y[i, t] < 0:
                    continue
                out = model(x[i:i + 1])[0, t]
                if mode == "empirical":
                    terms = [(1.0, y[i, t] if labels is None else labels[bi][i, t])]
                else:
                    p = torch.softmax(out.detach(), -1)
                    terms = [(float(p[c]), torch.tensor(c)) for c in range(out.shape[-1])]
                for w, c in terms:
                    loss = F.cross_entropy(out[None], c.reshape(1))
                    grads = torch.autograd.grad(loss, [p for _, p in named], retain_graph=True, allow_unused=True)
                    for (k, _), g in zip(named, grads):
                        if g is not None:
                            acc[k] += w * g ** 2
                count += 1
    return {k: a / count for k, a in acc.items()}


# The mode changes only which output gradients reach the kernels, so the interpreted triton
# kernels run once (empirical); exact takes T x C backward passes, too slow interpreted.
@pytest.mark.parametrize("mode,backend", [("empirical", "torch"), ("empirical", "triton"), ("exact", "torch")])
def test_token_granularity_matches_per_token_loop(mode, backend):
    torch.manual_seed(2)
    model = _Seq().double()
    data = _seq_batches()
    got = estimate_fisher(model, data, _tok_loss, mode=mode, granularity="token", ignore_index=-1, backend=backend)
    _close(got, _token_loop_fisher(model, data, mode))
    assert float(got["emb.weight"][0].abs().max()) == 0.0


def test_token_granularity_sampled_is_empirical_at_drawn_labels():
    torch.manual_seed(2)
    model = _Seq().double()
    data = _seq_batches()
    torch.manual_seed(7)
    got = estimate_fisher(model, data, _tok_loss, mode="sampled", granularity="token", ignore_index=-1)
    torch.manual_seed(7)
    with torch.no_grad():
        labels = []
        for x, y in data:
            p = torch.softmax(model(x), -1)
            labels.append(torch.multinomial(p.reshape(-1, p.shape[-1]), 1).reshape(y.shape))
    _close(got, _token_loop_fisher(model, data, "empirical", labels))


def test_sequence_sampled_per_sample_keeps_padding():
    """Sample granularity, (N, T, C) logits: one label per unmasked token, per-sample sums."""
    torch.manual_seed(2)
    model = _Seq().double()
    data = _seq_batches()
    torch.manual_seed(8)
    got = estimate_fisher(model, data, _seq_loss, mode="sampled", ignore_index=-1)
    torch.manual_seed(8)
    drawn = []
    with torch.no_grad():
        for x, y in data:
            p = torch.softmax(model(x), -1)
            ys = torch.multinomial(p.reshape(-1, p.shape[-1]), 1).reshape(y.shape)
            drawn.append((x, torch.where(y == -1, y, ys)))
    _close(got, _loop_fisher(model, drawn, _seq_loss))


def test_sampled_n_samples_averages_the_draws():
    model, data = _mlp(), _mlp_batches()
    torch.manual_seed(3)
    got = estimate_fisher(model, data, _ce, mode="sampled", n_samples=3)
    torch.manual_seed(3)
    want = None
    with torch.no_grad():
        draws = []
        for x, _ in data:
            p = torch.softmax(model(x), -1)
            draws.append([torch.multinomial(p, 1).squeeze(1) for _ in range(3)])
    for k in range(3):
        f = per_sample_fisher(model, [(x, d[k]) for (x, _), d in zip(data, draws)], _ce)
        want = f if want is None else {n: want[n] + f[n] for n in f}
    _close(got, {n: v / 3 for n, v in want.items()})


def test_token_granularity_bad_input():
    model = _Seq().double()
    data = _seq_batches()
    with pytest.raises(ValueError, match=r"expected \(3, 7\): one loss per token"):
        estimate_fisher(model, data, _seq_loss, granularity="token", ignore_index=-1)
    with pytest.raises(ValueError, match=r"integer targets of shape \(N, T\)"):
        estimate_fisher(model, [(x, y.double()) for x, y in data], _tok_loss, granularity="token")
    with pytest.raises(ValueError, match="no token to estimate from"):
        estimate_fisher(model, [(x, torch.full_like(y, -1)) for x, y in data], _tok_loss, granularity="token",
                        ignore_index=-1)
    with pytest.raises(ValueError, match="Invalid granularity"):
        estimate_fisher(model, data, _tok_loss, granularity="word")
    with pytest.raises(ValueError, match="n_samples"):
        estimate_fisher(model, data, _seq_loss, mode="sampled", n_samples=0)
    with pytest.raises(ValueError, match="only applies to mode='sampled'"):
        estimate_fisher(model, data, _seq_loss, n_samples=2)


def test_token_granularity_batch_mode():
    """mode='batch': squared gradient of the mean over unmasked tokens, averaged over batches."""
    model = _Seq().double()
    data = _seq_batches()
    got = estimate_fisher(model, data, _tok_loss, mode="batch", granularity="token", ignore_index=-1)
    named = dict(model.named_parameters())
    want = {k: torch.zeros_like(p) for k, p in named.items()}
    for x, y in data:
        losses = _tok_loss(model(x), y)
        grads = torch.autograd.grad(losses.sum() / (y >= 0).sum(), list(named.values()))
        for k, g in zip(named, grads):
            want[k] += g ** 2 / len(data)
    _close(got, want)


# --------------------------------------------------------------------------- each rule alone
def _sum_loss(out, y):
    """A per-sample loss for any output shape: Σ (out · y) over all but the sample dim."""
    return (out * y).flatten(1).sum(1)


@pytest.mark.parametrize("shape", [(5, 6), (4, 3, 6), (3, 2, 2, 6)])
def test_linear_rule(shape):
    model = nn.Linear(6, 5).double()
    x = torch.randn(*shape, dtype=torch.float64)
    y = torch.randn(*shape[:-1], 5, dtype=torch.float64)
    data = [(x, y), (x[:2] * 0.5, y[:2])]
    _close(estimate_fisher(model, data, _sum_loss), _loop_fisher(model, data, _sum_loss))


def test_linear_called_twice():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(torch.tanh(self.fc(x)))

    model = Twice().double()
    data = [(torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64))]
    _close(estimate_fisher(model, data, _sum_loss), _loop_fisher(model, data, _sum_loss))


def test_modules_called_twice_generic_and_embedding():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(9, 4, padding_idx=0)
            self.sc = _Scale()

        def forward(self, idx):
            h = self.emb(idx) + self.emb(idx.flip(1))
            return self.sc(torch.tanh(self.sc(h)))

    model = Twice().double()
    idx = torch.tensor([[1, 3, 3], [0, 8, 1], [2, 2, 0]])
    data = [(idx, torch.randn(3, 3, 4, dtype=torch.float64))]
    _close(estimate_fisher(model, data, _sum_loss), _loop_fisher(model, data, _sum_loss))


def test_embedding_rule():
    model = nn.Embedding(12, 3, padding_idx=2).double()
    idx = torch.tensor([[1, 1, 2, 5], [2, 2, 2, 2], [0, 11, 5, 1]])
    data = [(idx, torch.randn(3, 4, 3, dtype=torch.float64)), (idx[:, :1], torch.randn(3, 1, 3, dtype=torch.float64))]
    got = estimate_fisher(model, data, _sum_loss)
    _close(got, _loop_fisher(model, data, _sum_loss))
    assert float(got["weight"][2].abs().max()) == 0.0


def test_embedding_scale_grad_by_freq_refused():
    model = nn.Embedding(5, 3, scale_grad_by_freq=True).double()
    data = [(torch.tensor([[1, 1]]), torch.randn(1, 2, 3, dtype=torch.float64))]
    with pytest.raises(ValueError, match="scale_grad_by_freq"):
        estimate_fisher(model, data, _sum_loss)


@pytest.mark.parametrize("make", [
    lambda: nn.LayerNorm(6),
    lambda: nn.LayerNorm((2, 3), bias=False),
    lambda: nn.RMSNorm(6),
    lambda: nn.RMSNorm(6, eps=1e-3),
])
def test_norm_rules(make):
    model = make().double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    shape = (4, 3) + tuple(model.normalized_shape)
    x = torch.randn(*shape, dtype=torch.float64) * 2 + 0.5
    data = [(x, torch.randn(*shape, dtype=torch.float64) ** 2)]
    loss = lambda o, y: (o.tanh() * y).flatten(1).sum(1)  # noqa: E731 - nonlinear in the output
    _close(estimate_fisher(model, data, loss), _loop_fisher(model, data, loss))


class _Scale(nn.Module):
    """A module without a rule: out = inner(x) * s (s its own parameter)."""

    def __init__(self):
        super().__init__()
        self.s = nn.Parameter(torch.randn(4))
        self.inner = nn.Linear(4, 4)

    def forward(self, x):
        return self.inner(x) * self.s


@pytest.mark.parametrize("mode", ["empirical", "exact"])
def test_generic_path(mode):
    model = nn.Sequential(nn.Conv1d(2, 3, 3), nn.Flatten(), nn.Linear(3 * 4, 4), _Scale()).double()
    data = [(torch.randn(n, 2, 6, dtype=torch.float64), torch.randint(0, 4, (n,))) for n in (3, 2)]
    _close(estimate_fisher(model, data, _ce, mode=mode), per_sample_fisher(model, data, _ce, mode=mode))


def test_generic_root_module_and_batchnorm_eval():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)).double().eval()
    with torch.no_grad():
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2)
    data = _mlp_batches((4,), d_in=4, classes=3)
    _close(estimate_fisher(model, data, _ce), per_sample_fisher(model, data, _ce))
    root = _Scale().double()  # parameters owned by the root, through the generic path
    data = [(torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64))]
    _close(estimate_fisher(root, data, _sum_loss), _loop_fisher(root, data, _sum_loss))


def test_generic_failure_names_module():
    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return x * self.w * x.sum().item()  # .item() on a batched tensor fails under vmap

    model = nn.Sequential(nn.Linear(3, 3), Bad())
    data = [(torch.randn(2, 3), torch.randn(2, 3))]
    with pytest.raises(ValueError, match=r"module '1' \(Bad\)"):
        estimate_fisher(model, data, _sum_loss)


def test_batchnorm_train_refused():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    with pytest.raises(ValueError, match=r"'1' \(BatchNorm1d\).*batch statistics"):
        estimate_fisher(model, [(torch.randn(3, 4), torch.randn(3, 4))], _sum_loss)
    assert model.training


def test_shared_parameter_refused():
    a, b = nn.Linear(3, 3), nn.Linear(3, 3)
    b.weight = a.weight
    with pytest.raises(ValueError, match="shared"):
        estimate_fisher(nn.Sequential(a, b), [(torch.randn(2, 3), torch.randn(2, 3))], _sum_loss)


# --------------------------------------------------------------------------- options
def test_triton_backend_equals_torch():
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    data = [(torch.randn(4, 2, 5), torch.randn(4, 2, 3)), (torch.randn(3, 5), torch.randn(3, 3))]
    loss = _sum_loss
    # the two batches have different ranks: run them separately through the same code
    for batch in data:
        a = estimate_fisher(model, [batch], loss, backend="torch")
        b = estimate_fisher(model, [batch], loss, backend="triton")
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-7)


def test_frozen_skipped_and_state_restored():
    model = _mlp()
    model[0].weight.requires_grad_(False)
    model[2].bias.requires_grad_(False)
    model.train()
    model[2].eval()
    sentinel = torch.full_like(model[0].bias, 3.0)
    model[0].bias.grad = sentinel
    data = _mlp_batches((4, 2))
    got = estimate_fisher(model, data, _ce)
    assert sorted(got) == ["0.bias", "2.weight"]
    _close(got, per_sample_fisher(model, data, _ce))
    assert model.training and model[0].training and not model[2].training
    assert model[0].bias.grad is sentinel and float(sentinel[0]) == 3.0
    assert model[2].weight.grad is None
    assert not model[0]._forward_hooks and not model[2]._forward_hooks


def test_max_samples_tuple_and_dict_inputs():
    model = _mlp()
    data = _mlp_batches((5, 3, 7))
    want = per_sample_fisher(model, [data[0], (data[1][0][:2], data[1][1][:2])], _ce)
    _close(estimate_fisher(model, data, _ce, max_samples=7), want)

    def gen():  # max_samples reached: no further batch is pulled
        yield data[0]
        yield data[1]
        raise AssertionError("pulled a batch past max_samples")

    _close(estimate_fisher(model, gen(), _ce, max_samples=8), per_sample_fisher(model, data[:2], _ce))

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, a, b=None):
            return self.net(a + b)

    two = Two()
    x = [(d[0] * 0.5, d[0] * 0.5) for d in data]
    _close(estimate_fisher(two, [(xi, d[1]) for xi, d in zip(x, data)], _ce),
           {"net." + k: v for k, v in per_sample_fisher(model, data, _ce).items()})
    _close(estimate_fisher(two, [({"a": xi[0], "b": xi[1]}, d[1]) for xi, d in zip(x, data)], _ce),
           {"net." + k: v for k, v in per_sample_fisher(model, data, _ce).items()})


def test_progress_runs():
    model = _mlp()
    data = _mlp_batches((2,))
    _close(estimate_fisher(model, data, _ce, progress=True), per_sample_fisher(model, data, _ce))


# --------------------------------------------------------------------------- bad input
def test_bad_input():
    model = _mlp()
    data = _mlp_batches((3,))
    with pytest.raises(ValueError, match=r"returned shape \(\), expected \(3,\)"):
        estimate_fisher(model, data, lambda o, y: _ce(o, y).mean())
    with pytest.raises(ValueError, match=r"returned shape \(2,\), expected \(3,\)"):
        estimate_fisher(model, data, lambda o, y: _ce(o, y)[:2])
    with pytest.raises(ValueError, match="no samples"):
        estimate_fisher(model, [], _ce)
    with pytest.raises(ValueError, match="no trainable parameters"):
        estimate_fisher(nn.Sequential(nn.ReLU()), data, _ce)
    frozen = _mlp().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        estimate_fisher(frozen, data, _ce)
    bad = _mlp_batches((2, 2, 2))
    bad[2][0][1, 0] = float("nan")
    with pytest.raises(ValueError, match="batch 2: .*non-finite"):
        estimate_fisher(model, bad, _ce)
    with pytest.raises(ValueError, match="batch 2: .*non-finite"):
        estimate_fisher(model, bad, _ce, mode="sampled")
    with pytest.raises(ValueError, match="batch 2: .*non-finite"):
        estimate_fisher(model, bad, _ce, mode="batch")
    with pytest.raises(ValueError, match=r"supported modes are \('empirical', 'exact', 'sampled', 'batch'\)"):
        estimate_fisher(model, data, _ce, mode="kfac")
    with pytest.raises(ValueError, match="Invalid backend"):
        estimate_fisher(model, data, _ce, backend="cuda")
    with pytest.raises(ValueError, match="max_samples"):
        estimate_fisher(model, data, _ce, max_samples=0)
    with pytest.raises(ValueError, match=r"\(inputs, targets\) pairs"):
        estimate_fisher(model, [data[0][0]], _ce)
    with pytest.raises(ValueError, match="sample dimension first"):
        estimate_fisher(model, [(torch.randn(6, dtype=torch.float64), torch.tensor(1))],
                        lambda o, y: o.sum().reshape(1).expand(6))
    # nothing was left behind by the failures
    assert all(not m._forward_hooks for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


def test_float32_model_auto_backend():
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    data = [(torch.randn(n, 6), torch.randint(0, 4, (n,))) for n in (5, 3)]
    got = estimate_fisher(model, data, _ce)
    want = per_sample_fisher(model.double(), [(x.double(), y) for x, y in data], _ce)
    _close(got, want)


def test_output_gradients_go_to_their_rule_during_the_backward_pass(monkeypatch):
    """A module called once has its output gradient G used and dropped as the backward pass
    reaches it: when a rule runs, the G of every layer handled before it is already freed
    (earlier versions differentiated all outputs at once and held every G to the end). The
    Fisher is unchanged (checked against the per-sample loop)."""
    import weakref

    import ewc_fused.fisher as fm

    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(4) for m in (nn.Linear(16, 16), nn.Tanh())], nn.Linear(16, 5))
    x, y = torch.randn(6, 3, 16), torch.randint(0, 5, (6, 3))

    def loss_fn(out, t):
        return F.cross_entropy(out.transpose(1, 2), t, reduction="none").mean(1)

    seen: list = []
    alive_at_call: list[int] = []
    rule = fm._RULES["linear"]

    def spy(h, calls, *a, **k):
        alive_at_call.append(sum(r() is not None for r in seen))
        seen.extend(weakref.ref(g) for _, _, g in calls)
        return rule(h, calls, *a, **k)

    monkeypatch.setitem(fm._RULES, "linear", spy)
    fisher = estimate_fisher(model, [(x, y)], loss_fn, progress=False)
    assert len(alive_at_call) == 5
    assert alive_at_call == [0] * 5, alive_at_call
    monkeypatch.setitem(fm._RULES, "linear", rule)
    ref = per_sample_fisher(model, [(x, y)], loss_fn)
    for k in ref:
        torch.testing.assert_close(fisher[k], ref[k], rtol=1e-4, atol=1e-9)


def _rel_errs(f, ref):
    return {k: float((f[k] - ref[k]).abs().max() / ref[k].abs().max()) for k in ref}


def test_outputs_held_around_the_tap_still_get_their_whole_gradient():
    """Gradient that reaches a module's output other than through the tensor the rest of the model
    sees: the output kept by a user's forward hook (registered before estimate_fisher's, which runs
    first) and used again, and a module caching its own output for its parent to reuse. Both match
    the per-sample loop (a reviewer found 79 % and 99 % errors in a first version of the streaming)."""
    torch.manual_seed(0)

    class Stash(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.head = nn.Linear(6, 6), nn.Linear(6, 4)
            self.fc.register_forward_hook(lambda m, a, o: setattr(self, "feat", o))

        def forward(self, x):
            return self.head(torch.tanh(self.fc(x)) + self.feat)

    class Feat(nn.Module):  # generic (no rule of its own), caching its output
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(6))

        def forward(self, x):
            self.last = x * self.w
            return self.last

    class SelfStash(nn.Module):
        def __init__(self):
            super().__init__()
            self.feat, self.head = Feat(), nn.Linear(6, 4)

        def forward(self, x):
            return self.head(torch.tanh(self.feat(x)) + self.feat.last)

    x, y = torch.randn(5, 6, dtype=torch.double), torch.randint(0, 4, (5,))

    def ce(o, t):
        return F.cross_entropy(o, t, reduction="none")

    for net in (Stash().double(), SelfStash().double()):
        f = estimate_fisher(net, [(x, y)], ce, progress=False)
        errs = _rel_errs(f, per_sample_fisher(net, [(x, y)], ce))
        assert max(errs.values()) < 1e-6, (type(net).__name__, errs)


def test_forward_values_unchanged_bit_for_bit_signed_zeros_included():
    """The outputs estimate_fisher passes on are the module's outputs bit for bit: a −0.0 output
    stays −0.0 (atan2(0, −0) = π, atan2(0, +0) = 0), so the Fisher is the reference's."""
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(-torch.ones(2))

        def forward(self, x):
            return x * self.w  # 0 · −1 = −0.0

    class Angle(nn.Module):
        def __init__(self):
            super().__init__()
            self.s = nn.Parameter(torch.ones(2))

        def forward(self, v):
            return self.s * torch.atan2(torch.zeros_like(v), v)

    model = nn.Sequential(Scale(), Angle()).double()
    x, y = torch.zeros(3, 2, dtype=torch.double), torch.zeros(3)
    seen = []

    def loss_fn(out, t):
        seen.append(out.detach().clone())
        return out.sum(1)

    f = estimate_fisher(model, [(x, y)], loss_fn, progress=False)
    assert torch.equal(seen[0], model(x).detach())
    assert float(seen[0][0, 0]) == pytest.approx(math.pi)
    torch.testing.assert_close(f["1.s"], per_sample_fisher(model, [(x, y)], loss_fn)["1.s"].float())
