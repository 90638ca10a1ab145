"""The CUDA-graph backend's own logic on a CPU, with capture and replay emulated (tests/conftest.py:
EmulatedReplay): cast weights, padded head rows, static copies, graph keys and the buffers handed out
for in-place Steps. With a draw-free head sampler its samples must be the eager backend's bit for bit,
batch after batch on the same graphs. tests/test_cuda_graphs.py and test_families_cuda.py capture for real
on a GPU."""
import contextlib

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


def test_a_float64_model_gets_the_cfg_scale_eager_gets(draw_free, emulated_graphs):  # noqa: F811
    """The graphs' CFG scale is a static tensor filled each call: float32, a float64 model would guide
    with 2.9000000953674316 where eager uses 2.9."""
    model = tiny_mar().double().eval()
    graphs = emulated_graphs(model, cfg_sampler="draw_free")
    eager = EagerBackend(model, cfg_sampler="draw_free")

    def guided(backend):
        torch.manual_seed(3)
        return model.sample_tokens(3, num_iter=5, cfg=2.9, labels=torch.tensor([1, 2, 3]), backend=backend)
    assert torch.equal(guided(graphs), guided(eager))


TEMPERATURE_HEADS = {"arinar": dict(), "arinar exact": dict(), "diffloss": dict(head="diffloss", num_sampling_steps=5),
                     "gmm": dict(head="gmm")}


@pytest.mark.parametrize("variant", TEMPERATURE_HEADS)
def test_one_head_graph_serves_every_temperature(emulated_graphs, traced_graphs, variant):
    """The temperature is a static input like the CFG scale: a head graph captured at T = 0.7 and replayed at
    T = 1.3 (or a graph that baked 0.7 in) gives what a graph captured at 1.3 gives, with the same draws
    (the same padding), and one graph per row bucket serves both; compiled, the head's regions are not
    traced again for the new temperature."""
    model = tiny_mar(diffloss_w=32, diffloss_d=2, **TEMPERATURE_HEADS[variant]).eval()
    cfg_sampler = "exact" if variant.endswith("exact") else "sir"

    def run(backend, temperature):
        torch.manual_seed(4)
        return model.sample_tokens(3, num_iter=5, cfg=2.5, labels=torch.tensor([1, 2, 3]), temperature=temperature,
                                   backend=backend)
    for compile in (False, True):
        swept = emulated_graphs(model, precision="fp32", cfg_sampler=cfg_sampler, compile=compile)
        cold = run(swept, 0.7)
        heads, traced = sum(key[0] == "head" for key in swept.replays), len(traced_graphs)
        hot = run(swept, 1.3)
        assert sum(key[0] == "head" for key in swept.replays) == heads and len(traced_graphs) == traced
        fresh = emulated_graphs(model, precision="fp32", cfg_sampler=cfg_sampler, compile=compile)
        assert torch.equal(hot, run(fresh, 1.3)) and not torch.equal(hot, cold)


def test_full_precision_layers_keep_their_weights(emulated_graphs):
    model = tiny_mar()
    graphs = emulated_graphs(model, precision="bf16")
    with graphs.autocast():
        cast = graphs.lowp[torch.bfloat16]
    assert "arhead.head.weight" not in cast and "arhead.input_proj.weight" not in cast
    assert cast["arhead.cond_proj.weight"].dtype == torch.bfloat16 and "z_proj.weight" in cast


def test_cast_weights_are_allocated_once(emulated_graphs, monkeypatch):
    """Later calls copy into the first call's cast weights (the graphs read those tensors); making a
    fresh set to throw away (~400 MB of bf16 at ARINAR-B size) would inflate every call's peak memory."""
    model = tiny_mar()
    graphs = emulated_graphs(model, precision="bf16")
    with graphs.autocast():
        first = dict(graphs.lowp[torch.bfloat16])
    allocations = []
    real = torch.empty_like
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: allocations.append(a) or real(*a, **k))
    with torch.no_grad():
        model.z_proj.weight.add_(1.0)
    with graphs.autocast():
        cast = graphs.lowp[torch.bfloat16]
    assert not allocations and all(cast[n] is t for n, t in first.items())
    assert torch.equal(cast["z_proj.weight"], model.z_proj.weight.bfloat16())  # refreshed in place


DEEPER = {"mar": lambda: tiny_mar(enc_dec_depth=3, inner_ar_depth=2),
          "causal": lambda: tiny_causal("arinar", depth=8, inner_ar_depth=2)}


