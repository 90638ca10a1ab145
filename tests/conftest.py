import argparse
import ast
import contextlib
import inspect
import json
import logging
import textwrap
from pathlib import Path

import pytest
import torch

from models import build, config_from_flags, create_model
from models.families.common import EagerSteps

REPO = Path(__file__).resolve().parents[1]
# the released checkpoints' key/shape lists, trimmed from shared/manifests (key, shape, the counts the tests
# assert, which entries are buffers) and shipped here so that every clone runs the release-layout tests
MANIFESTS = REPO / "tests" / "data" / "manifests"


@pytest.fixture(autouse=True)
def root_logging_restored():
    """Each test leaves the root logger as it found it: main_mar.py's runs set up logging (a console handler on
    this test's captured stderr, a run's log.txt), which a later test must not write to once they are closed."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for handler in root.handlers:
        if handler not in handlers:
            handler.close()
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run far faster single-threaded: intra-op threads only add overhead."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def load_manifest(name):
    """A release manifest with its entries as {"key", "shape", "kind"} dicts (kind: parameter or buffer)."""
    manifest = json.loads((MANIFESTS / name).read_text())
    buffers = set(manifest.pop("buffers"))
    manifest["state_dict"] = [{"key": key, "shape": shape, "kind": "buffer" if key in buffers else "parameter"}
                              for key, shape in manifest["state_dict"]]
    return manifest


def tiny_mar(**overrides):
    """A small MAR: 64x64 images, stride 16 -> 16 tokens of 16 features, 10 classes. overrides: model
    flags (head="diffloss", enc_dec_depth=1, ...)."""
    config = dict(img_size=64, vae_stride=16, patch_size=1, width=32, enc_dec_depth=2, num_heads=4,
                  vae_embed_dim=16, class_num=10, buffer_size=4, num_gaussians=4,
                  inner_ar_width=32, inner_ar_depth=1, inner_ar_heads=4)
    config.update(overrides)
    return create_model("mar_base", **config)


def model_from_flags(flags):
    """build() of a flat {flag: value} dict or argparse Namespace (a run's stored args), over its --model preset."""
    return build(config_from_flags(dict(vars(flags)) if isinstance(flags, argparse.Namespace) else dict(flags)))


class SpyBackend(EagerSteps):
    """The default backend, keeping a copy of the arguments of every Step it runs: runs[i] = (name, args)."""

    def __init__(self):
        self.runs = []

    def run(self, step, *args):
        self.runs.append((step.name, tuple(a.clone() if torch.is_tensor(a) else a for a in args)))
        return step(*args)


def randomize_(module, std=0.2, seed=0):
    """Give every parameter a generic random value so no path is hidden by a near-zero init."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return module


@pytest.fixture
def no_host_sync(monkeypatch):
    """Make the Python-level tensor reads that synchronise with the host (as CUDA-graph capture
    forbids) raise while the test runs: .item(), bool(), int(), .tolist(), .cpu(), multinomial."""
    def refuse(name):
        def fail(*args, **kwargs):
            raise AssertionError(f"host sync via {name}")
        return fail

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "nonzero", "cpu", "numpy", "multinomial"):
        monkeypatch.setattr(torch.Tensor, name, refuse(name))
    monkeypatch.setattr(torch, "multinomial", refuse("torch.multinomial"))


def host_sync_calls(*objects):
    """Names of host-synchronising tensor methods that the code (not docstrings) of objects calls."""
    names = {"item", "tolist", "cpu", "numpy", "multinomial", "nonzero"}
    found = set()
    for obj in objects:
        for node in ast.walk(ast.parse(textwrap.dedent(inspect.getsource(obj)))):
            if isinstance(node, ast.Attribute) and node.attr in names:
                found.add(node.attr)
    return found


class EmulatedReplay:
    """sampling.cuda_graphs._Replay on a CPU: the first call runs fn (the warm-up: its writes to in-place
    buffers happen, as on a GPU); the capture records nothing to run, so every later call is a replay
    that runs fn again on whatever its static buffers and weights hold then, and hands back a copy.
    Autocast's cast cache is off, as in the real capture. Counts its calls."""

    def __init__(self, fn, device, pool, stream):
        self.fn, self.device, self.pool, self.stream, self.graph, self.calls = fn, device, pool, stream, None, 0

    def __call__(self):
        from models.layers import activation_dtype
        dtype = activation_dtype(self.device)
        cast = torch.autocast(self.device.type, dtype=dtype, cache_enabled=False) if dtype else contextlib.nullcontext()
        with cast:
            out = self.fn()
        self.calls += 1
        replayed, self.graph = self.graph is not None, "emulated"
        return out.clone() if replayed else out


@pytest.fixture
def emulated_graphs(monkeypatch):
    """A factory for the real CudaGraphsBackend on a CPU model, with capture and replay emulated
    (EmulatedReplay): everything else is the backend's own (cast weights, padding, static copies,
    cache keys, buffers)."""
    from sampling import cuda_graphs
    monkeypatch.setattr(cuda_graphs, "_Replay", EmulatedReplay)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: "pool")
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: ("stream", object()))
    return lambda model, **kwargs: cuda_graphs.CudaGraphsBackend(model, **kwargs)
