"""The CUDA-graph backend captured for real (and with --compile): the eager backend's samples.

Skipped without CUDA; tests/test_engine.py checks the padding layout and the backend choice on CPU.
"""
import pytest
import torch
from scipy import stats

from models.heads import arinar as inner_module
from sampling import make_backend
from sampling.cuda_graphs import CudaGraphsBackend
from tests.conftest import randomize_, tiny_mar

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICE = torch.device("cuda")


def cuda_model():
    return randomize_(tiny_mar(), std=0.1).eval().to(DEVICE)


def mixture_mean(mu, logvar, logits, temperature=1.0):
    return (torch.softmax(logits, -1) * mu).sum(-1)


def guided_mean(cond, uncond, cfg, temperature=1.0):
    """A draw-free 'CFG sampler': padded and unpadded batches must then agree exactly."""
    return mixture_mean(*cond) - cfg * torch.tanh(uncond[0][..., 1])


@pytest.fixture
def draw_free(monkeypatch):
    monkeypatch.setattr(inner_module, "sample_gmm", mixture_mean)
    monkeypatch.setitem(inner_module.CFG_SAMPLERS, "draw_free", guided_mean)  # InnerAR.cfg_samplers lists it


def sample(m, backend, bsz=3, seed=3):
    """Seed 3 captures; other seeds give the replays other inputs (labels, and the random order)."""
    labels = (torch.arange(bsz, device=DEVICE) % 10).roll(seed)
    torch.manual_seed(seed)
    return m.sample_tokens(bsz, num_iter=5, cfg=2.5, labels=labels, backend=backend)


@pytest.mark.parametrize("precision, tol", [("fp32", 1e-4), ("bf16", 2e-2)])
@pytest.mark.parametrize("compile", [False, True])
def test_captured_graphs_give_the_eager_samples(draw_free, precision, tol, compile):
    """Captured at seed 3, replayed at seeds 4 and 5: a graph that read its capture's inputs instead of its
    static buffers would give seed 3's samples again."""
    m = cuda_model()
    graphs = make_backend(m, cuda_graphs=True, compile=compile, cfg_sampler="draw_free", precision=precision)
    assert isinstance(graphs, CudaGraphsBackend)
    eager = make_backend(m, cuda_graphs=False, cfg_sampler="draw_free", precision=precision)
    expected = {seed: sample(m, eager, seed=seed) for seed in (3, 4, 5)}
    assert not torch.allclose(expected[3], expected[4], rtol=tol, atol=tol)  # the replays' inputs matter
    for seed in (3, 4, 5):  # capture, then replays
        torch.testing.assert_close(sample(m, graphs, seed=seed), expected[seed], rtol=tol, atol=tol)
    replays = [r for _, r in graphs.replays.values()]
    assert replays and all(r.graph is not None for r in replays)
    # one graph per outer step of the schedule (the Step's name is in the key)
    assert sum(key[:2] == ("step", "mar.outer") for key in graphs.replays) == 5


@pytest.mark.parametrize("compile", [False, True])
def test_captured_graphs_draw_the_eager_law(compile):
    m = cuda_model()
    graphs = make_backend(m, cuda_graphs=True, compile=compile)
    sample(m, graphs, bsz=512)  # captures
    eager = sample(m, make_backend(m, cuda_graphs=False), bsz=512).flatten(1).cpu()
    replayed = sample(m, graphs, bsz=512).flatten(1).cpu()
    pvalues = [stats.ks_2samp(eager[:, i].numpy(), replayed[:, i].numpy()).pvalue for i in range(0, 256, 16)]
    assert min(pvalues) > 0.01 / 16


@pytest.mark.parametrize("compile", [False, True])
@pytest.mark.parametrize("cfg", [1.0, 4.5])
def test_a_replayed_head_draws_new_numbers_from_the_generator(compile, cfg):
    """Random numbers frozen at capture (a generator the graph does not advance) would pass the marginals
    above: on the same input, each replay must draw anew, and the same seed must repeat the draws. Compiled,
    the head's draws are Inductor's own random numbers, seeded from torch's generator on each replay."""
    m = cuda_model()
    graphs = make_backend(m, cuda_graphs=True, compile=compile)
    z = torch.randn(16 if cfg != 1.0 else 8, 32, device=DEVICE)  # tiny_mar's width; guided: [cond; uncond]

    def draws(seed):
        torch.manual_seed(seed)
        return [graphs.sample_head(m.head, z, 1.0, cfg) for _ in range(2)]
    with graphs.autocast():
        draws(0)  # warm-up and capture
        first, again, other = draws(0), draws(0), draws(1)
    assert not torch.equal(first[0], first[1])
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])
