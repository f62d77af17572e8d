"""Fisher files: ewc_fused.save_fisher / load_fisher (safetensors, atomic, checked)."""
from __future__ import annotations

import datetime
import json
import math
import os
import pathlib
import signal
import subprocess
import sys
import textwrap

import pytest
import safetensors
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn

import ewc_fused
from ewc_fused import FusedEWCAdam, estimate_fisher, load_fisher, save_fisher
from ewc_fused import fisher_io
from ewc_fused.fisher_io import FisherDict

from .helpers import assert_same_state

_INT_VIEW = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16,
             torch.bfloat16: torch.int16}
for _name in ("float8_e4m3fn", "float8_e5m2"):
    if hasattr(torch, _name):
        _INT_VIEW[getattr(torch, _name)] = torch.uint8


def _bits(t):
    return t.contiguous().view(_INT_VIEW[t.dtype])


def _header(path):
    with safetensors.safe_open(str(path), framework="pt") as h:
        return h.metadata()


def _snapshot(directory):
    """{name: bytes, or the snapshot of a subdirectory} of a directory, hidden entries included."""
    return {p.name: _snapshot(p) if p.is_dir() else p.read_bytes() for p in sorted(pathlib.Path(directory).iterdir())}


class _Net(nn.Module):
    def __init__(self, hidden=128):
        super().__init__()
        self.fc1 = nn.Linear(64, hidden)
        self.fc2 = nn.Linear(hidden, 10)
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)


def _rand_fisher(model, trainable_only=True, dtype=torch.float32):
    return {n: torch.rand(p.shape, dtype=dtype) * (i + 1)
            for i, (n, p) in enumerate(model.named_parameters()) if p.requires_grad or not trainable_only}


# --------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("dtype", list(_INT_VIEW), ids=str)
def test_round_trip_bit_exact(tmp_path, dtype):
    fi = torch.finfo(dtype)
    special = torch.tensor([0.0, -0.0, fi.tiny, fi.max, fi.eps, 1.0], dtype=torch.float64)
    if dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        special = torch.cat([special, torch.tensor([fi.tiny / 4], dtype=torch.float64)])  # a subnormal
    fisher = {
        "b.weight": (torch.rand(33, 7, dtype=torch.float64) * 10).to(dtype),
        "a.bias": special.to(dtype),
        "scalar": torch.tensor(3.0).to(dtype),
    }
    save_fisher(tmp_path / "f.safetensors", fisher)
    got = load_fisher(tmp_path / "f.safetensors")
    assert list(got) == list(fisher)  # the saved order, not sorted
    for k, want in fisher.items():
        assert got[k].dtype == dtype and got[k].shape == want.shape and got[k].device.type == "cpu", k
        assert torch.equal(_bits(got[k]), _bits(want)), k  # bit-exact, -0.0 included
    assert got.metadata["dtypes"] == [str(dtype).removeprefix("torch.")]


def test_mixed_dtypes_in_one_file(tmp_path):
    fisher = {"x": torch.rand(5, dtype=torch.bfloat16), "y": torch.rand(3, dtype=torch.float16),
              "z": torch.rand(2, 2)}
    save_fisher(tmp_path / "f", fisher)
    got = load_fisher(tmp_path / "f")
    assert {k: v.dtype for k, v in got.items()} == {k: v.dtype for k, v in fisher.items()}
    assert all(torch.equal(got[k], fisher[k]) for k in fisher)
    assert got.metadata["dtypes"] == ["bfloat16", "float16", "float32"]


