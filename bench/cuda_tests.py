"""pytest plugin: keep only the tests that skip without CUDA, for bench/gpu_check.sh to run on a GPU.

    python -m pytest -p bench.cuda_tests tests
    CUDA_TESTS_SECONDS=120 python -m pytest -p bench.cuda_tests tests    # no test starts after 120 s

A test is kept when a skipif marker on it (or on its module) names CUDA in its reason, or when
its own code calls pytest.skip after asking torch.cuda.is_available(). Found by inspection rather
than listed, so a CUDA test added later is run too. The torch.compile variants (slowest: each
compiles) run last, and with CUDA_TESTS_SECONDS set a test due after that many seconds is skipped
with a reason saying so: the run ends on its own and its report (--junitxml) is written. A test that
outlives the deadline is stopped by gpu_check.sh's `timeout` (SIGTERM): the plugin turns that into
a KeyboardInterrupt, which pytest ends on as on Ctrl-C, writing the report of the tests that ran
(SIGTERM's default action would kill it with no report at all).
"""
import inspect
import os
import signal
import time

import pytest

DEADLINE_REASON = "CUDA_TESTS_SECONDS spent before this test started"


def needs_cuda(item):
    if any("cuda" in str(m.kwargs.get("reason", "")).lower() for m in item.iter_markers("skipif")):
        return True
    try:
        source = inspect.getsource(item.function)
    except (AttributeError, OSError, TypeError):
        return False
    return "cuda.is_available" in source and "skip(" in source


def compiles(item):
    params = getattr(getattr(item, "callspec", None), "params", {})
    return bool(params.get("compile"))


def interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def pytest_configure(config):
    seconds = os.environ.get("CUDA_TESTS_SECONDS")
    config.cuda_tests_deadline = time.monotonic() + float(seconds) if seconds else None
    config.cuda_tests_sigterm = signal.signal(signal.SIGTERM, interrupt)


def pytest_unconfigure(config):
    signal.signal(signal.SIGTERM, config.cuda_tests_sigterm)


def pytest_collection_modifyitems(config, items):
    keep = sorted((item for item in items if needs_cuda(item)), key=compiles)  # stable: file order otherwise
    config.hook.pytest_deselected(items=[item for item in items if not needs_cuda(item)])
    items[:] = keep


def pytest_runtest_setup(item):
    deadline = item.config.cuda_tests_deadline
    if deadline is not None and time.monotonic() > deadline:
        pytest.skip(DEADLINE_REASON)
