"""Sampling speed: images/s of our engine against the ARINAR release's cost, in one run.

The baseline (bench/baseline.py) does per feature step what the public release does (KV cache
grown by concatenation, AdaLN modulations recomputed every feature, torch.distributions CFG
resampling, one outer step at a time with the full decoder), in the same process, on the same
weights. Our side runs the backend the flags pick (sampling/backends.py: eager, or CUDA graphs
with optional --compile). Weights are random (no downloads); speed does not depend on them.

CPU configuration (inner model at ARINAR-B size dominates):
    python -m bench.bench_sampling --width 128 --enc_dec_depth 2 --num_heads 4 --batch_size 8 --cfg 4.5 --num_iter 64 --threads 1
ARINAR-B on a GPU, bf16, CUDA graphs + compile:
    python -m bench.bench_sampling --device cuda --precision bf16 --compile --batch_size 256
"""
import logging
import time

import torch

from bench.baseline import release_sample_tokens
from bench.config import (add_model_args, add_runtime_args, autocast, build_model, machine_line, median,
                          parser, setup_runtime, time_runs, write_json)
from util import flags
from models.vae import LATENT_SCALE, AutoencoderKL
from sampling import make_backend

log = logging.getLogger("bench.sampling")


def parse_args(argv=None):
    p = parser(__doc__.splitlines()[0])
    add_model_args(p)
    add_runtime_args(p)
    flags.add_sampling_args(p, cfg=4.5, sweep=False)  # as main_mar.py and sample.py
    g = p.add_argument_group("benchmark")
    g.add_argument("--batch_size", type=int, default=8)
    g.add_argument("--breakdown", action="store_true", help="also report our outer/head time split")
    g.add_argument("--decode", action="store_true", help="include a (random-init) KL-16 VAE decode in the time")
    g.add_argument("--baseline_repeats", type=int, default=2, help="timed baseline runs (0 = skip the baseline)")
    return p.parse_args(argv)


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    device = setup_runtime(args)
    model = build_model(args).to(device)
    labels = torch.randint(0, model.config.class_num, (args.batch_size,), generator=torch.Generator().manual_seed(args.seed))
    vae = AutoencoderKL(embed_dim=model.config.tokens.vae_embed_dim).to(device).eval() if args.decode else None
    backend = make_backend(model, cuda_graphs=args.cuda_graphs, compile=args.compile, cfg_sampler=args.cfg_sampler,
                           precision=args.precision)
    split = PieceTimer(device)
    if args.breakdown:  # instance attributes shadow the methods the loop looks up
        split.wrap(backend, "run", "outer")
        split.wrap(backend, "sample_head", "head")

    def finish(latents):
        if vae is not None:
            with torch.no_grad():
                vae.decode(latents / LATENT_SCALE)

    def ours(num_iter=args.num_iter):  # the backend applies --precision
        finish(model.sample_tokens(args.batch_size, num_iter, cfg=args.cfg, labels=labels,
                                   temperature=args.temperature, backend=backend))

    def baseline(num_iter=args.num_iter):
        with autocast(device, args.precision):
            finish(release_sample_tokens(model, args.batch_size, num_iter, cfg=args.cfg, labels=labels,
                                         temperature=args.temperature))

    log.info("machine: %s", machine_line(device))
    log.info("config: %s", {k: v for k, v in vars(args).items() if k != "json"})
    results = {"machine_before": machine_line(device), "args": vars(args), "backend": backend.describe()}
    # warm-up: 2 outer steps (allocator, lazy initialisation), or full runs with CUDA graphs,
    # which capture per schedule step and row bucket on first use (and compile with --compile)
    warm_iter = args.num_iter if backend.name == "cuda_graphs" else min(2, args.num_iter)
    time_runs(lambda: ours(warm_iter), device, args.warmup, 0)
    if args.baseline_repeats:
        time_runs(lambda: baseline(min(2, args.num_iter)), device, args.warmup, 0)
    # timed runs alternate between the two, so load from other users hits both alike
    our_times, base_times = [], []
    for i in range(max(args.repeats, args.baseline_repeats)):
        if i < args.repeats:
            split.reset()
            our_times += time_runs(ours, device, 0, 1)
            log.info("run %d: ours %.2f s%s", i + 1, our_times[-1], split.summary())
        if i < args.baseline_repeats:
            base_times += time_runs(baseline, device, 0, 1)
            log.info("run %d: release baseline %.2f s", i + 1, base_times[-1])
    results["ours_s"] = our_times
    report(log, "ours", our_times, args.batch_size, args.num_iter)
    if base_times:
        results["baseline_s"] = base_times
        report(log, "baseline", base_times, args.batch_size, args.num_iter)
        ratio = median(base_times) / median(our_times)
        results["speedup"] = ratio
        log.info("speed-up over the release baseline (images/s ratio, medians): %.2fx", ratio)
    results["machine_after"] = machine_line(device)
    log.info("machine after: %s", results["machine_after"])
    write_json(args.json, results)
    return results


class PieceTimer:
    """Seconds spent inside wrapped callables (CUDA events on GPU, so no extra syncs in the loop)."""

    def __init__(self, device):
        self.device, self.marks = device, {}

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


def report(logger, name, times, batch_size, num_iter):
    seconds = median(times)
    logger.info("%-9s  %.4f images/s  %.3f s/image  %.3f s/step  (median of %d: %s s per batch)", name,
                batch_size / seconds, seconds / batch_size, seconds / num_iter, len(times),
                ", ".join(f"{t:.2f}" for t in times))


if __name__ == "__main__":
    main()
