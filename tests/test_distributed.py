"""DDP and FSDP2: 2 processes on CPU with gloo, compared with one process on the same global batches.

One spawn (torch.multiprocessing, file:// rendezvous, so no port can collide) runs every
scenario and writes its results to disk; the tests compare them with the same training
done here in one process. Each rank takes half of every global batch of 8.

Tolerances (float64 models and EWC state):
* TIGHT, 1e-10 relative: runs whose Fisher is the running Fisher (parameters, every state
  tensor, the penalty). DDP/FSDP2 sum floats in another order, so bit-exactness is not
  expected; observed 6e-14.
* FISHER, 1e-5 relative: everything downstream of ``estimate_fisher`` or ``track_fisher``,
  whose Fisher is fp32 by design (the ranks' fp32 sums are added in float64; one process
  sums in fp32); observed 5e-7.
"""
from __future__ import annotations

import copy
import datetime
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from ewc_fused import FusedEWCAdam, estimate_fisher

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

WORLD = 2
TIGHT = dict(rtol=1e-10, atol=1e-12)
FISHER = dict(rtol=1e-5, atol=1e-9)
FP32 = dict(rtol=1e-5, atol=1e-6)
STATE_KEYS = ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "ewc_fisher", "ewc_anchor", "ewc_const",
              "fisher_ema", "fisher_ema_step")
# Fisher samples per rank, in two batches each (FSDP2 needs equal batch counts): 5 vs 3 samples.
FISHER_SPLIT = {0: [(0, 3), (3, 5)], 1: [(5, 7), (7, 8)]}


class Scale(nn.Module):
    """A module estimate_fisher has no rule for (its generic torch.func path)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


class Net(nn.Module):
    """Linear, LayerNorm and a 1-output gate: shapes split unevenly over 2 ranks (7 = 4 + 3, 1 = 1 + 0)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.norm, self.head, self.gate = nn.Linear(5, 7), nn.LayerNorm(7), nn.Linear(7, 3), nn.Linear(7, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(torch.tanh(self.fc1(x)))
        return self.head(h) * torch.sigmoid(self.gate(h))


def _net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net().double()


def _data():
    g = torch.Generator().manual_seed(1)
    perm = torch.randperm(5, generator=g)
    a = [(torch.randn(8, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g))
         for _ in range(3)]
    b = [(torch.randn(8, 5, generator=g, dtype=torch.float64)[:, perm], torch.randint(0, 3, (8,), generator=g))
         for _ in range(5)]
    fisher = (torch.randn(8, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g))
    return a, b, fisher


def _opt(named) -> FusedEWCAdam:
    return FusedEWCAdam(named, lr=0.05, ewc_lambda=30.0, fisher_ema=0.9, weight_decay=0.01, amsgrad=True,
                        ewc_dtype=torch.float64)


def _local(batch, rank):
    """This rank's half of a global batch of 8 (rank None: the whole batch)."""
    x, y = batch
    return batch if rank is None else (x[4 * rank:4 * rank + 4], y[4 * rank:4 * rank + 4])


def _fisher_batches(rank):
    x, y = _data()[2]
    if rank is None:
        return [(x, y)]
    return [(x[s:e], y[s:e]) for s, e in FISHER_SPLIT[rank]]


def _train(model, opt, batches, rank):
    for batch in batches:
        x, y = _local(batch, rank)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()


def _scenario(model, opt, rank):
    """Task A, consolidate with estimate_fisher, task B, consolidate with the running Fisher, more B.

    Returns the Fisher of task A and the penalty at the end."""
    a, b, _ = _data()
    _train(model, opt, a, rank)
    ce = nn.CrossEntropyLoss(reduction="none")
    fisher = estimate_fisher(model, _fisher_batches(rank), ce, progress=False)
    opt.consolidate(fisher)
    _train(model, opt, b[:3], rank)
    opt.consolidate()  # the running Fisher: g² of the averaged gradients, the same on every rank
    _train(model, opt, b[3:], rank)
    return fisher, opt.ewc_penalty()


def _running_only(model, opt, rank):
    """The same without estimate_fisher: every number float64, so the runs agree to rounding."""
    a, b, _ = _data()
    _train(model, opt, a, rank)
    opt.consolidate()
    _train(model, opt, b[:3], rank)
    opt.consolidate()
    _train(model, opt, b[3:], rank)
    return opt.ewc_penalty()


def _tracked(model, opt, rank):
    """The per-sample running Fisher of track_fisher (summed over ranks), consolidated, then task B."""
    a, b, _ = _data()
    with opt.track_fisher(model):
        _train(model, opt, a, rank)
        running = {_strip(n): _full(f).clone() for n, f in opt.running_fisher().items()}
        opt.consolidate()
        _train(model, opt, b[:2], rank)
    return dict(running=running, **_record(model, opt, opt.ewc_penalty()))


def _record(model, opt, penalty):
    return dict(params={_strip(n): _full(p).detach().clone() for n, p in model.named_parameters()},
                state=_state_by_name(model, opt), penalty=penalty)


def _strip(name: str) -> str:
    return name.removeprefix("module.")


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _state_by_name(model, opt):
    return {_strip(n): {k: _full(v).detach().clone() for k, v in opt.state[p].items()}
            for n, p in model.named_parameters()}


# --------------------------------------------------------------------------- workers
def _init(rank: int, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))


