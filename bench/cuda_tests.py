"""pytest plugin: keep only the tests that skip without CUDA, for bench/gpu_check.sh to run on a GPU.

    python -m pytest -p bench.cuda_tests tests

A test is kept when a skipif marker on it (or on its module) names CUDA in its reason, or when
its own code calls pytest.skip after asking torch.cuda.is_available(). Found by inspection rather
than listed, so a CUDA test added later is run too.
"""
import inspect


def needs_cuda(item):
    if any("cuda" in str(m.kwargs.get("reason", "")).lower() for m in item.iter_markers("skipif")):
        return True
    try:
        source = inspect.getsource(item.function)
    except (AttributeError, OSError, TypeError):
        return False
    return "cuda.is_available" in source and "skip(" in source


def pytest_collection_modifyitems(config, items):
    keep = [item for item in items if needs_cuda(item)]
    config.hook.pytest_deselected(items=[item for item in items if not needs_cuda(item)])
    items[:] = keep
