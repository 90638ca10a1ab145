"""Peak memory of one call: the most bytes its tensors held at once beyond what was allocated before it.

CUDA: the caching allocator's own figures (torch.cuda.max_memory_allocated during the call minus
torch.cuda.memory_allocated before it; memory the call keeps, such as a KV cache or CUDA-graph pools
made on a first call, is in its peak). CPU, which keeps no such figures: every storage an op creates
during the call is counted from its creation until it is freed (a finalizer on the storage), so a
view, an in-place op or an output that aliases an input is not counted again, and the weights and
other tensors made before the call are not counted at all.
"""
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def _storages(values):
    return [t.untyped_storage() for t in tree_leaves(values) if isinstance(t, torch.Tensor)]


class StorageTracker(TorchDispatchMode):
    """Live bytes of the storages created inside the mode (`live`) and their most at once (`peak`)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        known = {s.data_ptr() for s in _storages((args, kwargs))}  # aliases of inputs and out= tensors
        for storage in _storages(out):
            if storage.nbytes() and storage.data_ptr() not in known:
                known.add(storage.data_ptr())
                self._add(storage)
        return out

    def _add(self, storage):
        size = storage.nbytes()
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, size)

    def _free(self, size):
        self.live -= size


def peak_memory(fn, device, *args, **kwargs):
    """(peak bytes above the memory allocated before the call, fn's result) of one call fn(*args, **kwargs)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn(*args, **kwargs)
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before, out
    with StorageTracker() as tracker:
        out = fn(*args, **kwargs)
    return tracker.peak, out