def _expect_error(fn) -> str:
    try:
        fn()
    except (ValueError, TypeError, RuntimeError) as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


def _worker(rank: int, tmp: str) -> None:
    """One spawn for both scenarios (process start-up dominates the cost)."""
    _init(rank, tmp)
    try:
        _ddp_part(rank, tmp)
        _fsdp_part(rank, tmp)
    finally:
        dist.destroy_process_group()


def _ddp_part(rank: int, tmp: str) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from ewc_fused.distributed import all_reduce_fisher

    model = _net()
    ddp = DDP(model)
    opt = _opt(ddp.named_parameters())
    fisher, penalty = _scenario(ddp, opt, rank)
    ce = nn.CrossEntropyLoss(reduction="none")
    # on a fresh plain module: the helper on the local Fisher, and the same through process_group=
    fresh = _net()
    local = estimate_fisher(fresh, _fisher_batches(rank), ce, progress=False)
    n_local = sum(e - s for s, e in FISHER_SPLIT[rank])
    reduced, total = all_reduce_fisher(local, n_local)
    explicit = estimate_fisher(fresh, _fisher_batches(rank), ce, progress=False,
                               process_group=dist.group.WORLD)
    # ranks that disagree on the layout raise on every rank, instead of mixing parameters
    bad_keys = _expect_error(lambda: all_reduce_fisher({f"p{rank}": torch.ones(2)}, 1))
    # a rank whose data is bad makes every rank raise (nobody waits forever)
    bad_data = _expect_error(lambda: estimate_fisher(
        model, [(torch.full((2, 5), float("nan") if rank == 1 else 0.0, dtype=torch.float64),
                 torch.zeros(2, dtype=torch.long))], ce, progress=False, process_group=dist.group.WORLD))
    tight = DDP(_net())
    topt = _opt(tight.named_parameters())
    running_only = _record(tight, topt, _running_only(tight, topt, rank))
    tmodel = DDP(_net())
    tracked = _tracked(tmodel, _opt(tmodel.named_parameters()), rank)
    torch.save(dict(
        running_only=running_only, tracked=tracked,
        params={_strip(n): p.detach().clone() for n, p in ddp.named_parameters()},
        state=_state_by_name(ddp, opt), fisher={_strip(k): v for k, v in fisher.items()}, penalty=penalty,
        reduced=reduced, total=total, explicit=explicit, bad_keys=bad_keys, bad_data=bad_data,
    ), f"{tmp}/ddp{rank}.pt")


