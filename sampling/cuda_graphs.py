"""The CUDA-graph backend: each Step a family runs and each head call replayed as a captured graph.

At small batches a sampling step is launch-bound: the outer model is ~400 kernels and ARINAR's
inner loop 16 features x (a block + head + mixture draw), a thousand more. This backend
captures both fixed-shape pieces once and replays them:
- a family's Step (MAR: the outer network, condition_at): one graph per input shapes (for MAR,
  per step of the schedule); `Step.inplace` buffers (a KV cache) are captured by address;
- the head's sample: its row count varies, so rows are padded to a power-of-two bucket (every op
  in a head's sampler is per row: padding rows never touch real ones), one graph each, whose
  temperature and CFG scale are static inputs (a sweep over either reuses the graph).
The math and the random draws are the eager backend's. Under autocast, the Linear layers read
weights cast once per sampling call: inside a graph autocast's cast cache is off, so it would
otherwise re-cast every weight on every replay. The values are autocast's own casts (layers marked
`keeps_full_precision`, which autocast does not cast, keep their weights).
--compile runs the repeated blocks of the family's Steps (`Step.regions`) through torch.compile with
dynamic shapes, fusing the elementwise work between their matmuls: one compilation per block class,
shared by every block of it and by every call whose tensors have no size-0/1 dimension (see
compiles_well). Compiling whole Steps instead costs a compilation the size of the network: on a CPU
with Inductor's C++ backend, ARINAR-B's outer Step took 46 s to compile whole and 13 s block by block
(bench/bench_compile.py). The head's sampler likewise compiles the pieces it declares
(`head.compile_regions`; ARINAR: its block, pre-head norm and mixture draw, shared by its 16 features):
at batch 1 its ~72 small kernels a feature, not the outer network, would bound a replay.
"""
import contextlib
import functools
import logging

import torch
import torch.fx.experimental._config as fx_config
import torch.nn as nn
from torch.func import functional_call

from models.families.common import CapturedBuffers
from models.gmm import is_guided
from models.layers import activation_dtype
from sampling.backends import EagerBackend

log = logging.getLogger(__name__)


def bucket_rows(n, min_rows=8):
    """Padded row count for n real rows: the next power of two, at least min_rows."""
    return max(min_rows, 1 << (n - 1).bit_length())


def pad_rows(z, n, rows, guided):
    """z's n real rows (or [cond n; uncond n] when guided) at the front of a zero bucket of `rows` (x2)."""
    return copy_into_bucket(z.new_zeros((2 * rows if guided else rows, z.shape[1])), z, n, rows, guided)


def copy_into_bucket(bucket, z, n, rows, guided):
    """Write z's real rows to the front of `bucket` (each half to the front of its half when guided);
    the other rows keep whatever they hold: every op in a head's sampler is per row."""
    bucket[:n].copy_(z[:n])
    if guided:
        bucket[rows:rows + n].copy_(z[n:])
    return bucket


def compiles_well(args):
    """Whether a Step call should run its compiled regions: not when a tensor has a size-0 or size-1
    dimension, nor when an argument is a Python value, which a compiled graph bakes in: one compilation
    per value (the scale-wise Step's scale index would cost ten, past Dynamo's recompile limit).

    Compiled with dynamic shapes, a function still gets a separate graph for every size-0/1
    specialisation it meets; MAR's first outer steps (nothing visible yet, one token predicted) would
    cost three extra compilations of each block graph to speed up a handful of steps. Those run
    uncompiled inside their CUDA graphs; every other step shares the blocks' dynamic graphs.
    """
    return all(torch.is_tensor(a) and min(a.shape, default=2) >= 2 for a in args)