def test_metadata_round_trip(tmp_path):
    user = {
        "mode": "empirical", "n_samples": 1234, "big": 2**70, "lr": 0.1, "tiny": 1e-300, "flag": True,
        "nothing": None, "task": "Aτ", "sizes": [1, 2.5, None, "x"], "cfg": {"a": {"b": [True, {"c": 1}]}},
        "pair": (1, 2), "path": "p", "fisher": "f",  # same names as save_fisher's positional parameters
    }
    before = datetime.datetime.now(datetime.timezone.utc)
    save_fisher(tmp_path / "f", {"w": torch.rand(3, 2)}, **user, nan=float("nan"))
    after = datetime.datetime.now(datetime.timezone.utc)
    got = load_fisher(tmp_path / "f")
    assert isinstance(got, FisherDict) and isinstance(got, dict)
    nan = got.user_metadata.pop("nan")
    assert isinstance(nan, float) and math.isnan(nan)
    want = dict(user, pair=[1, 2])  # tuples load as lists
    assert got.user_metadata == want
    for k, v in want.items():
        assert got.metadata[k] == v and type(got.metadata[k]) is type(v), k
    md = got.metadata
    assert md["format"] == "ewc_fused.fisher" and md["format_version"] == 1
    assert md["ewc_fused_version"] == ewc_fused.__version__
    assert md["torch_version"] == str(torch.__version__)
    created = datetime.datetime.fromisoformat(md["created"])
    assert created.utcoffset() == datetime.timedelta(0) and before <= created <= after
    assert md["tensors"] == {"w": {"dtype": "float32", "shape": [3, 2]}}
    # the header itself is str -> str, readable by any safetensors reader
    header = _header(tmp_path / "f")
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in header.items())
    assert header["format"] == "ewc_fused.fisher"


def test_fisher_dict_saves_again(tmp_path):
    fisher = {"w": torch.rand(4, 3), "b": torch.rand(4)}
    save_fisher(tmp_path / "1", fisher, task="A", n_samples=7)
    first = load_fisher(tmp_path / "1")
    save_fisher(tmp_path / "2", first, **first.user_metadata)
    second = load_fisher(tmp_path / "2")
    assert second.user_metadata == {"task": "A", "n_samples": 7}
    assert all(torch.equal(second[k], fisher[k]) for k in fisher)


def test_path_types(tmp_path):
    fisher = {"w": torch.rand(3)}
    save_fisher(str(tmp_path / "s"), fisher)
    save_fisher(tmp_path / "p", fisher)
    for p in (tmp_path / "s", str(tmp_path / "p")):
        assert torch.equal(load_fisher(p)["w"], fisher["w"])
    with pytest.raises(TypeError, match="os.PathLike"):
        save_fisher(123, fisher)
    with pytest.raises(TypeError, match="os.PathLike"):
        load_fisher(None)


def test_views_shared_storage_and_strides(tmp_path):
    base = torch.rand(10, 8)
    base_copy = base.clone()
    same = torch.rand(3)
    fisher = {
        "transposed": base.t(),          # non-contiguous
        "rows": base[:3],                # contiguous view sharing storage with the others
        "more_rows": base[3:5],
        "column": base[:, 2],            # strided view
        "alias1": same, "alias2": same,  # one tensor under two names
        "broadcast": torch.rand(4).expand(3, 4),  # stride 0
        "empty": base[5:5],
        "param": nn.Parameter(torch.rand(2, 2)),  # requires grad
    }
    save_fisher(tmp_path / "f", fisher)
    got = load_fisher(tmp_path / "f")
    for k, v in fisher.items():
        assert got[k].shape == v.shape and torch.equal(got[k], v.detach()), k
        assert got[k].is_contiguous() and not got[k].requires_grad, k
    assert torch.equal(base, base_copy)  # the caller's tensors are not touched
    got["rows"].add_(1)
    assert torch.equal(got["more_rows"], fisher["more_rows"])  # loaded tensors do not share memory


