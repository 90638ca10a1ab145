"""`--compile` off CUDA: the inner loop's per-feature step and the SIR arithmetic through torch.compile.

On CPU the inner loop is matmuls with elementwise work between them (AdaLN modulation, tanh-GELU,
gates, the head's norm, the 1000-candidate resampling math). Inductor fuses that work into
vectorised C++ loops; the matmuls, 16-112 rows each, go to the few-row kernel of
models/cpu_linear.py on AVX2 CPUs in fp32 (MKL otherwise). The outer step stays eager: compiled, it ran
slower on CPU (bench/README.md). Same math and the same random draws as eager sampling; values
differ by float rounding (which can flip a near-tied pick among the 1000 proposals). Needs a C++
compiler; compiles on first use (~1 min).

Usage: model.sample_tokens(..., graphs=CompiledSampling(model)), the hook SamplingGraphs uses.
"""
import functools
import logging
import os
import shutil

import torch

from models.cpu_linear import cpu_supports_kernel, load_small_linear
from models.gmm import release_sir_with_pick, sample_gmm_cfg_fused, sir_pick

log = logging.getLogger(__name__)


def cxx_compiler():
    """Path of the C++ compiler Inductor would find ($CXX, g++, c++ or clang++), or None."""
    names = (os.environ.get("CXX"), "g++", "c++", "clang++")
    return next((path for path in map(shutil.which, filter(None, names)) if path), None)


def few_row_linear():
    """models/cpu_linear's kernel where this CPU runs it; None (so MKL) where not or where it fails to build."""
    if not cpu_supports_kernel():
        return None
    try:
        return load_small_linear()
    except (RuntimeError, OSError) as err:  # a build failure must not stop sampling
        log.warning("the few-row CPU linear did not build (%s); the inner loop keeps F.linear", err)
        return None


class CompiledSampling:
    def __init__(self, model):
        if cxx_compiler() is None:
            raise RuntimeError("--compile off CUDA needs a C++ compiler (g++ or clang++) on PATH: "
                               "install one, or sample without --compile")
        self.model = model
        # dynamic shapes: one compile serves every row count and KV-cache position
        self.run = torch.compile(model.arhead.run, dynamic=True)
        # fp32 only: under CPU autocast the matmuls must stay F.linear (autocast casts for them)
        self.run_fp32 = self.run
        linear = few_row_linear()
        if linear is not None:
            self.run_fp32 = torch.compile(functools.partial(model.arhead.run, linear=linear), dynamic=True)
        self.sir_pick = torch.compile(sir_pick, dynamic=True)

    def applies_to(self, device):
        return device.type != "cuda"  # on CUDA, SamplingGraphs(compile=True) is the fast path

    def refresh_weights(self, device):
        """Nothing to refresh: compiled code reads the live parameters."""

    def outer(self, tokens, keep, class_vec, predict):
        return self.model.condition_at(tokens, keep, class_vec, predict)

    def inner(self, z, temperature=1.0, cfg=1.0, cfg_sampler=sample_gmm_cfg_fused):
        cfg_sampler = release_sir_with_pick(cfg_sampler, self.sir_pick) or cfg_sampler  # compiled pick
        run = self.run if torch.is_autocast_enabled(z.device.type) else self.run_fp32
        return self.model.arhead.sample(z, temperature, cfg, cfg_sampler=cfg_sampler, run=run)
