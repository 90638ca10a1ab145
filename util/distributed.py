"""Process-group setup and small distributed helpers.

Launch with `torchrun` (which sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) or as a plain
`python` process: without those variables everything runs single-process and the collectives
below become no-ops. NCCL is used when CUDA is available, gloo otherwise.
"""
import datetime
import logging
import os
import shlex
import sys

import torch
import torch.distributed as dist


# how long a collective may wait before the run is stopped: above NCCL's 10 minutes, since the other ranks
# wait while rank 0 alone scores an evaluation (FID, precision / recall) and writes its 50k-image npz
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=1)


def is_distributed():
    return dist.is_available() and dist.is_initialized()


def get_rank():
    return dist.get_rank() if is_distributed() else 0


def get_local_rank():
    """This process's rank on its node (torchrun's LOCAL_RANK; 0 when single-process)."""
    return int(os.environ.get("LOCAL_RANK", 0)) if is_distributed() else 0


def get_world_size():
    return dist.get_world_size() if is_distributed() else 1


def is_main_process():
    return get_rank() == 0


def launch_command(script, argv):
    """The command that runs `script` with the arguments argv, as a user would type it (under torchrun when
    this is one of several processes, whose own options are not known here)."""
    start = f"torchrun [the same options] {script}" if get_world_size() > 1 else f"python {script}"
    return f"{start} {shlex.join(map(str, argv))}"


def init_distributed():
    """Join the torchrun process group if launched by torchrun; return this process's device."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and not is_distributed():
        backend = "nccl" if use_cuda else "gloo"
        kwargs = {"device_id": device} if use_cuda else {}
        dist.init_process_group(backend=backend, init_method="env://", timeout=COLLECTIVE_TIMEOUT, **kwargs)
    return device


def cleanup_distributed():
    if is_distributed():
        dist.barrier()
        dist.destroy_process_group()


def barrier():
    if is_distributed():
        dist.barrier()


def collective_device(tensor, backend):
    """Where `tensor` must be for a collective of `backend`: NCCL serves CUDA tensors only (a CPU tensor
    there raises), so a CPU tensor goes to this process's GPU; gloo takes tensors where they are."""
    if backend == "nccl" and tensor.device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return tensor.device


def for_collective(tensor):
    """`tensor` where the process group's backend takes it (itself, or a copy on this process's GPU)."""
    return tensor.to(collective_device(tensor, dist.get_backend()))


def all_reduce_sum(tensor):
    """In-place sum over ranks (identity when single-process); `tensor` may live anywhere."""
    if is_distributed():
        work = for_collective(tensor)
        dist.all_reduce(work, op=dist.ReduceOp.SUM)
        if work is not tensor:
            tensor.copy_(work)
    return tensor


def all_gather_object(obj):
    """[obj of rank 0, obj of rank 1, ...]."""
    if not is_distributed():
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj):
    """Rank 0's obj on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_rows(tensor):
    """Concatenate [n_r, ...] tensors from every rank (n_r may differ) in rank order."""
    if not is_distributed():
        return tensor
    counts = all_gather_object(tensor.shape[0])
    padded = for_collective(tensor.new_zeros((max(counts),) + tuple(tensor.shape[1:])))
    padded[:tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, counts)]).to(tensor.device)


def setup_logging(log_file=None):
    """INFO on rank 0 (console and optional file), warnings and errors only on other ranks."""
    rank = get_rank()
    handlers = [logging.StreamHandler(sys.stderr)]
    if log_file is not None and rank == 0:
        os.makedirs(os.path.dirname(os.path.abspath(log_file)), exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    prefix = f"[rank {rank}] " if get_world_size() > 1 else ""
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", handlers=handlers, force=True)


@torch.no_grad()
def replica_checksums(model):
    """Per-parameter float64 sums of this rank's weights (a cheap fingerprint of the replica)."""
    return [float(p.detach().double().sum()) for p in model.parameters()]


def check_replicas_in_sync(model):
    """Raise if data-parallel replicas hold different weights; return every rank's fingerprint."""
    sums = all_gather_object(replica_checksums(model))
    if any(s != sums[0] for s in sums[1:]):
        bad = next(r for r, s in enumerate(sums) if s != sums[0])
        raise RuntimeError(f"data-parallel replicas diverged: rank {bad}'s weights differ from rank 0's")
    return sums
