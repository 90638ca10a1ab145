"""Sampling backends and the one place that picks one.

A backend runs the two pieces of an outer step for sampling/loop.py:
  condition(tokens, visible, class_vec, predict) -> z   (the outer model, MAR.condition_at)
  sample_head(z, temperature, cfg) -> tokens           (the per-token head's sample)
and owns the run's precision (autocast) and CFG sampler. Two exist: eager (any device) and CUDA
graphs (CUDA; `--compile` adds torch.compile of the outer step there). make_backend chooses from
(device, flags), refuses contradictory flags in one line, and logs the choice once.
"""
import contextlib
import logging

import torch

log = logging.getLogger(__name__)

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


class EagerBackend:
    """The model's own methods, run as they are. precision None = leave the caller's autocast alone."""

    name = "eager"

    def __init__(self, model, cfg_sampler="sir", precision=None):
        self.model, self.cfg_sampler, self.precision = model, cfg_sampler, precision

    @property
    def device(self):
        return self.model.fake_latent.device

    def autocast(self):
        if self.precision is None:
            return contextlib.nullcontext()
        dtype = PRECISIONS[self.precision]
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    def condition(self, tokens, visible, class_vec, predict):
        return self.model.condition_at(tokens, visible, class_vec, predict)

    def sample_head(self, z, temperature, cfg):
        return self.model.head.sample(z, temperature, cfg, cfg_sampler=self.cfg_sampler)

    def describe(self):
        precision = self.precision or "caller's autocast"
        return (f"{self.name}, compile off, cfg sampler {self.cfg_sampler}, precision {precision} "
                f"(mixture math fp32), device {self.device}")


def make_backend(model, cuda_graphs=None, compile=False, cfg_sampler="sir", precision=None):
    """The sampling backend for the model's device and the flags; the one decision point.

    cuda_graphs None = on for CUDA, off elsewhere. Contradictions are one-line ValueErrors.
    """
    device = model.fake_latent.device
    if cuda_graphs is None:
        cuda_graphs = device.type == "cuda"
    if cuda_graphs and device.type != "cuda":
        raise ValueError(f"--cuda_graphs needs a CUDA device and the model is on {device}: drop --cuda_graphs")
    if compile and not cuda_graphs:
        raise ValueError("--compile compiles inside the CUDA-graph backend: it needs a CUDA device and "
                         "--cuda_graphs (drop --compile, or --no-cuda_graphs)")
    supported = getattr(model.head, "cfg_samplers", ("sir",))
    if cfg_sampler not in supported:
        raise ValueError(f"--cfg_sampler {cfg_sampler} is not available for this head; choose one of "
                         f"{', '.join(supported)}")
    if precision not in (None, *PRECISIONS):
        raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}; got {precision}")
    if cuda_graphs:
        from sampling.cuda_graphs import CudaGraphsBackend
        backend = CudaGraphsBackend(model, cfg_sampler, precision, compile=compile)
    else:
        backend = EagerBackend(model, cfg_sampler, precision)
    log.info("sampling backend: %s", backend.describe())
    return backend
