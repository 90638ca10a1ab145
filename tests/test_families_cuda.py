"""The causal and scale-wise families under the CUDA-graph backend captured for real (and with
--compile): the eager backend's samples, with and without a partial canvas, batch after batch on the
same graphs, every step graph replayed.

Skipped without CUDA (bench/gpu_check.sh runs it); on a CPU, tests/test_cuda_graphs_emulated.py runs the
same backend with capture and replay emulated, and tests/test_causal.py checks the Step contract.
"""
import pytest
import torch

from models.token_grid import patchify
from sampling import make_backend
from sampling.cuda_graphs import CudaGraphsBackend
from tests.test_causal import L as CAUSAL_TOKENS, tiny as tiny_causal
from tests.test_cuda_graphs import draw_free  # noqa: F401  (a draw-free head sampler: exact comparisons)
from tests.test_scalewise import latents as scalewise_latents, tiny as tiny_scalewise

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICE = torch.device("cuda")


def causal_edit():
    gen = torch.Generator().manual_seed(2)
    return dict(known=torch.randn(3, 1, 12, 12, generator=gen),
                keep=torch.stack([torch.randperm(CAUSAL_TOKENS, generator=gen) < k for k in (9, 9, 20)]))


def scalewise_edit():
    keep = torch.zeros(3, 16, dtype=torch.bool)
    keep[:, :8] = True  # the top half of the 4x4 token grid
    keep[1, 12] = True
    return dict(known=scalewise_latents(3, seed=4), keep=keep)


# model, an edit (known, keep), the step graphs' names
FAMILIES = {"causal": (lambda: tiny_causal("arinar"), causal_edit, {"causal.append", "causal.query"}),
            "var": (lambda: tiny_scalewise("var"), scalewise_edit, {"scalewise.var"}),
            "mvar": (lambda: tiny_scalewise("mvar"), scalewise_edit, {"scalewise.mvar"})}


def sample(model, backend, seed=3, **kwargs):
    """Seed 3 captures; other seeds give the replays other inputs (labels, and the causal family's order)."""
    labels = torch.tensor([1, 2, 3], device=DEVICE).roll(seed)
    torch.manual_seed(seed)
    return model.sample_tokens(3, num_iter=5, cfg=2.5, labels=labels, backend=backend, **kwargs)


@pytest.mark.parametrize("precision, tol", [("fp32", 1e-4), ("bf16", 2e-2)])
@pytest.mark.parametrize("compile", [False, True])
@pytest.mark.parametrize("family", FAMILIES)
def test_captured_graphs_give_the_eager_samples(draw_free, family, precision, tol, compile):  # noqa: F811
    if compile and precision == "bf16":
        tol = 2 * tol  # compiled kernels fuse and round bf16 otherwise: up to ~0.026 apart in a CPU emulation
    make_model, make_edit, step_names = FAMILIES[family]
    model = make_model().to(DEVICE)
    edit = {k: v.to(DEVICE) for k, v in make_edit().items()}
    graphs = make_backend(model, cuda_graphs=True, compile=compile, cfg_sampler="draw_free", precision=precision)
    eager = make_backend(model, cuda_graphs=False, cfg_sampler="draw_free", precision=precision)
    assert isinstance(graphs, CudaGraphsBackend)
    for kwargs in ({}, edit):
        expected = {seed: sample(model, eager, seed, **kwargs) for seed in (3, 4, 5)}
        assert not torch.allclose(expected[3], expected[4], rtol=tol, atol=tol)  # the replays' inputs matter
        for seed in (3, 4, 5):  # capture, then replays on other inputs
            torch.testing.assert_close(sample(model, graphs, seed, **kwargs), expected[seed], rtol=tol, atol=tol)
    graph_count = len(graphs.replays)
    replays = [r for _, r in graphs.replays.values()]
    assert replays and all(r.graph is not None for r in replays)
    assert {key[1] for key in graphs.replays if key[0] == "step"} == step_names
    out = sample(model, graphs, **edit)
    assert len(graphs.replays) == graph_count  # a later batch replays: nothing captured again
    kept = edit["keep"].view(3, -1)
    known = patchify(edit["known"], model.tokens)
    assert torch.equal(patchify(out, model.tokens)[kept], known[kept])