def _fsdp_part(rank: int, tmp: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict)
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor, init_device_mesh

    from ewc_fused.distributed import init_ewc_state

    def sharded(seed=0, dtype=torch.float64):
        m = _net(seed).to(dtype)
        for sub in (m.fc1, m.norm, m.head, m.gate):
            fully_shard(sub)
        fully_shard(m)
        return m

    model = sharded()
    opt = _opt(model.named_parameters())
    fisher, penalty = _scenario(model, opt, rank)
    out = dict(params={n: p.full_tensor() for n, p in model.named_parameters()},
               state=_state_by_name(model, opt), fisher=fisher, penalty=penalty,
               local_shapes={n: tuple(p.to_local().shape) for n, p in model.named_parameters()},
               state_types={k: type(v).__name__ for k, v in opt.state[model.fc1.weight].items()})

    tight = sharded()
    topt = _opt(tight.named_parameters())
    out["running_only"] = _record(tight, topt, _running_only(tight, topt, rank))
    tmodel = sharded()
    out["tracked"] = _tracked(tmodel, _opt(tmodel.named_parameters()), rank)

    # torch.distributed.checkpoint: save sharded, load into a fresh FSDP2 optimizer
    dcp.save(get_optimizer_state_dict(model, opt), checkpoint_id=f"{tmp}/ckpt")
    model2 = sharded(seed=5)
    opt2 = _opt(model2.named_parameters())
    init_ewc_state(opt2)  # DCP loads into existing keys
    sd = get_optimizer_state_dict(model2, opt2)
    dcp.load(sd, checkpoint_id=f"{tmp}/ckpt")
    set_optimizer_state_dict(model2, opt2, sd)
    out["loaded"] = _state_by_name(model2, opt2)
    out["loaded_types"] = {k: (type(v).__name__, tuple(getattr(v, "placements", ())))
                           for k, v in opt2.state[model2.fc1.weight].items()}
    # a full (gathered) state dict, distributed again on load
    full_opts = StateDictOptions(full_state_dict=True)
    full = get_optimizer_state_dict(model, opt, options=full_opts)
    model3 = sharded(seed=6)
    opt3 = _opt(model3.named_parameters())
    init_ewc_state(opt3)
    set_optimizer_state_dict(model3, opt3, full, options=full_opts)
    out["loaded_full"] = _state_by_name(model3, opt3)

    # resume from a single-process checkpoint: plain full tensors are sharded like the parameters
    ref = _single()
    model4 = sharded(seed=7)
    set_model_state_dict(model4, ref["model"].state_dict(), options=full_opts)
    opt4 = _opt(model4.named_parameters())
    opt4.load_state_dict(ref["opt"].state_dict())
    resume = _data()[1][:2]
    _train(model4, opt4, resume, rank)
    out["resumed"] = dict(params={n: p.full_tensor() for n, p in model4.named_parameters()},
                          state=_state_by_name(model4, opt4), penalty=opt4.ewc_penalty())

    # bad input: refused on every rank, with nothing changed
    w = model.fc1.weight
    before = {k: _full(v).clone() for k, v in opt.state[w].items()}
    errs = {}
    errs["differs"] = _expect_error(lambda: opt.consolidate({"fc1.weight": torch.full(w.shape, 1.0 + rank)}))
    neg = torch.ones(w.to_local().shape, dtype=torch.float64) * (-1.0 if rank == 1 else 1.0)
    errs["negative"] = _expect_error(lambda: opt.consolidate(
        {"fc1.weight": DTensor.from_local(neg, w.device_mesh, w.placements, shape=w.shape, stride=w.stride())}))
    errs["local_shape"] = _expect_error(lambda: opt.consolidate({"fc1.weight": torch.ones(w.to_local().shape)}))
    other = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("other",))
    errs["mesh"] = _expect_error(lambda: opt.consolidate(
        {"fc1.weight": distribute_tensor(torch.ones(w.shape, dtype=torch.float64), other, [Shard(0)])}))
    out["unchanged"] = all(torch.equal(_full(opt.state[w][k]), v) for k, v in before.items())
    # a DTensor Fisher with other placements (Replicate) is redistributed like the parameter
    rep = distribute_tensor(torch.ones(w.shape, dtype=torch.float64), w.device_mesh, [Replicate()])
    opt.consolidate({"fc1.weight": rep}, mode="online")
    out["replicate_ok"] = (tuple(opt.state[w]["ewc_fisher"].placements) == tuple(w.placements))
    # a parameter whose placement the state cannot follow (Partial), and a gradient placed otherwise
    mesh = w.device_mesh
    part = nn.Parameter(DTensor.from_local(torch.ones(3, dtype=torch.float64), mesh, [Partial()]))
    popt = FusedEWCAdam([part])
    part.grad = DTensor.from_local(torch.ones(3, dtype=torch.float64), mesh, [Partial()])
    errs["partial_step"] = _expect_error(popt.step)
    errs["partial_consolidate"] = _expect_error(lambda: popt.consolidate({part: torch.ones(3, dtype=torch.float64)}))
    q = nn.Parameter(distribute_tensor(torch.ones(4, dtype=torch.float64), mesh, [Shard(0)]))
    qopt = FusedEWCAdam([q])
    q.grad = distribute_tensor(torch.ones(4, dtype=torch.float64), mesh, [Replicate()])
    errs["grad_placement"] = _expect_error(qopt.step)
    # a sharded module with no per-sample rule: refused before any forward
    gen = nn.Sequential(nn.Linear(5, 7), Scale(7), nn.Linear(7, 3)).double()
    fully_shard(gen)
    errs["generic"] = _expect_error(lambda: estimate_fisher(
        gen, _fisher_batches(rank), nn.CrossEntropyLoss(reduction="none"), progress=False))
    out["errors"] = errs

    # the sharded root is itself the hooked Linear (no FSDP pre-backward fires anywhere else): the
    # Fisher is still all-reduced and the parameters are resharded afterwards
    root = nn.Linear(5, 3).double()
    fully_shard(root)
    xs, ys = _fisher_batches(rank)[0]
    out["root_linear"] = {}
    for mode in ("empirical", "exact"):
        f = estimate_fisher(root, [(xs, ys)], nn.CrossEntropyLoss(reduction="none"), mode=mode,
                            progress=False)
        out["root_linear"][mode] = ({k: _full(v).clone() for k, v in f.items()}, type(root.weight).__name__)

    # the Triton kernel (interpreted on CPU) steps the local shards too
    tmodel = sharded(dtype=torch.float32)
    out["triton"] = _triton_scenario(tmodel, rank)
    torch.save(out, f"{tmp}/fsdp{rank}.pt")