@pytest.fixture
def traced_graphs(monkeypatch):
    """torch.compile with a backend that keeps each graph Dynamo traces (then runs it as traced: no C++
    compiler needed); yields that list."""
    import torch._dynamo
    graphs, real_compile = [], torch.compile

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: real_compile(fn, **{**kwargs, "backend": keep}))
    torch._dynamo.reset()
    yield graphs
    torch._dynamo.reset()


@pytest.mark.parametrize("name", ["mar", "causal"])
def test_compile_traces_each_block_class_once(draw_free, emulated_graphs, traced_graphs, name):  # noqa: F811
    """--compile traces the Steps' repeated blocks (Step.regions), one graph per block class and call form
    for a whole run and the next batch, the same graphs at any depth: a whole Step compiled grows with the
    network (ARINAR-B's outer: 46 s to compile on a CPU, 13 s block by block: bench/bench_compile.py).
    With duck sizing (sizes equal when traced share one symbol) the causal blocks compiled twice. The
    ARINAR head's regions (compile_regions) are traced once for all its features, every row bucket (3 and
    5 images: buckets of 8 and 16 rows) and any inner depth. The samples are the eager backend's, and the blocks are
    left as they were."""
    ops = {}
    for depth, make in (("tiny", MODELS[name]), ("deeper", DEEPER[name])):
        traced_graphs.clear()
        torch._dynamo.reset()  # else the deeper blocks reuse the graphs traced for the tiny ones
        model = make().eval()
        graphs = emulated_graphs(model, cfg_sampler="draw_free", precision="fp32", compile=True)
        eager = EagerBackend(model, cfg_sampler="draw_free", precision="fp32")
        for seed, batch in ((3, 3), (4, 5)):
            labels = torch.arange(batch) % 10
            torch.manual_seed(seed)
            compiled = model.sample_tokens(batch, num_iter=8, cfg=2.5, labels=labels, backend=graphs)
            torch.manual_seed(seed)
            assert torch.equal(compiled, model.sample_tokens(batch, num_iter=8, cfg=2.5, labels=labels, backend=eager))
        ops[depth] = sorted(len(gm.graph.nodes) for gm in traced_graphs)
        # mar: the blocks, the last decoder block at queries; causal: the self block before and after its cache
        # write (left out of the graphs, which would copy the whole cache for it), the cross block; the head:
        # its block before the attention, the attention before and after its cache write, the rest of the
        # block, the pre-head norm, the mixture draw
        assert len(ops[depth]) == {"mar": 2, "causal": 3}[name] + 6
        assert not any("forward" in vars(m) for m in model.modules())
    assert ops["tiny"] == ops["deeper"]


HEAD_VARIANTS = {  # name: (model flags, cfg sampler, graphs the head's regions add to MAR's two)
    "diffloss": (dict(head="diffloss", diffloss_w=32, diffloss_d=3, num_sampling_steps=5), "sir", 1),
    # its first block's two inputs are one tensor (the residual stream starts from the condition): Dynamo
    # traces that aliasing apart
    "gmm": (dict(head="gmm", diffloss_w=32, diffloss_d=3), "sir", 2),
    "arinar exact": (dict(), "exact", 6),
    "arinar groups of 4": (dict(feature_group=4), "sir", 6),
}


@pytest.mark.parametrize("variant", HEAD_VARIANTS)
def test_compiled_head_regions_sample_what_the_uncompiled_graphs_do(emulated_graphs, traced_graphs, variant):
    """Every head's compile_regions (the MLP heads' residual blocks: one graph for every block and diffusion
    step; ARINAR's pieces with its other samplers), compiled: the samples of the uncompiled graphs, whose
    padding and draws are the same."""
    flags, cfg_sampler, head_graphs = HEAD_VARIANTS[variant]
    model = tiny_mar(**flags).eval()
    compiled = emulated_graphs(model, precision="fp32", compile=True, cfg_sampler=cfg_sampler)
    plain = emulated_graphs(model, precision="fp32", cfg_sampler=cfg_sampler)
    for seed in (3, 4):
        assert torch.equal(sample(model, compiled, seed), sample(model, plain, seed))
    assert len(traced_graphs) == 2 + head_graphs  # MAR's two block graphs, as above


