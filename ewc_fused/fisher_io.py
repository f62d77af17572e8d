"""Fisher files: save a diagonal Fisher to a safetensors file and load it back, checked.

    save_fisher("task_a.fisher.safetensors", fisher, mode="empirical", n_samples=1234, task="A")
    fisher = load_fisher("task_a.fisher.safetensors", model)   # checked against the model
    opt.consolidate(fisher)

File layout: a plain safetensors file (no pickle), one tensor per parameter name in
the dtype it was given, and in the header's string metadata:

* ``format`` = ``"ewc_fused.fisher"`` and ``format_version`` = ``"1"``: the tag
  :func:`load_fisher` requires (other safetensors files are refused);
* ``ewc_fused_version``, ``torch_version``, ``created`` (UTC, ISO 8601);
* ``dtypes`` (JSON list) and ``tensors`` (JSON ``{name: {"dtype", "shape"}}``, in the
  order of the mapping that was saved), checked against the tensors on load;
* ``user_metadata``: the caller's keyword metadata as one JSON object.

Writes are atomic: the file is written into a fresh hidden directory next to the target
(``.NAME.XXXXXXXX.tmp/``, on the same file system), fsynced, renamed onto the target with
``os.replace``, and the target's directory is fsynced. A directory rather than a single
temporary file because safetensors (0.8) itself writes through a temporary file of its own
in the directory it is given; this way every byte in flight lives under one name of ours.
An exception removes that directory and leaves an existing file untouched. A hard crash
(power loss, SIGKILL) can leave the directory behind; :func:`load_fisher` never reads it
(it opens only the path it is given), and it can be deleted.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any, Optional, Union

import safetensors
import safetensors.torch
import torch
from torch import Tensor, nn

__all__ = ["save_fisher", "load_fisher", "FisherDict", "FORMAT", "FORMAT_VERSION"]

FORMAT = "ewc_fused.fisher"
FORMAT_VERSION = 1
PathType = Union[str, "os.PathLike[str]"]

# Header keys written by save_fisher; user metadata may not use these names, so that
# FisherDict.metadata can hold both in one flat dict.
_SYSTEM_KEYS = ("format", "format_version", "ewc_fused_version", "torch_version", "created", "dtypes", "tensors")
_USER_KEY = "user_metadata"
_RESERVED = frozenset(_SYSTEM_KEYS + (_USER_KEY,))

_DTYPES = tuple(
    d for d in (torch.float64, torch.float32, torch.float16, torch.bfloat16,
                getattr(torch, "float8_e4m3fn", None), getattr(torch, "float8_e5m2", None))
    if d is not None
)
_MINMAX_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


class FisherDict(dict):
    """``{parameter name: Fisher tensor}`` as loaded by :func:`load_fisher`.

    A plain ``dict`` (it goes straight into ``opt.consolidate``) with the file's
    metadata in ``.metadata``: the user's keyword metadata and the system keys
    ``format``, ``format_version``, ``ewc_fused_version``, ``torch_version``, ``created``,
    ``dtypes`` and ``tensors``. ``.user_metadata`` is the user's part only, so
    ``save_fisher(path, fd, **fd.user_metadata)`` writes the same file again.
    """

    metadata: dict[str, Any]
    user_metadata: dict[str, Any]

    def __init__(self, *args: Any, metadata: Optional[dict[str, Any]] = None,
                 user_metadata: Optional[dict[str, Any]] = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.metadata = dict(metadata or {})
        self.user_metadata = dict(user_metadata or {})


# --------------------------------------------------------------------------- checks
def _fspath(path: PathType, what: str) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{what}: path must be a str or os.PathLike, got {type(path).__name__}")
    return os.fsdecode(os.fspath(path))


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _value_problem(t: Tensor) -> Optional[str]:
    """None if every element is finite and >= 0, else what is wrong (counts)."""
    if t.numel() == 0:
        return None
    x = t if t.dtype in _MINMAX_DTYPES else t.float()
    lo, hi = torch.aminmax(x)
    if bool(lo >= 0) and bool(hi < math.inf):  # NaN fails both comparisons
        return None
    nan = int(torch.isnan(x).sum())
    pinf = int((x == math.inf).sum())
    ninf = int((x == -math.inf).sum())
    neg = torch.isfinite(x) & (x < 0)
    n_neg = int(neg.sum())
    parts = []
    if nan:
        parts.append(_plural(nan, "NaN value"))
    if pinf:
        parts.append(_plural(pinf, "+inf value"))
    if ninf:
        parts.append(_plural(ninf, "-inf value"))
    if n_neg:
        parts.append(f"{_plural(n_neg, 'negative value')} (min {float(x[neg].min()):.3g})")
    return "has " + ", ".join(parts) + "; a Fisher must be finite and >= 0"


def _check_tensors(fisher: object) -> dict[str, Tensor]:
    """Validate a {name: tensor} Fisher mapping entirely; return it detached, in order."""
    if not isinstance(fisher, Mapping):
        raise TypeError(f"fisher must be a mapping from parameter names to tensors, got {type(fisher).__name__}")
    if len(fisher) == 0:
        raise ValueError("fisher is empty: there is nothing to save")
    out: dict[str, Tensor] = {}
    for name, f in fisher.items():
        if not isinstance(name, str):
            raise TypeError(
                f"fisher keys must be parameter names (str), got a {type(name).__name__}; build the optimizer "
                f"from model.named_parameters(), or key the Fisher by name: "
                f"{{n: fisher[p] for n, p in model.named_parameters() if p in fisher}}")
        if name == "__metadata__":
            raise ValueError("fisher has an entry named '__metadata__', which safetensors reserves for its header")
        label = f"fisher[{name!r}]"
        if not isinstance(f, Tensor):
            raise TypeError(f"{label} must be a tensor, got {type(f).__name__}")
        if f.layout != torch.strided:
            raise TypeError(f"{label} is a {f.layout} tensor; pass a dense one (.to_dense())")
        if not f.is_floating_point():
            raise TypeError(f"{label} must be a floating-point tensor, got {f.dtype}")
        if f.dtype not in _DTYPES:
            raise TypeError(f"{label} has dtype {f.dtype}, which a Fisher file cannot hold; "
                            f"supported: {[str(d) for d in _DTYPES]} (cast it, e.g. .float())")
        if f.device.type == "meta":
            raise ValueError(f"{label} is on the meta device and has no values to save")
        problem = _value_problem(f.detach())
        if problem:
            raise ValueError(f"{label} {problem}")
        out[name] = f.detach()
    return out


def _check_json(value: Any, where: str) -> None:
    """Raise TypeError unless ``value`` round-trips through JSON (tuples become lists)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_json(v, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{where} has a key of type {type(k).__name__} ({k!r}); JSON object keys must be "
                                f"str, so it would not load back as saved")
            _check_json(v, f"{where}[{k!r}]")
        return
    raise TypeError(f"{where} is of type {type(value).__name__}, which is not JSON-serialisable; metadata "
                    f"values must be None, bool, int, float, str, or lists/dicts of them (convert it, e.g. "
                    f"float(x) or str(x))")


