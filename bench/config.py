"""What the benchmarks share: the model/runtime flags, the model they describe, timing, JSON output."""
import argparse
import contextlib
import json
import os
import platform
import statistics
import time

import torch

from models.mar import MAR, MODELS

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def add_model_args(parser):
    group = parser.add_argument_group("model")
    group.add_argument("--model", default="mar_base", choices=sorted(MODELS))
    group.add_argument("--width", type=int, default=None, help="outer encoder/decoder width (default: the model's)")
    group.add_argument("--depth", type=int, default=None, help="outer blocks per side (default: the model's)")
    group.add_argument("--heads", type=int, default=None, help="outer heads (default: the model's; needed with --width)")
    group.add_argument("--inner_width", type=int, default=768)
    group.add_argument("--inner_depth", type=int, default=1)
    group.add_argument("--inner_heads", type=int, default=4)
    group.add_argument("--num_gaussians", type=int, default=4)
    group.add_argument("--img_size", type=int, default=256)
    group.add_argument("--class_num", type=int, default=1000)


def add_runtime_args(parser):
    group = parser.add_argument_group("runtime")
    group.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    group.add_argument("--precision", default="fp32", choices=sorted(PRECISIONS),
                       help="autocast dtype of the transformers (mixture math stays fp32)")
    group.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--warmup", type=int, default=1, help="untimed runs before timing")
    group.add_argument("--repeats", type=int, default=3, help="timed runs of the fast path (median reported)")


def factory_defaults(name):
    """(width, heads, depth) of a named model, read off a weightless (meta-device) instance."""
    with torch.device("meta"):
        model = MODELS[name]()
    block = model.encoder_blocks[0]
    return block.norm1.normalized_shape[0], block.attn.num_heads, len(model.encoder_blocks)


def build_model(args, **head):
    """The MAR the flags describe, randomly initialised (benchmarks need no weights), in eval mode.
    head: MAR's head arguments (head="diffloss", diffloss_d=..., ...); ARINAR's inner AR by default."""
    width, heads, depth = factory_defaults(args.model)
    if args.width is not None and args.heads is None and args.width % heads:
        raise ValueError(f"--width {args.width} is not divisible by {args.model}'s {heads} heads; pass --heads")
    width = args.width or width
    heads = args.heads or heads
    depth = args.depth or depth
    return MAR(img_size=args.img_size, encoder_embed_dim=width, encoder_depth=depth, encoder_num_heads=heads,
               decoder_embed_dim=width, decoder_depth=depth, decoder_num_heads=heads, mlp_ratio=4,
               class_num=args.class_num, num_gaussians=args.num_gaussians, inner_ar_width=args.inner_width,
               inner_ar_depth=args.inner_depth, inner_ar_heads=args.inner_heads, **head).eval()


def setup_runtime(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA device is visible; use --device cpu")
    if args.precision == "fp16" and device.type == "cpu":
        raise ValueError("--precision fp16 is for CUDA; use fp32 or bf16 on CPU")
    torch.manual_seed(args.seed)
    return device


def autocast(device, precision):
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


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
    return f"{where}; torch {torch.__version__}; threads {torch.get_num_threads()}; load average {load}"


def parser(description):
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    return p


def write_json(path, results):
    if path:
        with open(path, "w") as f:
            json.dump(results, f, indent=1)