def test_compiled_forwards_leave_the_modules_as_they_were():
    """Routed through the compiled forward inside (each module once, even if listed twice), and afterwards,
    even after an error, a module's own forward is back: none, or one its owner had set on the instance."""
    from sampling.cuda_graphs import compiled_forwards
    a, b, x = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), torch.ones(2)
    mine = b.forward = lambda t: t
    routed = []
    with pytest.raises(RuntimeError, match="in the Step"):
        with compiled_forwards([a, b, a], {torch.nn.Linear: lambda module, t: routed.append(module) or t}):
            assert torch.equal(a(x), x) and torch.equal(b(x), x)
            raise RuntimeError("in the Step")
    assert routed == [a, b] and "forward" not in vars(a) and b.forward is mine
    assert torch.equal(a(x), torch.nn.functional.linear(x, a.weight, a.bias))


def test_compile_says_once_which_steps_it_leaves_uncompiled(emulated_graphs, traced_graphs, caplog):
    """The scale-wise Steps declare no regions (each scale would be a compilation): --compile says so, once.
    The ARINAR head declares its compile_regions: nothing said."""
    model = MODELS["var"]().eval()
    graphs = emulated_graphs(model, precision="fp32", compile=True)
    with caplog.at_level("INFO", logger="sampling.cuda_graphs"):
        for seed in (3, 4):
            sample(model, graphs, seed)
    lines = [r.getMessage() for r in caplog.records if r.name == "sampling.cuda_graphs"]
    assert lines == ["--compile: scalewise.var declares no repeated blocks (Step.regions); it runs uncompiled"]


class FakeCuda:
    """Stand-ins for the torch.cuda calls of sampling.cuda_graphs._Replay, recording which device was
    current and which stream was current or capturing when fn ran; `fail_captures` captures raise."""

    def __init__(self, monkeypatch, fail_captures=0):
        self.current, self.stream, self.events, self.fail_captures = "cuda:0", "default", [], fail_captures
        fake = self

        class Stream:
            def __init__(self, device):
                self.device = device

            def wait_stream(self, other):
                pass

        class CUDAGraph:
            def replay(self):
                fake.events.append(("replay", fake.current))

        @contextlib.contextmanager
        def switch(attribute, value):
            before = getattr(fake, attribute)
            setattr(fake, attribute, value)
            try:
                yield
            finally:
                setattr(fake, attribute, before)

        @contextlib.contextmanager
        def graph(cuda_graph, pool=None, stream=None):
            if fake.fail_captures:
                fake.fail_captures -= 1
                raise RuntimeError("capture failed")
            # torch.cuda.graph's default stream: made once, on the device current at its first use (cuda:0)
            with switch("stream", stream if stream is not None else Stream(torch.device("cuda:0"))):
                fake.events.append(("capture", fake.current, fake.stream.device))
                yield

        for name, value in {"Stream": Stream, "CUDAGraph": CUDAGraph, "graph": graph,
                            "device": lambda device: switch("current", str(device)),
                            "stream": lambda stream: switch("stream", stream),
                            "current_stream": lambda device=None: Stream(device)}.items():
            monkeypatch.setattr(torch.cuda, name, value)

    def fn(self):
        self.events.append(("run", self.current, getattr(self.stream, "device", self.stream)))
        return torch.zeros(1)


def test_a_graph_is_captured_and_replayed_on_its_model_s_device(monkeypatch):
    """A model on cuda:1 while cuda:0 is current: warm-up, capture (on the backend's stream of cuda:1, not
    torch.cuda.graph's default stream of the device current at its first use) and replay all happen
    with cuda:1 current; captured on cuda:0's stream, the graph would hold none of the model's kernels."""
    from sampling.cuda_graphs import _Replay
    fake = FakeCuda(monkeypatch)
    replay = _Replay(fake.fn, torch.device("cuda:1"), pool=None, stream=torch.cuda.Stream(torch.device("cuda:1")))
    replay()
    replay()
    assert fake.events == [("run", "cuda:1", torch.device("cuda:1")), ("capture", "cuda:1", torch.device("cuda:1")),
                           ("run", "cuda:1", torch.device("cuda:1")), ("replay", "cuda:1")]


def test_a_failed_capture_is_tried_again(monkeypatch):
    """After a capture that raised, the next call warms up and captures again, rather than replaying an
    empty graph."""
    from sampling.cuda_graphs import _Replay
    fake = FakeCuda(monkeypatch, fail_captures=1)
    replay = _Replay(fake.fn, torch.device("cuda:0"), pool=None, stream=torch.cuda.Stream(torch.device("cuda:0")))
    with pytest.raises(RuntimeError, match="capture failed"):
        replay()
    assert replay.graph is None
    replay()
    replay()
    assert [event[0] for event in fake.events] == ["run", "run", "capture", "run", "replay"]


