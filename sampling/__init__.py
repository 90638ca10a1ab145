"""The sampling engine: one outer loop (loop.py) driving any per-token head through a backend.

    backend = make_backend(model, cuda_graphs=None, compile=False, cfg_sampler="sir", precision="bf16")
    latents = sample_tokens(model, backend, bsz=8, num_iter=64, cfg=4.5, labels=labels)
"""
from sampling.backends import EagerBackend, make_backend
from sampling.loop import sample_tokens

__all__ = ["EagerBackend", "make_backend", "sample_tokens"]
