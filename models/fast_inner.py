"""CUDA-graph replay of the inner model's feature-by-feature sampling loop (opt-in).

On a GPU the inner loop is launch-bound: 16 features x (a block + head + mixture sampling) is a
few hundred tiny kernels per outer step. GraphedInnerSampler captures InnerAR.sample itself, for
a fixed row count, as one CUDA graph and replays it; the math and the random draws are the
eager loop's. Row counts vary from step to step, so rows are padded up to a power-of-two bucket
(padding rows are independent of the real ones: every op in the loop is per row) and one graph
is captured per (bucket, guided, temperature, sampler, dtype) on first use.

Usage: graphs = GraphedInnerSampler(model.arhead); model.sample_tokens(..., inner_graphs=graphs).
Off CUDA, InnerAR.sample ignores it. `capture=False` runs the same padded fixed-shape loop
eagerly, which is how the CPU tests check it.
"""
import contextlib

import torch

from models.gmm import sample_gmm_cfg, sir_candidates


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


class _Replay:
    """Static input/output buffers of one captured (or eagerly run) fixed-shape loop."""

    def __init__(self, inner, rows, guided, temperature, cfg_sampler, z_like, capture):
        self.inner, self.rows, self.guided = inner, rows, guided
        self.temperature, self.cfg_sampler = temperature, CAPTURABLE.get(cfg_sampler, cfg_sampler)
        self.z = torch.zeros((2 * rows if guided else rows, z_like.shape[1]), dtype=z_like.dtype, device=z_like.device)
        self.cfg = torch.ones((), device=z_like.device)
        self.graph = self.out = None
        if capture:
            self._capture()

    def _loop(self):
        return self.inner.sample(self.z, self.temperature, self.cfg if self.guided else 1.0,
                                 cfg_sampler=self.cfg_sampler)

    def _capture(self):
        # warm up on a side stream (lazy cuBLAS/attention initialisation must not be captured)
        stream = torch.cuda.Stream(self.z.device)
        stream.wait_stream(torch.cuda.current_stream(self.z.device))
        with torch.cuda.stream(stream):
            self._loop()
        torch.cuda.current_stream(self.z.device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        device_type = self.z.device.type
        if torch.is_autocast_enabled(device_type):
            # autocast's weight-cast cache must be off while capturing
            cast = torch.autocast(device_type, dtype=torch.get_autocast_dtype(device_type), cache_enabled=False)
        else:
            cast = contextlib.nullcontext()
        with cast, torch.cuda.graph(self.graph):
            self.out = self._loop()

    def __call__(self, z, cfg):
        n = z.shape[0] // 2 if self.guided else z.shape[0]
        if self.guided:  # rows are [cond; uncond]; each half goes to the front of its padded half
            self.z[:n].copy_(z[:n])
            self.z[self.rows:self.rows + n].copy_(z[n:])
            self.cfg.fill_(cfg)
        else:
            self.z[:n].copy_(z)
        if self.graph is None:
            return self._loop()[:n]
        self.graph.replay()
        return self.out[:n].clone()


class GraphedInnerSampler:
    """Callable with InnerAR.sample's (z, temperature, cfg, cfg_sampler) -> features [n, D].

    Holds one replay per (row bucket, guided, temperature, sampler, dtype, autocast dtype).
    capture=None captures CUDA graphs when z is on CUDA and runs the padded loop eagerly
    otherwise; capture=False always runs it eagerly.
    """

    def __init__(self, inner, min_rows=8, capture=None):
        self.inner, self.min_rows, self.capture = inner, min_rows, capture
        self.replays = {}

    def __call__(self, z, temperature=1.0, cfg=1.0, cfg_sampler=sample_gmm_cfg):
        guided = torch.is_tensor(cfg) or cfg != 1.0
        n = z.shape[0] // 2 if guided else z.shape[0]
        rows = bucket_rows(n, self.min_rows)
        device_type = z.device.type
        cast = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
        key = (rows, guided, float(temperature), cfg_sampler, z.dtype, z.device, cast)
        if key not in self.replays:
            capture = z.is_cuda if self.capture is None else self.capture
            self.replays[key] = _Replay(self.inner, rows, guided, float(temperature), cfg_sampler, z, capture)
        return self.replays[key](z, cfg)