def test_every_graph_of_a_backend_shares_one_pool_and_one_capture_stream(draw_free, emulated_graphs):  # noqa: F811
    """Graphs share freed memory only when captured into one pool on one stream (the caching allocator
    reuses a block only on the stream that allocated it): a stream per graph would keep every graph's
    intermediates apart, up to one peak per stream at batch 256."""
    model = tiny_mar().eval()
    graphs = emulated_graphs(model, cfg_sampler="draw_free")
    sample(model, graphs, 3)
    replays = [replay for _, replay in graphs.replays.values()]
    assert len(replays) > 2
    assert {id(r.stream) for r in replays} == {id(graphs.stream)} and {r.pool for r in replays} == {"pool"}


def test_guided_and_unguided_calls_get_their_own_head_graphs(draw_free, emulated_graphs):  # noqa: F811
    """cfg 1.0 (no [cond; uncond] halves) and cfg 2.5 through one backend, in either order: each is
    the eager sample. A head graph keyed without `guided` would replay a guided graph, with its stale
    CFG scale and uncond half, for an unguided batch of the same bucket."""
    model = tiny_mar().eval()
    graphs = emulated_graphs(model, cfg_sampler="draw_free", precision="fp32")
    eager = EagerBackend(model, cfg_sampler="draw_free", precision="fp32")

    def run(backend, cfg):
        torch.manual_seed(3)
        return model.sample_tokens(3, num_iter=5, cfg=cfg, labels=torch.tensor([1, 2, 3]), backend=backend)
    for cfg in (2.5, 1.0, 2.5):
        assert torch.equal(run(graphs, cfg), run(eager, cfg)), cfg
    assert {key[3] for key in graphs.replays if key[0] == "head"} == {True, False}


def test_the_caller_s_autocast_picks_the_graphs(draw_free, emulated_graphs):  # noqa: F811
    """precision None leaves the caller's autocast alone: one backend called under bf16 autocast, then
    without, then under bf16 again, gives the eager samples each time; graphs (Steps and head) keyed
    without the autocast dtype would replay bf16-weight graphs in an fp32 call."""
    model = tiny_mar().eval()
    graphs = emulated_graphs(model, cfg_sampler="draw_free")
    eager = EagerBackend(model, cfg_sampler="draw_free")
    bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    for context in (bf16, contextlib.nullcontext, bf16):
        with context():
            assert torch.equal(sample(model, graphs, 3), sample(model, eager, 3))
    for kind in ("step", "head"):
        assert {key[-1] for key in graphs.replays if key[0] == kind} == {torch.bfloat16, None}


@pytest.mark.parametrize("min_rows, bsz, want", [(8, 3, 8), (8, 8, 8), (8, 9, 16), (2, 3, 4), (1, 1, 1)])
def test_head_rows_are_bucketed_per_half(draw_free, emulated_graphs, min_rows, bsz, want):  # noqa: F811
    """The head's bucket is the next power of two (at least min_rows) of the real rows of one half: a
    guided batch of 3 images pads each half to 8 rows, not its 6 rows to 8 per half (16 of 32 rows wasted)."""
    model = tiny_mar().eval()
    graphs = emulated_graphs(model, cfg_sampler="draw_free", precision="fp32", min_rows=min_rows)
    z = torch.randn(2 * bsz, model.head.cond_proj.in_features)
    graphs.sample_head(model.head, z, 1.0, 2.5)
    (key,) = [key for key in graphs.replays if key[0] == "head"]
    assert key[2] == want and graphs.replays[key][0][0].shape[0] == 2 * want


def test_an_inplace_buffer_is_written_wherever_it_is(emulated_graphs):
    """Step.inplace buffers are used as they are: a second buffer of the same shape gets its own graph
    (keyed by address) and its own writes, not the first buffer's."""
    from models.families.common import Step
    model = tiny_mar().eval()
    graphs = emulated_graphs(model, precision="fp32")
    step = Step("test.write", model, lambda module, cache, x: cache.copy_(x * 2).sum(0), inplace=(0,))
    a, b = torch.zeros(2, 3), torch.zeros(2, 3)
    graphs.run(step, a, torch.ones(2, 3))
    graphs.run(step, b, torch.full((2, 3), 3.0))
    assert torch.equal(a, torch.full((2, 3), 2.0)) and torch.equal(b, torch.full((2, 3), 6.0))
    assert sum(key[0] == "step" for key in graphs.replays) == 2