class _Replay:
    """fn() over static buffers the caller fills: run eagerly once (the warm-up, whose result is
    returned), then captured; later calls replay."""

    def __init__(self, fn, device, pool, stream):
        self.fn, self.device, self.pool, self.stream = fn, device, pool, stream
        self.graph = self.out = None

    def __call__(self):
        # on the model's device, whichever is current: a capture stream of another device would record
        # none of the model's kernels (an empty graph, whose replays return the capture's output again)
        with torch.cuda.device(self.device):
            if self.graph is not None:
                self.graph.replay()
                return self.out.clone()
            return self.capture()

    def capture(self):
        dtype = activation_dtype(self.device)
        # autocast's weight-cast cache must be off while capturing; the warm-up runs the same way,
        # so torch.compile (which guards on autocast state) compiles there and not mid-capture
        cast = (torch.autocast(self.device.type, dtype=dtype, cache_enabled=False) if dtype is not None
                else contextlib.nullcontext())
        # warm up on the side stream (lazy cuBLAS/attention initialisation must not be captured), then
        # capture on it: torch.cuda.graph's own default stream belongs to the device current at its first use
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with cast, torch.cuda.stream(self.stream):
            result = self.fn()
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        graph = torch.cuda.CUDAGraph()
        with cast, torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
            self.out = self.fn()
        self.graph = graph  # only once captured: after a failed capture the next call tries again
        return result


@contextlib.contextmanager
def compiled_forwards(modules, compiled):
    """Inside, each module's forward is compiled[its class] (an instance attribute shadows the class's
    forward); the modules are as they were afterwards, for training and other backends."""
    before = {module: vars(module).get("forward") for module in modules}
    for module in before:
        module.forward = functools.partial(compiled[type(module)], module)
    try:
        yield
    finally:
        for module, forward in before.items():
            if forward is None:
                del module.forward
            else:
                module.forward = forward


class StepModule(nn.Module):
    """A Step as a module's forward, so torch.func.functional_call can swap the cast weights in.

    With `regions` (compiled), each region's forward goes through one torch.compile of its class's forward,
    shared by every region of that class: their weights are the graph's inputs. Sizes get a symbol each: by
    default ("duck sizing") two sizes equal when the graph is traced share one, and the first call where
    they differ compiles again (so the causal family's blocks compiled twice: sizes equal at its first step).
    """

    def __init__(self, module, fn, regions=(), backend="inductor"):
        super().__init__()
        self.module, self.fn, self.regions = module, fn, tuple(regions)
        self.compiled = {cls: torch.compile(cls.forward, dynamic=True, backend=backend)
                         for cls in {type(r) for r in self.regions}}

    def forward(self, *args, **kwargs):
        if not self.regions:
            return self.fn(self.module, *args, **kwargs)
        # read when the graphs are traced (the warm-up); replays do not come here
        with fx_config.patch(use_duck_shape=False), compiled_forwards(self.regions, self.compiled):
            return self.fn(self.module, *args, **kwargs)


