"""Sampling backends: how a family's sampling steps run (eager or CUDA graphs), and the one place
that picks one.

    backend = make_backend(model, cuda_graphs=None, compile=False, cfg_sampler="sir", precision="bf16")
    latents = model.sample_tokens(bsz=8, num_iter=64, cfg=4.5, labels=labels, backend=backend)
"""
import logging

from sampling.backends import PRECISIONS, EagerBackend, default_precision, precision_autocast
from sampling.cuda_graphs import CudaGraphsBackend

log = logging.getLogger(__name__)


def make_backend(model, cuda_graphs=None, compile=False, cfg_sampler="sir", precision=None):
    """The sampling backend for the model's device and the flags; logs the choice once.

    cuda_graphs None = on for CUDA, off elsewhere. Contradictions are one-line ValueErrors naming the flag.
    """
    device = next(model.parameters()).device
    if cuda_graphs is None:
        cuda_graphs = device.type == "cuda"
    if cuda_graphs and device.type != "cuda":
        raise ValueError(f"--cuda_graphs needs a CUDA device and the model runs on {device}: drop --cuda_graphs")
    if compile and device.type != "cuda":
        raise ValueError(f"--compile needs a CUDA device (it compiles inside the CUDA-graph backend) and the model "
                         f"runs on {device}: drop --compile")
    if compile and not cuda_graphs:
        raise ValueError("--compile compiles inside the CUDA-graph backend: drop --no-cuda_graphs or drop --compile")
    supported = getattr(model.head, "cfg_samplers", ("sir",))
    if cfg_sampler not in supported:
        raise ValueError(f"--cfg_sampler {cfg_sampler} is not available for this head; choose one of "
                         f"{', '.join(supported)}")
    if precision not in (None, *PRECISIONS):
        raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}; got {precision}")
    if cuda_graphs:
        backend = CudaGraphsBackend(model, cfg_sampler, precision, compile=compile)
    else:
        backend = EagerBackend(model, cfg_sampler, precision)
    log.info("sampling backend: %s", backend.describe())
    return backend


__all__ = ["EagerBackend", "CudaGraphsBackend", "PRECISIONS", "default_precision", "make_backend",
           "precision_autocast"]
