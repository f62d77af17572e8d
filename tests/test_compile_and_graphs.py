"""torch.compile of a training step that calls opt.step(), and CUDA-graph capture of the step.

Oracle: the same steps run eagerly on an identical copy. On CPU, Dynamo runs with the
"eager" backend (tracing, graph breaks and guards are exercised without a C++ toolchain);
the inductor and CUDA-graph tests need a GPU and are skipped without one.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ewc_fused import FusedEWCAdam


def _train_step(model, opt, x, y):
    opt.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return loss.detach()


def _pair(device="cpu", **kw):
    torch.manual_seed(0)
    m1 = nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 4)).to(device)
    m2 = copy.deepcopy(m1)
    mk = lambda m: FusedEWCAdam(m.parameters(), lr=1e-2, fisher_ema=0.9, ewc_lambda=3.0, **kw)  # noqa: E731
    return m1, mk(m1), m2, mk(m2)


def _batches(n, device="cpu"):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 6, generator=g).to(device), torch.randint(0, 4, (8,), generator=g).to(device))
            for _ in range(n)]


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiled_training_step_equals_eager_cpu(backend):
    torch._dynamo.reset()
    m1, o1, m2, o2 = _pair()
    step = torch.compile(_train_step, backend=backend)
    for k, (x, y) in enumerate(_batches(5)):
        l1 = step(m1, o1, x, y)
        l2 = _train_step(m2, o2, x, y)
        assert torch.equal(l1, l2)
        if k == 1:
            o1.consolidate()
            o2.consolidate()
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert float(o1.ewc_penalty()) > 0


@pytest.mark.cuda
def test_compiled_training_step_equals_eager_cuda_inductor():
    torch._dynamo.reset()
    m1, o1, m2, o2 = _pair("cuda")
    step = torch.compile(_train_step)
    for k, (x, y) in enumerate(_batches(5, "cuda")):
        step(m1, o1, x, y)
        _train_step(m2, o2, x, y)
        if k == 1:
            o1.consolidate()
            o2.consolidate()
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.parametrize("n_small", [3, 40])
def test_cuda_graph_capture_of_the_step(n_small):
    """capturable=True, tensor lr on the device, running Fisher on, after consolidate; many small
    tensors (multi-tensor kernel, pointer tables) and one large one (per-tensor kernel)."""
    dev = torch.device("cuda")
    torch.manual_seed(0)
    shapes = [(17, 5)] * n_small + [(300, 1000)]
    p1 = [nn.Parameter(torch.randn(s, device=dev)) for s in shapes]
    p2 = [nn.Parameter(p.detach().clone()) for p in p1]
    kw = dict(lr=torch.tensor(1e-2, device=dev), fisher_ema=0.9, ewc_lambda=2.0, capturable=True, backend="triton")
    o1, o2 = FusedEWCAdam(p1, **kw), FusedEWCAdam(p2, **kw)
    grads = [[torch.randn(s, device=dev) for s in shapes] for _ in range(8)]

    def set_grads(ps, gs):
        for p, g in zip(ps, gs):
            p.grad = g.clone()

    # warm-up (state creation, table cache) and consolidation, eagerly, on both
    for k in range(3):
        for ps, o in ((p1, o1), (p2, o2)):
            set_grads(ps, grads[k])
            o.step()
    o1.consolidate({p: torch.rand_like(p) + 0.1 for p in p1})
    o2.consolidate({q: o1.state[p]["ewc_fisher"].clone() for p, q in zip(p1, p2)})
    set_grads(p1, grads[3])
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        o1.step()  # one more warm-up step on the side stream, as torch's docs do
    torch.cuda.current_stream().wait_stream(s)
    set_grads(p2, grads[3])
    o2.step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        o1.step()
    for k in range(4, 8):
        for p, g in zip(p1, grads[k]):
            p.grad.copy_(g)
        graph.replay()
        set_grads(p2, grads[k])
        o2.step()
    torch.cuda.synchronize()
    for p, q in zip(p1, p2):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    for p, q in zip(p1, p2):
        for key in ("exp_avg", "exp_avg_sq", "fisher_ema", "step", "fisher_ema_step"):
            torch.testing.assert_close(o1.state[p][key], o2.state[q][key], rtol=1e-6, atol=1e-7)


@pytest.mark.cuda
def test_nonfinite_raise_cannot_be_captured():
    p = nn.Parameter(torch.randn(10, device="cuda"))
    opt = FusedEWCAdam([p], lr=torch.tensor(1e-2, device="cuda"), capturable=True, nonfinite="raise")
    p.grad = torch.randn_like(p)
    opt.step()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="cannot capture"):
        with torch.cuda.graph(graph):
            opt.step()