class CudaGraphsBackend(CapturedBuffers, EagerBackend):
    name = "cuda_graphs"

    def __init__(self, model, cfg_sampler="sir", precision=None, compile=False, min_rows=8):
        super().__init__(model, cfg_sampler, precision)
        self.compile, self.min_rows = compile, min_rows
        self.prefixes = {id(m): name + "." if name else "" for name, m in model.named_modules()}
        self.wrappers = {}  # (step name or id(head), compiled) -> StepModule
        self.uncompiled = set()  # names --compile found no regions in (logged once)
        self.replays = {}
        self.lowp = {}  # autocast dtype -> {Linear parameter name: its cast}
        self.pool = self.stream = None

    def describe(self):
        return super().describe().replace("compile off", f"compile {'on' if self.compile else 'off'}")

    @contextlib.contextmanager
    def autocast(self):
        with super().autocast():
            self.refresh_weights()
            yield

    def refresh_weights(self):
        """Cast the Linear weights to this call's autocast dtype, in place (captured graphs read them)."""
        dtype = activation_dtype(self.device)
        if dtype is None:
            return
        # layers that compute in full precision whatever the autocast (ARINAR's mixture output) keep their own
        names = {f"{name}.{p}" for name, m in self.model.named_modules()
                 if isinstance(m, nn.Linear) and not getattr(m, "keeps_full_precision", False)
                 for p in ("weight", "bias")}
        params = {n: p for n, p in self.model.named_parameters() if n in names}
        if dtype not in self.lowp:  # allocated once: captured graphs read these very tensors
            self.lowp[dtype] = {n: torch.empty_like(p, dtype=dtype) for n, p in params.items()}
        cast = self.lowp[dtype]
        with torch.no_grad():
            for n, p in params.items():
                cast[n].copy_(p)

    def _weights(self, module):
        """The cast weights of `module` (a submodule of the model) as functional_call wants them for a StepModule."""
        prefix = self.prefixes[id(module)]
        cast = self.lowp.get(activation_dtype(self.device), {})
        return {"module." + n[len(prefix):]: w for n, w in cast.items() if n.startswith(prefix)}

    def _regions(self, name, regions, declared_by):
        """The regions --compile compiles in `name` (none without --compile); says once when there are none."""
        if not self.compile:
            return ()
        if not regions and name not in self.uncompiled:
            self.uncompiled.add(name)
            log.info("--compile: %s declares no repeated blocks (%s); it runs uncompiled", name, declared_by)
        return tuple(regions)

    def _wrapper(self, key, module, fn, regions=()):
        if key not in self.wrappers:
            self.wrappers[key] = StepModule(module, fn, regions)
        return self.wrappers[key]

    def _replay(self, key, make_fn):
        if key not in self.replays:
            if self.pool is None:  # one pool (replays never overlap), captured on one stream: the caching
                # allocator reuses a freed block only on the stream that allocated it, so graphs captured
                # on different streams would each keep their own intermediates
                self.pool, self.stream = torch.cuda.graph_pool_handle(), torch.cuda.Stream(self.device)
            static, fn = make_fn()
            self.replays[key] = (static, _Replay(fn, self.device, self.pool, self.stream))
        return self.replays[key]

    def run(self, step, *args):
        """One graph per (step, input shapes and dtypes, inplace buffers); inputs are copied into its
        static buffers, `step.inplace` buffers are used as they are."""
        signature = tuple((tuple(a.shape), a.dtype) if torch.is_tensor(a) else a for a in args)
        key = ("step", step.name, signature, tuple(args[i].data_ptr() for i in step.inplace),
               activation_dtype(self.device))

        def make():
            static = [a if i in step.inplace or not torch.is_tensor(a) else a.clone() for i, a in enumerate(args)]
            regions = self._regions(step.name, step.regions, "Step.regions")
            regions = regions if compiles_well(args) else ()
            wrapper = self._wrapper((step.name, bool(regions)), step.module, step.fn, regions)
            weights = self._weights(step.module)
            return static, lambda: functional_call(wrapper, weights, tuple(static), strict=False)

        static, replay = self._replay(key, make)
        for i, (buffer, a) in enumerate(zip(static, args)):
            if i not in step.inplace and torch.is_tensor(a):
                buffer.copy_(a)
        return replay()

    def sample_head(self, head, z, temperature, cfg):
        """The head's sampler on rows padded to a power-of-two bucket (every op in a head's sampler is per row)."""
        guided = is_guided(cfg)
        n = z.shape[0] // 2 if guided else z.shape[0]
        rows = bucket_rows(n, self.min_rows)
        key = ("head", id(head), rows, guided, z.dtype, activation_dtype(self.device))

        def make():
            static_z = pad_rows(z, n, rows, guided)
            # the temperature and CFG scale as inputs, so one graph (and one compilation) serves every value;
            # float64, so that casting them to the head's dtype rounds as a Python float does in eager
            static_t, static_cfg = (torch.ones((), dtype=torch.float64, device=self.device) for _ in range(2))
            name = f"the {type(head).__name__} head"
            regions = self._regions(name, getattr(head, "compile_regions", ()), "compile_regions")
            wrapper = self._wrapper((id(head), bool(regions)), head, type(head).sample, regions)
            weights = self._weights(head)
            args = (static_z, static_t, static_cfg if guided else 1.0)
            return (static_z, static_t, static_cfg), lambda: functional_call(
                wrapper, weights, args, {"cfg_sampler": self.cfg_sampler}, strict=False)

        (static_z, static_t, static_cfg), replay = self._replay(key, make)
        copy_into_bucket(static_z, z, n, rows, guided)
        static_t.fill_(temperature)
        if guided:
            static_cfg.fill_(cfg)
        return replay()[:n]