def _user_metadata_json(metadata: dict[str, Any]) -> str:
    for key, value in metadata.items():
        if key in _RESERVED:
            raise ValueError(f"metadata key {key!r} is reserved by the Fisher file format "
                             f"(reserved: {sorted(_RESERVED)}); use another name")
        _check_json(value, f"metadata {key!r}")
    return json.dumps(metadata)


def _writable(t: Tensor, seen: set[int]) -> Tensor:
    """A contiguous CPU tensor that owns its whole storage, shared with no other entry
    (safetensors refuses views and shared storage)."""
    c = t.to("cpu").resolve_conj().resolve_neg().contiguous()
    if c.numel() == 0:
        return torch.empty(c.shape, dtype=c.dtype)
    storage = c.untyped_storage()
    whole = c.data_ptr() == storage.data_ptr() and c.numel() * c.element_size() == storage.nbytes()
    if not whole or storage.data_ptr() in seen:
        c = c.clone(memory_format=torch.contiguous_format)
    seen.add(c.untyped_storage().data_ptr())
    return c


def _target(path: PathType) -> str:
    """The file to replace: symlinks are followed, so the link stays and its target is updated."""
    p = _fspath(path, "save_fisher")
    if os.path.islink(p):
        p = os.path.realpath(p)
    if os.path.isdir(p):
        raise IsADirectoryError(f"cannot save a Fisher file to {p!r}: it is a directory")
    parent = os.path.dirname(os.path.abspath(p))
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"cannot save a Fisher file to {p!r}: directory {parent!r} does not exist")
    return p