def _triton_scenario(model, rank):
    a, b, _ = _data()
    opt = FusedEWCAdam(model.named_parameters(), lr=0.05, ewc_lambda=30.0, fisher_ema=0.9, backend="triton")
    batches = [(x.float(), y) for x, y in a[:2]]
    _train(model, opt, batches, rank)
    opt.consolidate()
    _train(model, opt, [(x.float(), y) for x, y in b[:2]], rank)
    return dict(params={n: _full(p).detach().clone() for n, p in model.named_parameters()},
                state=_state_by_name(model, opt))


@pytest.fixture(scope="module")
def runs():
    tmp = tempfile.mkdtemp(prefix="ewc_dist_")
    mp.spawn(_worker, args=(tmp,), nprocs=WORLD, join=True)
    load = lambda name: [torch.load(f"{tmp}/{name}{r}.pt", weights_only=False) for r in range(WORLD)]  # noqa: E731
    return dict(tmp=tmp, ddp=load("ddp"), fsdp=load("fsdp"))


def _single():
    """The reference: one process, the whole global batches."""
    model = _net()
    opt = _opt(model.named_parameters())
    fisher, penalty = _scenario(model, opt, None)
    return dict(model=model, opt=opt, params={n: p.detach().clone() for n, p in model.named_parameters()},
                state=_state_by_name(model, opt), fisher=fisher, penalty=penalty)


@pytest.fixture(scope="module")
def single():
    return _single()


@pytest.fixture(scope="module")
def running_only():
    model = _net()
    opt = _opt(model.named_parameters())
    return _record(model, opt, _running_only(model, opt, None))


@pytest.fixture(scope="module")
def tracked_single():
    model = _net()
    return _tracked(model, _opt(model.named_parameters()), None)


@pytest.fixture(scope="module")
def ddp_runs(runs):
    return runs["ddp"]


@pytest.fixture(scope="module")
def fsdp_runs(runs):
    return runs["tmp"], runs["fsdp"]


def _close(a, b, what, tol):
    assert a.shape == b.shape, what
    torch.testing.assert_close(a.double(), b.double(), msg=lambda m: f"{what}: {m}", **tol)


