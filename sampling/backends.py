"""The eager sampling backend and the run-level settings every backend owns.

A backend runs the pieces of a family's sampling step (models/families/common.py):
    autocast()                                  the run's precision
    run(step, *tensors)                         a Step the family declares (its outer network)
    sample_head(head, z, temperature, cfg)      the per-token head's sampler, with the run's CFG sampler
Eager runs them as they are; CUDA graphs (sampling/cuda_graphs.py) capture and replay them.
`make_backend` (sampling/__init__.py) is the one place that picks one.
"""
import contextlib

import torch

from models.families.common import EagerSteps

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
PRECISION_HELP = ("autocast dtype of the transformers (default: bf16 on GPUs that support it, else fp32; mixture "
                  "math stays fp32)")


def default_precision(device):
    """--precision when none is given: bf16 on a GPU with bf16 tensor cores (Ampere on), else fp32. Emulated
    bf16 (V100, T4: torch's is_bf16_supported() says yes by default) would run slower than fp32."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False):
        return "bf16"
    return "fp32"


def precision_autocast(device, precision):
    """The autocast context of a --precision on a device (fp32: none); the mixture math inside stays fp32."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


class EagerBackend(EagerSteps):
    """The model's steps run as they are. precision None = leave the caller's autocast alone."""

    def __init__(self, model, cfg_sampler="sir", precision=None):
        self.model, self.cfg_sampler, self.precision = model, cfg_sampler, precision
        self.device = next(model.parameters()).device

    def autocast(self):
        if self.precision is None:
            return contextlib.nullcontext()
        return precision_autocast(self.device, self.precision)

    def describe(self):
        precision = self.precision or "caller's autocast"
        return (f"{self.name}, compile off, cfg sampler {self.cfg_sampler}, precision {precision} "
                f"(mixture math fp32), device {self.device}")