# --------------------------------------------------------------------------- into the optimizer
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_loaded_fisher_consolidates_like_the_original(tmp_path, dtype):
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))  # equal shapes: a mix-up of names would show
    fisher = {n: torch.rand(p.shape, dtype=dtype) * (i + 1) for i, (n, p) in enumerate(model.named_parameters())}
    save_fisher(tmp_path / "f", fisher, mode="empirical")
    loaded = load_fisher(tmp_path / "f", model)

    def consolidated(f):
        m = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
        m.load_state_dict(model.state_dict())
        opt = FusedEWCAdam(m.named_parameters(), lr=1e-2, ewc_lambda=3.0)
        opt.consolidate(f)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.1)
                p.grad = torch.ones_like(p)
        opt.step()
        return opt.state_dict(), opt.ewc_penalty(), [p.detach().clone() for p in m.parameters()]

    want_state, want_pen, want_params = consolidated(fisher)
    got_state, got_pen, got_params = consolidated(loaded)
    assert_same_state(got_state, want_state)
    assert torch.equal(got_pen, want_pen)
    assert all(torch.equal(a, b) for a, b in zip(got_params, want_params))
    # the comparison sees a mix-up: swapping two same-shaped entries changes the state
    swapped = dict(fisher)
    swapped["0.weight"], swapped["1.weight"] = fisher["1.weight"], fisher["0.weight"]
    with pytest.raises(AssertionError):
        assert_same_state(consolidated(swapped)[0], want_state)


def test_estimate_fisher_save_load_against_model(tmp_path):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    model[0].bias.requires_grad_(False)  # frozen: not estimated, may be absent from the file
    data = [(torch.randn(5, 6), torch.randint(0, 3, (5,))) for _ in range(2)]
    fisher = estimate_fisher(model, data, lambda out, y: F.cross_entropy(out, y, reduction="none"))
    assert "0.bias" not in fisher
    save_fisher(tmp_path / "task_a.fisher", fisher, mode="empirical", n_samples=10, task="A")
    loaded = load_fisher(tmp_path / "task_a.fisher", model)
    assert list(loaded) == list(fisher)
    for k in fisher:
        assert loaded[k].dtype == torch.float32 and torch.equal(loaded[k], fisher[k]), k
    assert loaded.user_metadata == {"mode": "empirical", "n_samples": 10, "task": "A"}
    opt = FusedEWCAdam(model.named_parameters(), ewc_lambda=10.0)
    opt.consolidate(loaded)
    assert torch.equal(opt.state[model[2].weight]["ewc_fisher"], fisher["2.weight"])
    assert "ewc_fisher" not in opt.state.get(model[0].bias, {})


# --------------------------------------------------------------------------- against a model
def test_model_mismatches_listed_at_once(tmp_path):
    model = _Net(hidden=128)
    fisher = _rand_fisher(_Net(hidden=256))  # fc1.weight (256, 64), fc1.bias (256,), fc2.weight (10, 256)
    del fisher["fc2.bias"]
    fisher["head.weight"] = torch.rand(3)
    save_fisher(tmp_path / "f", fisher)
    with pytest.raises(ValueError) as ei:
        load_fisher(tmp_path / "f", model)
    msg = str(ei.value)
    assert str(tmp_path / "f") in msg and "5 problems" in msg
    assert "fc1.weight: file (256, 64) vs model (128, 64)" in msg
    assert "fc1.bias: file (256,) vs model (128,)" in msg
    assert "fc2.weight: file (10, 256) vs model (10, 128)" in msg
    assert "head.weight: in the file but not a parameter of the model" in msg
    assert "fc2.bias: trainable parameter of shape (10,) missing from the file" in msg
    assert "frozen" not in msg.split("\n(")[0]  # frozen parameters absent: fine, not listed
    load_fisher(tmp_path / "f")  # without a model nothing is compared


def test_frozen_parameters(tmp_path):
    model = _Net()
    only_trainable = _rand_fisher(model)
    save_fisher(tmp_path / "t", only_trainable)
    got = load_fisher(tmp_path / "t", model)
    assert set(got) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}

    everything = _rand_fisher(model, trainable_only=False)  # an entry for a frozen parameter is kept
    save_fisher(tmp_path / "all", everything)
    got = load_fisher(tmp_path / "all", model)
    assert list(got) == [n for n, _ in model.named_parameters()]
    assert torch.equal(got["frozen.weight"], everything["frozen.weight"])
    opt = FusedEWCAdam(model.named_parameters())
    opt.consolidate(got)  # consolidate skips the frozen entry
    assert "ewc_fisher" not in opt.state.get(model.frozen.weight, {})

    everything["frozen.weight"] = torch.rand(5, 4)  # frozen entries are shape-checked too
    save_fisher(tmp_path / "bad", everything)
    with pytest.raises(ValueError, match=r"frozen.weight: file \(5, 4\) vs model \(4, 4\)"):
        load_fisher(tmp_path / "bad", model)


