"""Test configuration.

The Triton interpreter must be switched on before any ``@triton.jit`` function is
defined, i.e. before ``ewc_fused.kernels`` is imported, so it is set here, at the
top of the first module pytest imports. Kernels then run on CPU tensors.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", default=False, help="run slow tests too")


# Hypothesis profiles: "ci" (the default) runs 200 examples per property test, derandomized
# (the same examples every run: the seed comes from each test's source), no deadline (the
# Triton interpreter is slow and its first call compiles); "slow" (--slow) runs 2000 with a
# random seed, given with any failure (print_blob prints the @reproduce_failure line;
# --hypothesis-seed=N repeats a run). --hypothesis-profile NAME overrides both. The profile
# in use is printed at the end of the run.
try:
    from hypothesis import HealthCheck, settings as _hyp_settings
except ImportError:  # pragma: no cover - hypothesis is in the test extra
    _hyp_settings = None
else:
    _hyp_settings.register_profile("ci", max_examples=200, derandomize=True, deadline=None, database=None,
                                   print_blob=True, suppress_health_check=[HealthCheck.too_slow])
    _hyp_settings.register_profile("slow", max_examples=2000, deadline=None, print_blob=True,
                                   suppress_health_check=[HealthCheck.too_slow])
_hyp_profile = None


def pytest_configure(config):
    global _hyp_profile
    if _hyp_settings is None:
        return
    _hyp_profile = config.getoption("hypothesis_profile", None)
    if not _hyp_profile:
        _hyp_profile = "slow" if config.getoption("--slow") else "ci"
        _hyp_settings.load_profile(_hyp_profile)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if _hyp_settings is None:
        return
    s = _hyp_settings.default
    seed = config.getoption("hypothesis_seed", None)
    seed = seed if seed is not None else ("from each test's source" if s.derandomize else "random per test")
    terminalreporter.write_line(f"hypothesis profile {_hyp_profile!r}: max_examples={s.max_examples}, "
                                f"derandomize={s.derandomize}, deadline={s.deadline}, seed {seed}")


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_slow = pytest.mark.skip(reason="slow; run with --slow")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)
        if "slow" in item.keywords and not config.getoption("--slow"):
            item.add_marker(skip_slow)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """Tiny tensors: one intra-op thread. On a busy 2-core machine, torch's second thread
    turns a 1 ms step into 30 ms (measured); results do not depend on it."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
