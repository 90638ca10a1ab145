"""What the benchmarks share: the model/runtime flags, the model they describe, timing, JSON output."""
import argparse
import importlib.metadata
import json
import os
import platform
import statistics
import time

import torch

from models import build, config_from_flags
from sampling import default_precision
from util import flags

def add_model_args(parser):
    """The model flags main_mar.py and sample.py take (util/flags.py): --model, --width, --enc_dec_depth, ..."""
    return flags.add_model_args(parser)


def add_runtime_args(parser):
    group = parser.add_argument_group("runtime")
    group.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    flags.add_precision_arg(group)
    group.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--warmup", type=int, default=1, help="untimed runs before timing")
    group.add_argument("--repeats", type=int, default=3, help="timed runs of the fast path (median reported)")


def build_model(args, **overrides):
    """The model the flags describe (plus flag-named `overrides`), randomly initialised, in eval mode."""
    return build(config_from_flags({**flags.given_model_flags(args), **overrides})).eval()


def setup_runtime(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA device is visible; use --device cpu")
    args.precision = args.precision or default_precision(device)  # what main_mar.py and sample.py pick
    if args.precision == "fp16" and device.type == "cpu":
        raise ValueError("--precision fp16 is for CUDA; use fp32 or bf16 on CPU")
    torch.manual_seed(args.seed)
    return device


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_runs(fn, device, warmup, repeats):
    """Seconds per call of fn() over `repeats` timed calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def median(values):
    return statistics.median(values)


def machine_line(device):
    """Where the numbers come from: device, threads, and the load other users put on the machine."""
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    extras = ", ".join(f"{name} {optional_version(name)}" for name in ("flash-attn", "mamba-ssm"))
    return f"{where}; torch {torch.__version__} ({extras}); threads {torch.get_num_threads()}; load average {load}"


def optional_version(distribution):
    """The installed version of an optional kernel package, or "none" (the numbers depend on it)."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "none"


def parser(description):
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    return p


def write_json(path, results):
    if path:
        with open(path, "w") as f:
            json.dump(results, f, indent=1)


class PieceTimer:
    """Seconds spent inside wrapped callables (CUDA events on GPU, so no extra syncs in the loop)."""

    def __init__(self, device):
        self.device, self.marks = device, {}

    def split(self, backend):
        """Time a sampling backend's two pieces: every Step a family runs ("outer") and every head call
        ("head"); instance attributes shadow the methods the sampling loop looks up."""
        self.wrap(backend, "run", "outer")
        self.wrap(backend, "sample_head", "head")

    def wrap(self, owner, attr, name):
        fn = getattr(owner, attr)

        def timed(*args, **kwargs):
            start = self._mark()
            out = fn(*args, **kwargs)
            self.marks.setdefault(name, []).append((start, self._mark()))
            return out
        setattr(owner, attr, timed)

    def _mark(self):
        if self.device.type != "cuda":
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def reset(self):
        self.marks = {}

    def seconds(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return {k: sum(a.elapsed_time(b) for a, b in v) / 1000 for k, v in self.marks.items()}
        return {k: sum(b - a for a, b in v) for k, v in self.marks.items()}

    def summary(self):
        return "".join(f", {k} {v:.2f} s" for k, v in self.seconds().items())


def median_pieces(pieces):
    """{piece: median seconds} over timed runs' PieceTimer.seconds() (a piece absent from a run: 0 s there)."""
    return {k: median([p.get(k, 0.0) for p in pieces]) for k in dict.fromkeys(k for p in pieces for k in p)}