def test_tied_alias_name_is_explained(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False))
    model[1].weight = model[0].weight
    save_fisher(tmp_path / "f", {"1.weight": torch.rand(4, 4)})
    with pytest.raises(ValueError) as ei:
        load_fisher(tmp_path / "f", model)
    assert "1.weight: in the file but not a parameter of the model (a tied alias of '0.weight'" in str(ei.value)
    assert "0.weight: trainable parameter of shape (4, 4) missing" in str(ei.value)


def test_device_placement(tmp_path):
    model = nn.Linear(3, 2, device="meta")
    fisher = {"weight": torch.rand(2, 3), "bias": torch.rand(2)}
    save_fisher(tmp_path / "f", fisher)
    on_params = load_fisher(tmp_path / "f", model)
    assert all(t.device.type == "meta" and t.dtype == torch.float32 for t in on_params.values())
    explicit = load_fisher(tmp_path / "f", model, device="cpu")
    assert all(torch.equal(explicit[k], fisher[k]) for k in fisher)
    assert load_fisher(tmp_path / "f", device="meta")["weight"].device.type == "meta"


@pytest.mark.cuda
def test_cuda_round_trip(tmp_path):
    model = nn.Linear(5, 4).cuda()
    fisher = {n: torch.rand(p.shape, device="cuda").t().contiguous().t() for n, p in model.named_parameters()}
    save_fisher(tmp_path / "f", fisher)
    got = load_fisher(tmp_path / "f", model)
    assert all(got[k].device == model.weight.device and torch.equal(got[k], fisher[k]) for k in fisher)
    assert load_fisher(tmp_path / "f", model, device="cpu")["weight"].device.type == "cpu"


# --------------------------------------------------------------------------- refused at save
@pytest.fixture
def no_temp_files(monkeypatch):
    """Fail if save_fisher starts writing: validation must come first."""
    def refuse(*a, **k):
        raise AssertionError("save_fisher started writing before refusing its input")
    monkeypatch.setattr(fisher_io.tempfile, "mkdtemp", refuse)


