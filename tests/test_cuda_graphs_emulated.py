"""The CUDA-graph backend's own logic on a CPU, with capture and replay emulated (tests/conftest.py:
EmulatedReplay): cast weights, padded head rows, static copies, graph keys and the buffers handed out
for in-place Steps. With a draw-free head sampler its samples must be the eager backend's bit for bit,
batch after batch on the same graphs. tests/test_cuda_graphs.py and test_families_cuda.py capture for real
on a GPU."""
import pytest
import torch

from sampling import EagerBackend
from tests.conftest import tiny_mar
from tests.test_causal import tiny as tiny_causal
from tests.test_cuda_graphs import draw_free  # noqa: F401  (a draw-free head sampler: exact comparisons)
from tests.test_scalewise import tiny as tiny_scalewise

pytestmark = pytest.mark.usefixtures("one_thread")


def sample(model, backend, seed):
    torch.manual_seed(seed)
    return model.sample_tokens(3, num_iter=5, cfg=2.5, labels=torch.tensor([1, 2, 3]), backend=backend)


MODELS = {"mar": lambda: tiny_mar(), "causal": lambda: tiny_causal("arinar"),
          "var": lambda: tiny_scalewise("var"), "mvar": lambda: tiny_scalewise("mvar")}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("name", MODELS)
def test_graphs_sample_what_eager_does_batch_after_batch(draw_free, emulated_graphs, name, precision):  # noqa: F811
    """Under bf16 the graphs' Linear layers read weights cast once per call, except the layers that
    compute in full precision (ARINAR's mixture output and fed-back features): cast, they would move the
    samples by ~1e-2. Later batches replay the first batch's graphs on the same in-place buffers (a new
    KV cache or scan state each call would re-capture every graph and keep every old state)."""
    model = MODELS[name]().eval()
    graphs = emulated_graphs(model, cfg_sampler="draw_free", precision=precision)
    eager = EagerBackend(model, cfg_sampler="draw_free", precision=precision)
    counts = []
    for seed in (3, 4, 5):
        assert torch.equal(sample(model, graphs, seed), sample(model, eager, seed))
        counts.append(len(graphs.replays))
    assert counts[0] == counts[1] == counts[2]
    steps = [replay for key, (_, replay) in graphs.replays.items() if key[0] == "step"]
    assert steps and all(replay.calls >= 3 for replay in steps)  # every step graph replayed on later batches


def test_full_precision_layers_keep_their_weights(emulated_graphs):
    model = tiny_mar()
    graphs = emulated_graphs(model, precision="bf16")
    with graphs.autocast():
        cast = graphs.lowp[torch.bfloat16]
    assert "arhead.head.weight" not in cast and "arhead.input_proj.weight" not in cast
    assert cast["arhead.cond_proj.weight"].dtype == torch.bfloat16 and "z_proj.weight" in cast


@pytest.mark.parametrize("name, graphs_per_run", [("causal", 2), ("mar", 1)])
def test_compiled_steps_compile_once_each(emulated_graphs, monkeypatch, name, graphs_per_run):
    """--compile builds one graph per Step for a whole run (and each later batch reuses it). With duck
    sizing (sizes equal when traced share one symbol) the causal family compiled each of its two Steps
    twice: a first step with as many targets as its cache has layers. Dynamo's own graphs are counted;
    its "eager" backend stands in for Inductor (no C++ compiler needed)."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: real_compile(fn, backend="eager", **kwargs))
    torch._dynamo.reset()
    counters.clear()
    model = MODELS[name]().eval()
    graphs = emulated_graphs(model, precision="fp32", compile=True)
    for seed, batch in ((3, 3), (4, 5)):
        torch.manual_seed(seed)
        model.sample_tokens(batch, num_iter=8, cfg=2.5, labels=torch.arange(batch) % 10, backend=graphs)
    assert counters["stats"]["unique_graphs"] == graphs_per_run
    torch._dynamo.reset()