def _compare_run(run, ref, tol_train):
    assert set(run["params"]) == set(ref["params"])
    for n in ref.get("fisher", ()):
        _close(run["fisher"][n], ref["fisher"][n], f"fisher {n}", FISHER)
    for n, p in ref["params"].items():
        _close(run["params"][n], p, f"param {n}", tol_train)
        assert set(run["state"][n]) == set(ref["state"][n]), n
        for k, v in ref["state"][n].items():
            _close(run["state"][n][k], v, f"state {k} of {n}", tol_train)
    _close(run["penalty"], ref["penalty"], "penalty", tol_train)
    assert float(ref["penalty"]) > 0


# --------------------------------------------------------------------------- DDP
def test_ddp_equals_single_process(ddp_runs, single):
    for run in ddp_runs:
        _compare_run(run, single, FISHER)


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_running_fisher_only_equals_single_process_tightly(runs, running_only, kind):
    """Step, running Fisher, consolidate (K summed over shards) and penalty, all float64: to 1e-10."""
    for run in runs[kind]:
        _compare_run(run["running_only"], running_only, TIGHT)


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_track_fisher_sums_per_sample_terms_over_ranks(runs, tracked_single, kind):
    """track_fisher's Σ_n (∇ℓ_n)² and N are summed over the ranks at every step: the running Fisher is the
    per-sample Fisher of the global batches (fp32 buffers, so to FISHER)."""
    for run in runs[kind]:
        got = run["tracked"]
        assert set(got["running"]) == set(tracked_single["running"])
        for n, f in tracked_single["running"].items():
            _close(got["running"][n], f, f"tracked running Fisher {n}", FISHER)
        _compare_run(got, tracked_single, FISHER)


def test_ddp_ranks_agree_bitwise(ddp_runs):
    """Averaged gradients and reduced Fisher sums: every replica holds the same numbers."""
    r0, r1 = ddp_runs
    for n in r0["params"]:
        assert torch.equal(r0["params"][n], r1["params"][n]), n
        for k in r0["state"][n]:
            assert torch.equal(r0["state"][n][k], r1["state"][n][k]), f"{k} of {n}"


def test_ddp_fisher_reduction_is_the_fisher_of_all_samples(ddp_runs):
    ref = estimate_fisher(_net(), _fisher_batches(None), nn.CrossEntropyLoss(reduction="none"), progress=False)
    for run in ddp_runs:
        assert run["total"] == 8
        for n, f in ref.items():
            _close(run["reduced"][n], f, f"all_reduce_fisher {n}", FISHER)
            _close(run["explicit"][n], f, f"estimate_fisher(process_group=) {n}", FISHER)


def test_ddp_disagreement_raises_on_every_rank(ddp_runs):
    for run in ddp_runs:
        assert run["bad_keys"].startswith("ValueError") and "ranks hold different tensors" in run["bad_keys"]
    assert "non-finite" in ddp_runs[1]["bad_data"]
    assert "failed on another rank" in ddp_runs[0]["bad_data"]


# --------------------------------------------------------------------------- FSDP2
def test_fsdp2_equals_single_process(fsdp_runs, single):
    _, runs = fsdp_runs
    for run in runs:
        _compare_run(run, single, FISHER)
    r0, r1 = runs
    assert r0["local_shapes"]["fc1.weight"] == (4, 5) and r1["local_shapes"]["fc1.weight"] == (3, 5)
    assert r1["local_shapes"]["gate.bias"] == (0,)  # an empty shard
    # the EWC state has the parameter's placement (DCP can save and reshard it)
    for k in ("exp_avg", "ewc_fisher", "ewc_anchor", "fisher_ema"):
        assert r0["state_types"][k] == "DTensor", k
    assert r0["state_types"]["ewc_const"] == "Tensor"


def test_fsdp2_root_linear_fisher_is_reduced_and_resharded(fsdp_runs):
    """A reviewer's case: fully_shard on a lone Linear. Both ranks get the same (all-reduced)
    Fisher for both parameters, and the parameters are DTensors again afterwards."""
    _, (r0, r1) = fsdp_runs
    for mode in ("empirical", "exact"):
        (f0, t0), (f1, t1) = r0["root_linear"][mode], r1["root_linear"][mode]
        assert set(f0) == {"weight", "bias"} and t0 == t1 == "DTensor", (mode, set(f0), t0, t1)
        for k in f0:
            assert float(f0[k].abs().max()) > 0
            torch.testing.assert_close(f0[k], f1[k], rtol=1e-6, atol=0)


