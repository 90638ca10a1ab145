"""The causal family under the CUDA-graph backend captured for real (and with --compile): the eager
backend's samples, with and without a partial canvas, batch after batch on the same graphs.

Skipped without CUDA (bench/gpu_check.sh runs it); tests/test_causal.py checks the Step contract on CPU
with a capturing stand-in.
"""
import pytest
import torch

from models.families import causal
from sampling import make_backend
from sampling.cuda_graphs import CudaGraphsBackend
from tests.test_causal import L, tiny
from tests.test_cuda_graphs import draw_free  # noqa: F401  (a draw-free head sampler: exact comparisons)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICE = torch.device("cuda")


def sample(model, backend, seed=3, **kwargs):
    labels = torch.tensor([1, 2, 3], device=DEVICE)
    torch.manual_seed(seed)
    return model.sample_tokens(3, num_iter=5, cfg=2.5, labels=labels, backend=backend, **kwargs)


@pytest.mark.parametrize("precision, tol", [("fp32", 1e-4), ("bf16", 2e-2)])
@pytest.mark.parametrize("compile", [False, True])
def test_captured_graphs_give_the_eager_samples(draw_free, precision, tol, compile):  # noqa: F811
    if compile and precision == "bf16":
        tol = 2 * tol  # compiled kernels fuse and round bf16 otherwise: up to ~0.026 apart in a CPU emulation
    model = tiny("arinar").to(DEVICE)
    gen = torch.Generator().manual_seed(2)
    edit = dict(known=torch.randn(3, 1, 12, 12, generator=gen).to(DEVICE),
                keep=torch.stack([torch.randperm(L, generator=gen) < k for k in (9, 9, 20)]).to(DEVICE))
    graphs = make_backend(model, cuda_graphs=True, compile=compile, cfg_sampler="draw_free", precision=precision)
    eager = make_backend(model, cuda_graphs=False, cfg_sampler="draw_free", precision=precision)
    assert isinstance(graphs, CudaGraphsBackend)
    for kwargs in ({}, edit):
        expected = sample(model, eager, **kwargs)
        for seed in (3, 3):  # capture, then replay
            torch.testing.assert_close(sample(model, graphs, seed, **kwargs), expected, rtol=tol, atol=tol)
    replays = [r for _, r in graphs.replays.values()]
    assert replays and all(r.graph is not None for r in replays)
    assert {key[1] for key in graphs.replays if key[0] == "step"} == {"causal.append", "causal.query"}
    kept = edit["keep"].cpu()
    out = sample(model, graphs, **edit).cpu()
    known = causal.patchify(edit["known"].cpu(), model.tokens)
    assert torch.equal(causal.patchify(out, model.tokens)[kept], known[kept])
