"""CUDA-graph replay of the sampling loop (`--cuda_graphs`, on by default in main_mar.py and sample.py).

At small batches a sampling step is launch-bound: the outer model is ~400 kernels and the inner
loop 16 features x (a block + head + mixture draw), a thousand more. SamplingGraphs captures
both fixed-shape pieces once and replays them:
- the outer step, MAR.condition_at: its shapes depend only on the step of the schedule (how
  many tokens are kept and predicted), so there is one graph per step;
- the inner loop, InnerAR.sample: its row count varies, so rows are padded to a power-of-two
  bucket (every op in the loop is per row: padding rows never touch real ones), one graph each.
The math and the random draws are the eager code's. Under autocast, the Linear layers read
weights cast once per sampling call: inside a graph autocast's cast cache is off, so it would
otherwise re-cast every weight on every replay. The values are autocast's own casts.

Usage: graphs = SamplingGraphs(model); model.sample_tokens(..., graphs=graphs). Keep the object
across calls so graphs are captured once. Off CUDA, sample_tokens ignores it; `capture=False`
runs the same static-buffer code eagerly on any device, which is how the CPU tests check it.
"""
import contextlib

import torch
import torch.nn as nn
from torch.func import functional_call

from models.gmm import release_sir_with_pick, sample_gmm_cfg, sample_gmm_cfg_fused, sir_candidates, sir_pick


def sample_gmm_cfg_race(cond, uncond, cfg, temperature=1.0, num_candidates=1000):
    """sample_gmm_cfg with its resampling step written without host synchronisation.

    torch.multinomial(p, 1) checks its input on the host (not capturable); for one draw it
    picks argmax(p / E) with E ~ Exp(1) drawn by exponential_ on a tensor like p. Doing exactly
    that here keeps the same random stream, so on the same seed the picks are the same.
    """
    candidates, probs = sir_candidates(cond, uncond, cfg, temperature, num_candidates)
    race = torch.empty_like(probs).exponential_(1)
    pick = (probs / race).argmax(dim=-1, keepdim=True)
    return candidates.reshape(-1, num_candidates).gather(-1, pick).reshape(candidates.shape[:-1])


# samplers whose eager form synchronises with the host, and their capturable equivalents
CAPTURABLE = {sample_gmm_cfg: sample_gmm_cfg_race}


def bucket_rows(n, min_rows=8):
    """Padded row count for n real rows: the next power of two, at least min_rows."""
    return max(min_rows, 1 << (n - 1).bit_length())


def autocast_dtype(device):
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None


class _Replay:
    """fn() over static buffers the caller fills: run eagerly once (the warm-up, whose result is
    returned), then captured; later calls replay. capture=False always runs it eagerly."""

    def __init__(self, fn, device, capture, pool):
        self.fn, self.device, self.capture, self.pool = fn, device, capture, pool
        self.graph = self.out = None

    def __call__(self):
        if self.graph is not None:
            self.graph.replay()
            return self.out.clone()
        if not self.capture:
            return self.fn()
        dtype = autocast_dtype(self.device)
        # autocast's weight-cast cache must be off while capturing; the warm-up runs the same way,
        # so torch.compile (which guards on autocast state) compiles there and not mid-capture
        cast = (torch.autocast(self.device.type, dtype=dtype, cache_enabled=False) if dtype is not None
                else contextlib.nullcontext())
        # warm up on a side stream (lazy cuBLAS/attention initialisation must not be captured)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with cast, torch.cuda.stream(stream):
            result = self.fn()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with cast, torch.cuda.graph(self.graph, pool=self.pool):
            self.out = self.fn()
        return result