def _new_file_mode(target: str) -> int:
    """An existing file's permissions, else what open() would give (0o666 & ~umask)."""
    with contextlib.suppress(OSError):
        return os.stat(target).st_mode & 0o7777
    umask = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    umask = int(line.split()[1], 8)
    if umask is None:
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- public
def save_fisher(path: PathType, fisher: Mapping[str, Tensor], /, **metadata: Any) -> None:
    """Write a diagonal Fisher ``{parameter name: tensor}`` to a safetensors file, atomically.

    Args:
        path: the file (str or os.PathLike) to create or replace; its directory must
            exist. A symlink is followed (its target is replaced).
        fisher: parameter name -> tensor of any floating dtype (fp64/fp32/fp16/bf16, or
            float8), on any device, of any layout or strides; stored in its own dtype.
        **metadata: stored with the file and returned in ``load_fisher(...).metadata``,
            e.g. ``mode="empirical", n_samples=1234, task="A"``. Values must be JSON:
            None, bool, int, float, str, lists (tuples load as lists) and str-keyed dicts.

    Everything is validated before anything is written: a non-empty mapping of str
    to floating tensors, every value finite and >= 0 (errors name the parameter and
    count the bad values), JSON metadata not using a reserved key. On any error
    nothing is written and an existing file is left untouched.
    """
    target = _target(path)
    tensors = _check_tensors(fisher)
    user_json = _user_metadata_json(metadata)
    from . import __version__  # late: the package imports this module before defining it

    seen: set[int] = set()
    cpu = {name: _writable(t, seen) for name, t in tensors.items()}
    header = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "ewc_fused_version": __version__,
        "torch_version": str(torch.__version__),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "dtypes": json.dumps(sorted({str(t.dtype).removeprefix("torch.") for t in cpu.values()})),
        "tensors": json.dumps({name: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
                               for name, t in cpu.items()}),
        _USER_KEY: user_json,
    }
    mode = _new_file_mode(target)
    directory = os.path.dirname(os.path.abspath(target))
    tmpdir = tempfile.mkdtemp(prefix=f".{os.path.basename(target)[:100]}.", suffix=".tmp", dir=directory)
    try:
        tmp = os.path.join(tmpdir, "fisher.safetensors")
        safetensors.torch.save_file(cpu, tmp, metadata=header)
        with open(tmp, "r+b") as f:  # save_file has closed (flushed) it; now make it durable
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    _fsync_dir(directory)


def _corrupt(path: str, why: str) -> ValueError:
    return ValueError(f"{path!r} is not a valid Fisher file: {why}")