def test_a_step_input_of_another_dtype_gets_its_own_graph(emulated_graphs):
    """A Step's graph is keyed by its inputs' dtypes as well as shapes: a float64 input of a float32
    graph's shape would be rounded into the float32 static buffer."""
    from models.families.common import Step
    model = tiny_mar().eval()
    graphs = emulated_graphs(model, precision="fp32")
    step = Step("test.scale", model, lambda module, x: x * 3)
    x = torch.tensor([0.1, 1 / 3], dtype=torch.float64)
    assert graphs.run(step, x.float()).dtype == torch.float32
    out = graphs.run(step, x)
    assert out.dtype == torch.float64 and torch.equal(out, x * 3)


def test_the_first_call_returns_the_warm_up_s_result_and_a_replay_a_copy(monkeypatch):
    """A capture records kernels without running them: its output buffer holds nothing until a replay, so the
    first call hands back the warm-up's result. A replay hands back a copy of the graph's output buffer, which
    the next replay overwrites (bugs: the capture's unfilled buffer returned; the buffer itself returned, so
    each step's result changed under the caller at the next replay)."""
    from sampling.cuda_graphs import _Replay
    fake, outputs = FakeCuda(monkeypatch), []

    def fn():
        fake.fn()
        outputs.append(torch.full((2,), float(len(outputs))))
        return outputs[-1]
    replay = _Replay(fn, torch.device("cuda:0"), pool=None, stream=torch.cuda.Stream(torch.device("cuda:0")))
    assert replay() is outputs[0] and replay.out is outputs[1]
    second = replay()
    replay.out.fill_(7.0)  # what the next replay does to the graph's output buffer
    assert torch.equal(second, torch.ones(2)) and torch.equal(replay(), torch.full((2,), 7.0))


def test_the_default_head_bucket_is_at_least_8_rows(draw_free, emulated_graphs):  # noqa: F811
    """Without min_rows, 3 guided images pad each half to 8 rows: one graph serves batches of 1 to 8 images
    (bug: a default of 1, a graph per power of two from 1)."""
    model = tiny_mar().eval()
    graphs = emulated_graphs(model, cfg_sampler="draw_free", precision="fp32")
    graphs.sample_head(model.head, torch.randn(6, model.head.cond_proj.in_features), 1.0, 2.5)
    assert [key[2] for key in graphs.replays if key[0] == "head"] == [8]


def test_describe_says_whether_compile_is_on(emulated_graphs):
    model = tiny_mar().eval()
    for compile, word in ((False, "off"), (True, "on")):
        line = emulated_graphs(model, precision="fp32", compile=compile).describe()
        assert line.startswith(f"cuda_graphs, compile {word}, cfg sampler sir, precision fp32"), line


def test_a_head_input_of_another_dtype_gets_its_own_graph(draw_free, emulated_graphs):  # noqa: F811
    """A head graph is keyed by its rows' dtype: after the model turns float64, a float64 batch of a float32
    graph's bucket gets its own graph, the eager sample (bug: replayed on the float32 static rows)."""
    model = tiny_mar().eval()
    graphs = emulated_graphs(model, cfg_sampler="draw_free", precision="fp32")
    z = torch.randn(6, model.head.cond_proj.in_features, dtype=torch.float64)
    graphs.sample_head(model.head, z.float(), 1.0, 2.5)
    model.double()
    out = graphs.sample_head(model.head, z, 1.0, 2.5)
    want = EagerBackend(model, cfg_sampler="draw_free", precision="fp32").sample_head(model.head, z, 1.0, 2.5)
    assert out.dtype == torch.float64 and torch.equal(out, want)


def test_a_step_of_the_whole_model_reads_the_cast_weights(emulated_graphs):
    """Under bf16 a Step whose module is the model itself reads the Linear weights cast once per call, as a
    submodule's Step does (bug: the root's name prefix '.' matched no weight, so its graphs read the fp32
    weights and re-cast them on every replay)."""
    from models.families.common import Step
    model = tiny_mar().eval()
    graphs = emulated_graphs(model, precision="bf16")
    seen = []
    step = Step("test.weights", model, lambda module, x: seen.append(module.z_proj.weight) or x * 2)
    with graphs.autocast():
        graphs.run(step, torch.ones(2))
        assert seen and seen[0] is graphs.lowp[torch.bfloat16]["z_proj.weight"]