@pytest.mark.parametrize("values, problem", [
    ([float("nan")] * 3, "has 3 NaN values"),
    ([float("inf")], "has 1 +inf value;"),
    ([-float("inf"), -float("inf")], "has 2 -inf values"),
    ([-0.5, -0.25], "has 2 negative values (min -0.5)"),
    ([float("nan"), -1.0], "has 1 NaN value, 1 negative value (min -1)"),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_save_refuses_bad_values(tmp_path, values, problem, dtype):
    good = {"fc0.weight": torch.rand(3), "fc1.weight": torch.rand(4, 4)}
    save_fisher(tmp_path / "f", good)
    before = _snapshot(tmp_path)
    bad = {k: v.clone().to(dtype) for k, v in good.items()}
    bad["fc1.weight"].view(-1)[5:5 + len(values)] = torch.tensor(values, dtype=dtype)
    with pytest.raises(ValueError) as ei:
        save_fisher(tmp_path / "f", bad)
    assert f"fisher['fc1.weight'] {problem}" in str(ei.value)
    assert _snapshot(tmp_path) == before  # old file byte-identical, no temp file


@pytest.mark.parametrize("fisher, exc, match", [
    ({}, ValueError, "empty"),
    ([("w", torch.ones(2))], TypeError, "mapping"),
    ({"w": [1.0, 2.0]}, TypeError, r"fisher\['w'\] must be a tensor, got list"),
    ({"w": torch.ones(2, dtype=torch.int64)}, TypeError, r"fisher\['w'\] must be a floating-point tensor"),
    ({"w": torch.ones(2, dtype=torch.complex64)}, TypeError, r"fisher\['w'\] must be a floating-point tensor"),
    ({"w": torch.eye(2).to_sparse()}, TypeError, r"fisher\['w'\] is a torch.sparse_coo tensor"),
    ({"w": torch.ones(2, device="meta")}, ValueError, r"fisher\['w'\] is on the meta device"),
    ({nn.Parameter(torch.ones(2)): torch.ones(2)}, TypeError, "keys must be parameter names"),
    ({"__metadata__": torch.ones(2)}, ValueError, "reserves"),
])
def test_save_refuses_bad_fisher(tmp_path, no_temp_files, fisher, exc, match):
    with pytest.raises(exc, match=match):
        save_fisher(tmp_path / "f", fisher)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("metadata, exc, match", [
    ({"step": torch.tensor(3)}, TypeError, "metadata 'step' is of type Tensor"),
    ({"ids": {1, 2}}, TypeError, "metadata 'ids' is of type set"),
    ({"cfg": {"opt": {"betas": object()}}}, TypeError, r"metadata 'cfg'\['opt'\]\['betas'\] is of type object"),
    ({"cfg": {1: "a"}}, TypeError, "metadata 'cfg' has a key of type int"),
    ({"format": "mine"}, ValueError, "metadata key 'format' is reserved"),
    ({"created": "today"}, ValueError, "metadata key 'created' is reserved"),
])
def test_save_refuses_bad_metadata(tmp_path, no_temp_files, metadata, exc, match):
    with pytest.raises(exc, match=match):
        save_fisher(tmp_path / "f", {"w": torch.ones(2)}, **metadata)
    assert list(tmp_path.iterdir()) == []


def test_save_needs_an_existing_directory(tmp_path, no_temp_files):
    with pytest.raises(FileNotFoundError, match="does not exist") as ei:
        save_fisher(tmp_path / "nope" / "f", {"w": torch.ones(2)})
    assert str(tmp_path / "nope") in str(ei.value)
    with pytest.raises(IsADirectoryError, match="is a directory"):
        save_fisher(tmp_path, {"w": torch.ones(2)})


# --------------------------------------------------------------------------- refused at load
def _craft(tmp_path, tensors, header_changes=()):
    """A file with save_fisher's own header for tensors of these names/dtypes/shapes, but
    the given values (written by safetensors directly), with header entries changed or,
    for None, removed."""
    save_fisher(tmp_path / "template", {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in tensors.items()})
    header = _header(tmp_path / "template")
    header.update(dict(header_changes))
    header = {k: v for k, v in header.items() if v is not None}
    safetensors.torch.save_file(tensors, str(tmp_path / "crafted"), metadata=header)
    return tmp_path / "crafted"


def test_crafted_file_with_valid_values_loads(tmp_path):
    # control for the crafted-file tests below: the crafting itself gives a loadable file
    path = _craft(tmp_path, {"w": torch.tensor([1.0, 2.0])})
    assert torch.equal(load_fisher(path)["w"], torch.tensor([1.0, 2.0]))


@pytest.mark.parametrize("bad, problem", [
    (float("nan"), "has 1 NaN value"),
    (float("inf"), "has 1 +inf value"),
    (-3.0, "has 1 negative value (min -3)"),
])
def test_load_refuses_bad_values(tmp_path, bad, problem):
    path = _craft(tmp_path, {"fc1.weight": torch.tensor([1.0, bad, 2.0])})
    with pytest.raises(ValueError) as ei:
        load_fisher(path)
    assert str(path) in str(ei.value) and f"fisher['fc1.weight'] {problem}" in str(ei.value)


@pytest.mark.parametrize("changes, match", [
    ({"format": None}, "not a Fisher file written by ewc_fused.save_fisher .*no 'format' tag"),
    ({"format": "someone.else"}, "format='someone.else'"),
    ({"format_version": "2"}, "format version 2, written by a newer ewc_fused"),
    ({"format_version": "one"}, "format_version 'one' is not an integer"),
    ({"tensors": None}, r"header lacks \['tensors'\]"),
    ({"user_metadata": "{not json"}, "not valid JSON"),
    ({"tensors": json.dumps({"w": {"dtype": "float32", "shape": [3, 1]}})}, "header records"),
    ({"tensors": json.dumps({"v": {"dtype": "float32", "shape": [3]}})}, r"header lists tensors \['v'\]"),
])
def test_load_refuses_bad_headers(tmp_path, changes, match):
    path = _craft(tmp_path, {"w": torch.ones(3)}, changes)
    with pytest.raises(ValueError, match=match) as ei:
        load_fisher(path)
    assert str(path) in str(ei.value)


def test_load_refuses_foreign_safetensors(tmp_path):
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file({"w": torch.ones(3)}, str(path))  # no metadata at all
    with pytest.raises(ValueError, match="not a Fisher file written by ewc_fused.save_fisher") as ei:
        load_fisher(path)
    assert str(path) in str(ei.value)


@pytest.mark.parametrize("damage", ["truncated", "header_only", "garbage", "empty", "torch_save"])
def test_load_refuses_damaged_files(tmp_path, damage):
    save_fisher(tmp_path / "good", {"w": torch.rand(100), "v": torch.rand(7)})
    data = (tmp_path / "good").read_bytes()
    path = tmp_path / "bad"
    if damage == "truncated":
        path.write_bytes(data[:-9])
    elif damage == "header_only":
        path.write_bytes(data[:40])
    elif damage == "garbage":
        path.write_bytes(bytes(range(256)) * 3)
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        torch.save({"w": torch.rand(3)}, path)  # a pickle: must be refused, never unpickled
    with pytest.raises(ValueError) as ei:
        load_fisher(path)
    assert str(path) in str(ei.value)


def test_load_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist") as ei:
        load_fisher(tmp_path / "missing")
    assert str(tmp_path / "missing") in str(ei.value)


# --------------------------------------------------------------------------- atomic writes
_OLD = {"w": torch.full((64,), 1.0), "b": torch.full((3,), 2.0)}


def _fail_replace(monkeypatch):
    def boom(*a, **k):
        raise OSError("disk full (simulated) in os.replace")
    monkeypatch.setattr(fisher_io.os, "replace", boom)
    return OSError


def _fail_serialise(monkeypatch):
    real = safetensors.torch.save_file

    def partial(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(100)  # partial bytes on disk, then the writer fails
        raise RuntimeError("I/O error (simulated) while serialising")
    monkeypatch.setattr(safetensors.torch, "save_file", partial)
    return RuntimeError


def _interrupt_fsync(monkeypatch):
    def interrupt(fd):
        raise KeyboardInterrupt
    monkeypatch.setattr(fisher_io.os, "fsync", interrupt)
    return KeyboardInterrupt


@pytest.mark.parametrize("fail", [_fail_replace, _fail_serialise, _interrupt_fsync])
def test_failed_write_leaves_old_file_and_no_temp(tmp_path, monkeypatch, fail):
    path = tmp_path / "f.safetensors"
    save_fisher(path, _OLD, task="old")
    before = _snapshot(tmp_path)
    exc = fail(monkeypatch)
    with pytest.raises(exc):
        save_fisher(path, {"w": torch.rand(1000)}, task="new")
    monkeypatch.undo()
    assert _snapshot(tmp_path) == before  # byte-identical, no temp file left
    assert load_fisher(path).user_metadata == {"task": "old"}


_CRASH_CHILD = textwrap.dedent("""
    import os, resource, signal, sys
    import safetensors.torch
    import torch
    from ewc_fused import save_fisher
    path, how = sys.argv[1], sys.argv[2]
    new = {"w": torch.rand(1 << 20), "b": torch.rand(1 << 18)}  # about 5 MB
    if how == "file_size_limit":
        # The kernel kills this process (SIGXFSZ) inside safetensors' writer as soon as it
        # grows the file past 1 MiB (safetensors 0.8 preallocates the whole file first).
        resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))
        signal.signal(signal.SIGXFSZ, signal.SIG_DFL)  # Python ignores it by default
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    elif how == "mid_write":  # the writer puts half the real bytes on disk, then the process dies
        def half_then_die(tensors, filename, metadata=None):
            data = safetensors.torch.save(tensors, metadata=metadata)
            with open(filename, "wb") as f:
                f.write(data[: len(data) // 2])
                f.flush()
                os.fsync(f.fileno())
            os._exit(4)
        safetensors.torch.save_file = half_then_die
    else:  # the whole file is written and fsynced; die just before the rename
        os.replace = lambda *a, **k: os._exit(3)
    save_fisher(path, new, task="new")
    print("save_fisher returned")
""")


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs POSIX resource limits")
@pytest.mark.parametrize("how, rc", [("file_size_limit", -getattr(signal, "SIGXFSZ", 0)), ("mid_write", 4),
                                     ("before_rename", 3)])
def test_crash_during_save_keeps_old_file(tmp_path, how, rc):
    path = tmp_path / "f.safetensors"
    save_fisher(path, _OLD, task="old")
    before = path.read_bytes()
    proc = subprocess.run([sys.executable, "-c", _CRASH_CHILD, str(path), how],
                          capture_output=True, text=True, timeout=120)
    assert "save_fisher returned" not in proc.stdout, proc.stderr
    assert proc.returncode == rc, proc.stderr
    assert path.read_bytes() == before
    old = load_fisher(path)
    assert old.user_metadata == {"task": "old"} and all(torch.equal(old[k], _OLD[k]) for k in _OLD)
    # what was in flight is in one hidden directory of ours, which load_fisher(path) never reads
    left = [p for p in tmp_path.iterdir() if p != path]
    assert len(left) == 1 and left[0].is_dir(), left
    assert left[0].name.startswith(".f.safetensors.") and left[0].name.endswith(".tmp")
    partial = [p for p in left[0].rglob("*") if p.is_file()]
    assert len(partial) == 1, partial
    full_size = ((1 << 20) + (1 << 18)) * 4  # the fp32 data alone, header aside
    if how == "before_rename":
        assert partial[0].stat().st_size > full_size
        assert load_fisher(partial[0]).user_metadata == {"task": "new"}  # complete, but never renamed
    else:
        assert partial[0].stat().st_size <= (1 << 20 if how == "file_size_limit" else full_size // 2 + 1000)
        with pytest.raises(ValueError, match="truncated or corrupt"):
            load_fisher(partial[0])


# --------------------------------------------------------------------------- file system details
@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_permissions_follow_umask_and_existing_file(tmp_path):
    old_umask = os.umask(0o027)
    try:
        save_fisher(tmp_path / "new", {"w": torch.ones(2)})
    finally:
        os.umask(old_umask)
    assert (tmp_path / "new").stat().st_mode & 0o777 == 0o640  # as open() would create it, not mkstemp's 0o600
    os.chmod(tmp_path / "new", 0o604)
    save_fisher(tmp_path / "new", {"w": torch.ones(3)})
    assert (tmp_path / "new").stat().st_mode & 0o777 == 0o604  # overwriting keeps the mode


@pytest.mark.skipif(os.name != "posix", reason="symlinks")
def test_save_through_symlink_updates_target(tmp_path):
    (tmp_path / "real").mkdir()
    save_fisher(tmp_path / "real" / "f", {"w": torch.ones(2)})
    (tmp_path / "link").symlink_to(tmp_path / "real" / "f")
    save_fisher(tmp_path / "link", {"w": torch.full((2,), 5.0)})
    assert (tmp_path / "link").is_symlink()
    assert torch.equal(load_fisher(tmp_path / "real" / "f")["w"], torch.full((2,), 5.0))