def _decode_header(path: str, header: Optional[dict[str, str]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(system metadata, user metadata) decoded from the safetensors header."""
    if not header or header.get("format") != FORMAT:
        found = f"its header has format={header.get('format')!r}" if header and "format" in header else \
            "its header has no 'format' tag"
        raise ValueError(f"{path!r} is a safetensors file but not a Fisher file written by ewc_fused.save_fisher "
                         f"({found}, expected {FORMAT!r})")
    missing = [k for k in _SYSTEM_KEYS + (_USER_KEY,) if k not in header]
    if missing:
        raise _corrupt(path, f"its header lacks {missing}")
    try:
        version = int(header["format_version"])
    except ValueError:
        raise _corrupt(path, f"format_version {header['format_version']!r} is not an integer") from None
    if version > FORMAT_VERSION:
        raise ValueError(f"{path!r} has Fisher file format version {version}, written by a newer ewc_fused "
                         f"({header['ewc_fused_version']}); this one reads version {FORMAT_VERSION}: upgrade ewc_fused")
    system: dict[str, Any] = {k: header[k] for k in _SYSTEM_KEYS}
    system["format_version"] = version
    try:
        system["dtypes"] = json.loads(header["dtypes"])
        system["tensors"] = json.loads(header["tensors"])
        user = json.loads(header[_USER_KEY])
    except json.JSONDecodeError as e:
        raise _corrupt(path, f"its metadata is not valid JSON ({e})") from None
    if not isinstance(system["tensors"], dict) or not isinstance(user, dict):
        raise _corrupt(path, "its 'tensors' or 'user_metadata' entry is not a JSON object")
    return system, user


def load_fisher(path: PathType, model: Optional[nn.Module] = None, *,
                device: Optional[Union[str, torch.device]] = None) -> FisherDict:
    """Load a Fisher file written by :func:`save_fisher`, checked.

    Args:
        path: the file (str or os.PathLike).
        model: if given, the file must match it: every entry names a parameter of
            ``model.named_parameters()`` (trainable or frozen) with the same shape, and
            every trainable parameter (``requires_grad=True``) has an entry. Frozen
            parameters may be absent; entries for frozen ones are kept (``consolidate``
            skips them). All mismatches are reported in one ValueError. To load a Fisher
            that deliberately covers only some trainable parameters, load without
            ``model`` (then ``device``, or the CPU).
        device: where to put the tensors. Default: each parameter's device when
            ``model`` is given, else the CPU.

    Returns:
        A :class:`FisherDict` ``{name: tensor}`` in the saved dtypes (fp32 stays fp32)
        and the saved order (the model's parameter order when ``model`` is given),
        with ``.metadata`` and ``.user_metadata``.

    Raises:
        FileNotFoundError: no such file. ValueError: not a safetensors file, truncated
        or corrupt, not written by ``save_fisher``, a value NaN, inf or negative, or a
        mismatch with ``model``. Every message names the file.
    """
    p = _fspath(path, "load_fisher")
    if not os.path.exists(p):
        raise FileNotFoundError(f"Fisher file {p!r} does not exist")
    if os.path.isdir(p):
        raise IsADirectoryError(f"Fisher file {p!r} is a directory")
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module or None, got {type(model).__name__}")
    with open(p, "rb"):  # an unreadable file gets the OS's own error (e.g. PermissionError)
        pass
    tensors: dict[str, Tensor] = {}
    try:
        with safetensors.safe_open(p, framework="pt", device="cpu") as h:
            header = h.metadata()
            keys = list(h.keys())
            system, user = _decode_header(p, header)
            for k in keys:
                # Own memory: safetensors maps the file, and the file may change after this.
                tensors[k] = h.get_tensor(k).clone()
    except safetensors.SafetensorError as e:
        raise ValueError(f"{p!r} is not a readable safetensors file (truncated or corrupt?): {e}") from None
    record = system["tensors"]
    if set(record) != set(tensors):
        raise _corrupt(p, f"its header lists tensors {sorted(record)} but it holds {sorted(tensors)}")
    if not tensors:
        raise _corrupt(p, "it holds no tensors")
    for name, t in tensors.items():
        want = record[name]
        got = {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
        if not isinstance(want, dict) or want.get("dtype") != got["dtype"] or want.get("shape") != got["shape"]:
            raise _corrupt(p, f"fisher[{name!r}] is {got} but the header records {want}")
        if not t.is_floating_point():
            raise _corrupt(p, f"fisher[{name!r}] has non-floating dtype {t.dtype}")
        problem = _value_problem(t)
        if problem:
            raise ValueError(f"{p!r}: fisher[{name!r}] {problem}")
    order = list(record)

    target = torch.device(device) if device is not None else None
    if model is not None:
        params = dict(model.named_parameters())
        aliases = {n: q for n, q in model.named_parameters(remove_duplicate=False)}
        canon = {id(q): n for n, q in params.items()}
        problems = []
        for name in order:
            t = tensors[name]
            if name not in params:
                hint = (f" (a tied alias of {canon[id(aliases[name])]!r}; Fisher files use "
                        f"named_parameters() names)" if name in aliases else "")
                problems.append(f"{name}: in the file but not a parameter of the model{hint}")
            elif tuple(t.shape) != tuple(params[name].shape):
                problems.append(f"{name}: file {tuple(t.shape)} vs model {tuple(params[name].shape)}")
        for name, q in params.items():
            if q.requires_grad and name not in tensors:
                problems.append(f"{name}: trainable parameter of shape {tuple(q.shape)} missing from the file")
        if problems:
            raise ValueError(
                f"Fisher file {p!r} does not match the model ({_plural(len(problems), 'problem')}):\n  "
                + "\n  ".join(problems)
                + "\n(frozen parameters may be absent; load without model= to skip this check)")
        order = [n for n in params if n in tensors]
        out = FisherDict(((n, tensors[n].to(target if target is not None else params[n].device)) for n in order),
                         metadata={**user, **system}, user_metadata=user)
    else:
        out = FisherDict(((n, tensors[n].to(target) if target is not None else tensors[n]) for n in order),
                         metadata={**user, **system}, user_metadata=user)
    return out