def test_fsdp2_dcp_round_trip(fsdp_runs):
    _, runs = fsdp_runs
    for run in runs:
        assert run["loaded_types"]["ewc_fisher"][0] == "DTensor"
        for n, st in run["state"].items():
            assert set(run["loaded"][n]) == set(st), n
            for k, v in st.items():
                assert torch.equal(run["loaded"][n][k], v), f"{k} of {n} after DCP load"


def test_fsdp2_full_state_dict_round_trip(fsdp_runs):
    _, runs = fsdp_runs
    for run in runs:
        for n, st in run["state"].items():
            for k, v in st.items():
                assert torch.equal(run["loaded_full"][n][k], v), f"{k} of {n} after a full state dict load"


def test_fsdp2_resumes_from_single_process_checkpoint(fsdp_runs, single):
    """opt.load_state_dict of a plain optimizer's state dict shards every state tensor like its parameter."""
    _, runs = fsdp_runs
    model = copy.deepcopy(single["model"])
    opt = _opt(model.named_parameters())
    opt.load_state_dict(single["opt"].state_dict())
    _train(model, opt, _data()[1][:2], None)
    ref = dict(params={n: p.detach() for n, p in model.named_parameters()}, state=_state_by_name(model, opt))
    for run in runs:
        got = run["resumed"]
        for n, p in ref["params"].items():
            _close(got["params"][n], p, f"resumed param {n}", TIGHT)
            for k, v in ref["state"][n].items():
                _close(got["state"][n][k], v, f"resumed {k} of {n}", TIGHT)
        _close(got["penalty"], opt.ewc_penalty(), "resumed penalty", TIGHT)


def test_fsdp2_checkpoint_reshards_to_one_process(fsdp_runs, single):
    """The 2-rank DCP checkpoint loads into a plain single-process optimizer."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    from ewc_fused.distributed import init_ewc_state

    tmp, _ = fsdp_runs
    model = _net(seed=7)
    opt = _opt(model.named_parameters())
    init_ewc_state(opt)  # creates Adam's state too: every key DCP loads into
    sd = get_optimizer_state_dict(model, opt)
    dcp.load(sd, checkpoint_id=f"{tmp}/ckpt")
    set_optimizer_state_dict(model, opt, sd)
    got = _state_by_name(model, opt)
    for n, st in single["state"].items():
        for k, v in st.items():
            _close(got[n][k], v, f"resharded {k} of {n}", FISHER)


def test_fsdp2_bad_input_raises_on_every_rank(fsdp_runs):
    _, runs = fsdp_runs
    for rank, run in enumerate(runs):
        e = run["errors"]
        assert run["unchanged"], "a refused consolidate changed the state"
        assert "differs between ranks" in e["differs"] and "'fc1.weight'" in e["differs"]
        if rank == 1:
            assert "negative values" in e["negative"]
        else:
            assert "refused on another rank" in e["negative"] and "'fc1.weight'" in e["negative"]
        assert "global shape (7, 5)" in e["local_shape"] and "shard shape" in e["local_shape"]
        assert "cannot follow" in e["mesh"]
        assert "Partial" in e["partial_step"] and "parameter 0 of param group 0" in e["partial_step"]
        assert "Partial" in e["partial_consolidate"]
        assert "gradient" in e["grad_placement"] and "Replicate" in e["grad_placement"]
        assert run["replicate_ok"]
        assert "module '1' (Scale)" in e["generic"] and "no built-in per-sample rule" in e["generic"]


def test_fsdp2_triton_backend_steps_local_shards(fsdp_runs):
    _, runs = fsdp_runs
    ref = _triton_scenario(_net().float(), None)
    for run in runs:
        for n, p in ref["params"].items():
            _close(run["triton"]["params"][n], p, f"triton param {n}", FP32)
            for k, v in ref["state"][n].items():
                _close(run["triton"]["state"][n][k], v, f"triton state {k} of {n}", FP32)
