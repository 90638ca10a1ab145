"""Sampling speed: images/s of MAR.sample_tokens (fast path) against the reference path.

The reference (bench/reference.py) runs the same algorithm the straightforward way in the same
process, on the same weights: prefix recomputation in the inner model, torch.distributions
mixtures, the release's 1000-candidate CFG resampling. Weights are random (no downloads); speed
does not depend on them.

CPU configuration of issue 5 (inner model dominates):
    python -m bench.bench_sampling --width 128 --depth 2 --heads 4 --batch_size 8 --cfg 4.5 --num_iter 64
Full ARINAR-B at batch 1:
    python -m bench.bench_sampling --batch_size 1 --cfg 4.5 --num_iter 64
"""
import logging
import time

import torch

from bench.config import (add_model_args, add_runtime_args, autocast, build_model, machine_line, median,
                          parser, setup_runtime, time_runs, write_json)
from bench.reference import reference_sample_tokens
from engine_mar import add_sampling_args, sampling_graphs
from models.gmm import CFG_SAMPLERS
from models.vae import LATENT_SCALE, AutoencoderKL

log = logging.getLogger("bench.sampling")


def parse_args(argv=None):
    p = parser(__doc__.splitlines()[0])
    add_model_args(p)
    add_runtime_args(p)
    g = p.add_argument_group("sampling")
    g.add_argument("--batch_size", type=int, default=8)
    g.add_argument("--num_iter", type=int, default=64)
    g.add_argument("--cfg", type=float, default=4.5)
    g.add_argument("--temperature", type=float, default=1.0)
    add_sampling_args(g)  # --cfg_sampler, --cuda_graphs, --compile, as main_mar.py and sample.py
    g.set_defaults(cuda_graphs=False)  # the benchmark times eager sampling unless asked
    g.add_argument("--breakdown", action="store_true", help="also report the fast path's outer/inner time split")
    g.add_argument("--decode", action="store_true", help="include a (random-init) KL-16 VAE decode in the time")
    g.add_argument("--ref_repeats", type=int, default=1, help="timed reference runs (0 = skip the reference)")
    return p.parse_args(argv)


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    device = setup_runtime(args)
    model = build_model(args).to(device)
    labels = torch.randint(0, args.class_num, (args.batch_size,), generator=torch.Generator().manual_seed(args.seed))
    vae = AutoencoderKL(embed_dim=model.vae_embed_dim).to(device).eval() if args.decode else None
    graphs = sampling_graphs(model, args)
    split = PieceTimer(device)
    if args.breakdown:  # instance attributes shadow the methods sample_tokens looks up
        owner = graphs if graphs is not None and graphs.applies_to(device) else None
        split.wrap(owner or model, "outer" if owner else "condition_at", "outer")
        split.wrap(owner or model.arhead, "inner" if owner else "sample", "inner")

    def finish(latents):
        if vae is not None:
            with torch.no_grad():
                vae.decode(latents / LATENT_SCALE)

    def fast(num_iter=args.num_iter):
        with autocast(device, args.precision):
            finish(model.sample_tokens(args.batch_size, num_iter, cfg=args.cfg, labels=labels,
                                       temperature=args.temperature, cfg_sampler=CFG_SAMPLERS[args.cfg_sampler],
                                       graphs=graphs))

    def reference(num_iter=args.num_iter):
        with autocast(device, args.precision):
            finish(reference_sample_tokens(model, args.batch_size, num_iter, cfg=args.cfg, labels=labels,
                                           temperature=args.temperature))

    log.info("machine: %s", machine_line(device))
    log.info("config: %s", {k: v for k, v in vars(args).items() if k != "json"})
    results = {"machine_before": machine_line(device), "args": vars(args)}
    # warm-up runs are 2 outer steps (allocator, lazy initialisation), or full runs with CUDA
    # graphs or --compile, which capture per row bucket or compile per shape family on first use
    warm_iter = args.num_iter if args.cuda_graphs or args.compile else min(2, args.num_iter)
    time_runs(lambda: fast(warm_iter), device, args.warmup, 0)
    if args.ref_repeats:
        time_runs(lambda: reference(min(2, args.num_iter)), device, args.warmup, 0)
    # timed runs alternate between the paths, so load from other users hits both alike
    fast_times, ref_times = [], []
    for i in range(max(args.repeats, args.ref_repeats)):
        if i < args.repeats:
            split.reset()
            fast_times += time_runs(fast, device, 0, 1)
            log.info("run %d: fast %.2f s%s", i + 1, fast_times[-1], split.summary())
        if i < args.ref_repeats:
            ref_times += time_runs(reference, device, 0, 1)
            log.info("run %d: reference %.2f s", i + 1, ref_times[-1])
    results["fast_s"] = fast_times
    report(log, "fast", fast_times, args.batch_size, args.num_iter)
    if ref_times:
        results["reference_s"] = ref_times
        report(log, "reference", ref_times, args.batch_size, args.num_iter)
        ratio = median(ref_times) / median(fast_times)
        results["speedup"] = ratio
        log.info("speed-up (fast images/s / reference images/s, medians): %.2fx", ratio)
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