class _Method(nn.Module):
    """model.<name>(*args) as a module's forward, so torch.func.functional_call can swap weights in."""

    def __init__(self, model, name, compile=False):
        super().__init__()
        self.model = model
        self.fn = torch.compile(getattr(model, name), dynamic=True) if compile else getattr(model, name)

    def forward(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


class SamplingGraphs:
    """Static-shape replays of MAR.condition_at (per schedule step) and InnerAR.sample (per row bucket).

    capture=None captures CUDA graphs on CUDA; capture=False runs the same code eagerly (CPU tests).
    compile=True also runs the outer step and the SIR arithmetic through torch.compile (CUDA:
    fuses the elementwise work between matmuls; compiles once per shape family, about a minute).
    """

    def __init__(self, model, min_rows=8, capture=None, compile=False):
        self.model, self.min_rows, self.capture = model, min_rows, capture
        self.condition_at = _Method(model, "condition_at", compile)
        self.inner_sample = _Method(model.arhead, "sample")
        self.sir_pick = torch.compile(sir_pick, dynamic=True) if compile else None
        self.replays = {}
        self.lowp = {}  # autocast dtype -> {Linear parameter name: its cast}
        self.pool = None

    def applies_to(self, device):
        return self.capture is False or device.type == "cuda"

    def refresh_weights(self, device):
        """Cast the Linear weights to this call's autocast dtype, in place (captured graphs read them)."""
        dtype = autocast_dtype(device)
        if dtype is None:
            return
        names = {f"{name}.{p}" for name, m in self.model.named_modules() if isinstance(m, nn.Linear)
                 for p in ("weight", "bias")}
        params = {n: p for n, p in self.model.named_parameters() if n in names}
        cast = self.lowp.setdefault(dtype, {n: torch.empty_like(p, dtype=dtype) for n, p in params.items()})
        with torch.no_grad():
            for n, p in params.items():
                cast[n].copy_(p)

    def _weights(self, device, prefix):
        """The cast weights as functional_call wants them for a _Method over model<prefix>."""
        cast = self.lowp.get(autocast_dtype(device), {})
        return {"model." + n[len(prefix):]: w for n, w in cast.items() if n.startswith(prefix)}

    def _replay(self, key, device, make_fn):
        if key not in self.replays:
            capture = device.type == "cuda" if self.capture is None else self.capture
            if capture and self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()  # one pool: replays never overlap
            static, fn = make_fn()
            self.replays[key] = (static, _Replay(fn, device, capture, self.pool))
        return self.replays[key]

    def outer(self, tokens, keep, class_vec, predict):
        """MAR.condition_at(tokens, keep, class_vec, predict) -> z [B, P, D]."""
        device = tokens.device
        key = ("outer", tuple(tokens.shape), keep.shape[1], predict.shape[1], tokens.dtype, autocast_dtype(device))

        def make():
            static = [t.clone() for t in (tokens, keep, class_vec, predict)]
            weights = self._weights(device, "")
            return static, lambda: functional_call(self.condition_at, weights, tuple(static), strict=False)

        static, replay = self._replay(key, device, make)
        for buffer, t in zip(static, (tokens, keep, class_vec, predict)):
            buffer.copy_(t)
        return replay()

    def inner(self, z, temperature=1.0, cfg=1.0, cfg_sampler=sample_gmm_cfg_fused):
        """InnerAR.sample(z, temperature, cfg, cfg_sampler=...) -> features [n, D], rows padded to a bucket."""
        guided = torch.is_tensor(cfg) or cfg != 1.0
        n = z.shape[0] // 2 if guided else z.shape[0]
        rows = bucket_rows(n, self.min_rows)
        device = z.device
        sampler = release_sir_with_pick(cfg_sampler, self.sir_pick) or CAPTURABLE.get(cfg_sampler, cfg_sampler)
        key = ("inner", rows, guided, float(temperature), cfg_sampler, z.dtype, autocast_dtype(device))

        def make():
            static_z = z.new_zeros((2 * rows if guided else rows, z.shape[1]))
            static_cfg = torch.ones((), device=device)
            weights = self._weights(device, "arhead.")
            args = (static_z, float(temperature), static_cfg if guided else 1.0)
            return (static_z, static_cfg), lambda: functional_call(
                self.inner_sample, weights, args, {"cfg_sampler": sampler}, strict=False)

        (static_z, static_cfg), replay = self._replay(key, device, make)
        if guided:  # rows are [cond; uncond]; each half goes to the front of its padded half
            static_z[:n].copy_(z[:n])
            static_z[rows:rows + n].copy_(z[n:])
            static_cfg.fill_(cfg)
        else:
            static_z[:n].copy_(z)
        return replay()[:n]
