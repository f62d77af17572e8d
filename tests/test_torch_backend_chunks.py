"""The torch backend's chunked penalty path (large dense tensors) against its foreach path.

Both form g + λF(θ − c) with the same operations, so the results must be bit-identical;
the foreach path itself is checked against the float64 reference in test_optimizer.py.
The chunk size is lowered so that tensors split into several chunks (the step counts of
later chunks are copies taken before the update) without large allocations.
"""
import pytest
import torch

from ewc_fused import FusedEWCAdam
from ewc_fused import functional as Fn

from .helpers import assert_same_state


def _run(monkeypatch, chunked, *, shapes, dtype, ewc_dtype, channels_last=False, **kw):
    monkeypatch.setattr(Fn, "LARGE_NUMEL", 1000 if chunked else 1 << 62)
    monkeypatch.setattr(Fn, "CHUNK_NUMEL", 4096)
    gen = torch.Generator().manual_seed(0)
    params = []
    for s in shapes:
        p = torch.randn(s, generator=gen).to(dtype)
        if channels_last and p.dim() == 4:
            p = p.contiguous(memory_format=torch.channels_last)
        params.append(torch.nn.Parameter(p))
    opt = FusedEWCAdam(params, lr=1e-2, ewc_lambda=3.0, ewc_dtype=ewc_dtype, backend="torch", **kw)
    for t in range(4):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(dtype)
            if channels_last and p.dim() == 4:
                p.grad = p.grad.contiguous(memory_format=torch.channels_last)
        opt.step()
        if t == 1:
            opt.consolidate({p: torch.rand(p.shape, generator=gen) + 0.1 for p in params})
    return params, opt


CASES = [
    dict(shapes=[(100, 90), (5000,), (7,), (3, 1000)], dtype=torch.float32, ewc_dtype=torch.float32),
    dict(shapes=[(100, 90), (2, 8, 30, 30)], dtype=torch.float32, ewc_dtype=torch.float32, channels_last=True),
    dict(shapes=[(100, 90), (3, 4000)], dtype=torch.bfloat16, ewc_dtype=torch.float32, amsgrad=True),
    dict(shapes=[(100, 90)], dtype=torch.float32, ewc_dtype=torch.bfloat16, maximize=True, weight_decay=0.1),
    dict(shapes=[(100, 90), (50, 50)], dtype=torch.float32, ewc_dtype=torch.float32, foreach=True),
]


@pytest.mark.parametrize("case", CASES, ids=range(len(CASES)))
def test_chunked_penalty_is_bit_identical_to_foreach(monkeypatch, case):
    a, oa = _run(monkeypatch, True, **case)
    b, ob = _run(monkeypatch, False, **case)
    for p, q in zip(a, b):
        assert torch.equal(p, q)
    assert_same_state(oa.state_dict()["state"], ob.state_dict()["state"])
    assert float(oa.state[a[0]]["step"]) == 4.0
