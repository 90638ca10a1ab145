"""Sampling speed: images/s of our engine against the ARINAR release's cost, in one run.

The baseline (bench/baseline.py) does per feature step what the public release does (KV cache
grown by concatenation, AdaLN modulations recomputed every feature, torch.distributions CFG
resampling, one outer step at a time with the full decoder), in the same process, on the same
weights. Our side runs the backend the flags pick (sampling/backends.py: eager, or CUDA graphs
with optional --compile), or each of --backends. Weights are random (no downloads); speed does not
depend on them. Beside images/s: each side's model FLOPs per image (util/flops.py, counted once on
a small eager batch) and the fraction of the GPU's dense peak they reach (none on CPU).

peak_memory_mib (CUDA only; None on CPU, where counting every storage would slow the runs a lot): per
side, the most bytes allocated above what was allocated before the call (bench/memory.py: peak_memory),
the maximum over its first call(s) (the capture, for CUDA graphs; torch.compile's compilation with
--compile) and its timed runs; the same over the baseline's warm-up and timed runs. Weights and what
earlier calls keep (KV caches, the graphs' pools) are not in it; a first call's peak includes what it
makes and keeps, such as a graph pool, whose replays then reuse it.

CPU configuration (inner model at ARINAR-B size dominates):
    python -m bench.bench_sampling --width 128 --enc_dec_depth 2 --num_heads 4 --batch_size 8 --cfg 4.5 \
        --num_iter 64 --threads 1
ARINAR-B on a GPU, bf16, CUDA graphs + compile:
    python -m bench.bench_sampling --device cuda --precision bf16 --compile --batch_size 256
"""
import logging
import time

import torch

from bench.baseline import release_sample_tokens
from bench.config import (PieceTimer, add_model_args, add_runtime_args, build_model, machine_line,
                          median, median_pieces, parser, setup_runtime, synchronize, time_runs, write_json)
from bench.memory import peak_memory
from util import flags
from models.vae import LATENT_SCALE, AutoencoderKL
from sampling import make_backend, precision_autocast
from util import flops

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
    g.add_argument("--backends", nargs="+", choices=["eager", "cuda_graphs", "cuda_graphs+compile"],
                   help="time these backends side by side (default: the one --cuda_graphs/--compile pick)")
    g.add_argument("--flops_batch", type=int, default=2,
                   help="count model FLOPs per image on an eager run of this batch (0 = do not count)")
    return p.parse_args(argv)


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    device = setup_runtime(args)
    model = build_model(args).to(device)
    labels = torch.randint(0, model.config.class_num, (args.batch_size,),
                           generator=torch.Generator().manual_seed(args.seed))
    vae = AutoencoderKL(embed_dim=model.config.tokens.vae_embed_dim).to(device).eval() if args.decode else None
    sides = [Side(name, make_backend(model, cuda_graphs=graphs, compile=compiled, cfg_sampler=args.cfg_sampler,
                                     precision=args.precision), device, args.breakdown)
             for name, graphs, compiled in backend_choices(args)]

    def finish(latents):
        if vae is not None:
            with torch.no_grad():
                vae.decode(latents / LATENT_SCALE)

    def ours(backend, num_iter=args.num_iter, bsz=args.batch_size):  # the backend applies --precision
        finish(model.sample_tokens(bsz, num_iter, cfg=args.cfg, labels=labels[:bsz], temperature=args.temperature,
                                   backend=backend))

    def baseline(num_iter=args.num_iter, bsz=args.batch_size):
        with precision_autocast(device, args.precision):
            finish(release_sample_tokens(model, bsz, num_iter, cfg=args.cfg, labels=labels[:bsz],
                                         temperature=args.temperature))

    log.info("machine: %s", machine_line(device))
    log.info("config: %s", {k: v for k, v in vars(args).items() if k != "json"})
    results = {"machine_before": machine_line(device), "args": vars(args), "backend": sides[0].backend.describe(),
               "peak_flops": flops.peak_flops(device, args.precision), "flops_per_image": {}, "first_call_s": {}}
    if args.flops_batch:
        # FLOPs per image do not depend on the batch (every op works per image): count a small eager
        # batch, as replayed CUDA graphs are invisible to the counter
        bsz = min(args.flops_batch, args.batch_size)
        eager = make_backend(model, cuda_graphs=False, cfg_sampler=args.cfg_sampler, precision=args.precision)
        results["flops_per_image"]["ours"] = flops.count_flops(lambda: ours(eager, bsz=bsz))[0] / bsz
        if args.baseline_repeats:
            results["flops_per_image"]["baseline"] = flops.count_flops(lambda: baseline(bsz=bsz))[0] / bsz
        log.info("model FLOPs per image: %s", ", ".join(f"{k} {flops.human(v)}"
                                                        for k, v in results["flops_per_image"].items()))
    # warm-up: 2 outer steps (allocator, lazy initialisation), or full runs with CUDA graphs,
    # which capture per schedule step and row bucket on first use (and compile with --compile)
    for side in sides:
        warm_iter = args.num_iter if side.backend.name == "cuda_graphs" else min(2, args.num_iter)
        results["first_call_s"][side.name] = sum(side.call(lambda: ours(side.backend, warm_iter))
                                                 for _ in range(args.warmup))
        log.info("%s: first %d call(s) of %d steps took %.1f s", side.name, args.warmup, warm_iter,
                 results["first_call_s"][side.name])
        write_json(args.json, results)  # so far: a later side that times out leaves these behind
    base = Side("baseline", None, device, False)
    if args.baseline_repeats:
        for _ in range(args.warmup):
            base.call(lambda: baseline(min(2, args.num_iter)))
    # timed runs alternate between the sides, so load from other users hits all alike
    for i in range(max(args.repeats, args.baseline_repeats)):
        for side in sides if i < args.repeats else ():
            side.timer.reset()
            side.run(lambda: ours(side.backend))
            side.pieces.append(side.timer.seconds())
            log.info("run %d: %s %.2f s%s", i + 1, side.name, side.times[-1], side.timer.summary())
        if i < args.baseline_repeats:
            base.run(baseline)
            log.info("run %d: release baseline %.2f s", i + 1, base.times[-1])
        record(results, sides, base, args)
        write_json(args.json, results)
    for side in sides:
        report(log, side.name, side.times, args.batch_size, args.num_iter, results["sides"][side.name])
    if base.times:
        report(log, "baseline", base.times, args.batch_size, args.num_iter, results["sides"]["baseline"])
        for side in sides:
            log.info("speed-up of %s over the release baseline (images/s ratio, medians): %.2fx", side.name,
                     results["sides"][side.name]["speedup"])
    results["machine_after"] = machine_line(device)
    log.info("machine after: %s", results["machine_after"])
    write_json(args.json, results)
    return results


def backend_choices(args):
    """(name, cuda_graphs, compile) per side: --backends, else the one the sampling flags pick."""
    if not args.backends:
        graphs = args.cuda_graphs if args.cuda_graphs is not None else args.device.startswith("cuda")
        return [("cuda_graphs+compile" if args.compile else "cuda_graphs" if graphs else "eager",
                 args.cuda_graphs, args.compile)]
    flags = {"eager": (False, False), "cuda_graphs": (True, False), "cuda_graphs+compile": (True, True)}
    return [(name, *flags[name]) for name in dict.fromkeys(args.backends)]  # each once


class Side:
    """One timed contender: its backend (None for the baseline), times and peak memory (peak_mib: the most
    MiB allocated above what was allocated before a call, over every call; measured when `memory`, by
    default on CUDA only)."""

    def __init__(self, name, backend, device, breakdown, memory=None):
        self.name, self.backend, self.device, self.times, self.peak_mib = name, backend, device, [], None
        self.pieces = []  # per timed run with --breakdown: {"outer": s, "head": s}
        self.memory = device.type == "cuda" if memory is None else memory
        self.timer = PieceTimer(device)
        if breakdown:
            self.timer.split(backend)

    def call(self, fn):
        """Seconds of one call of fn(), whose peak memory above what was allocated before it joins peak_mib."""
        if not self.memory:
            return time_runs(fn, self.device, 0, 1)[0]
        synchronize(self.device)
        start = time.perf_counter()
        peak, _ = peak_memory(fn, self.device)  # synchronizes after the call
        seconds = time.perf_counter() - start
        self.peak_mib = max(self.peak_mib or 0.0, peak / 2 ** 20)
        return seconds

    def run(self, fn):
        """A timed run."""
        self.times.append(self.call(fn))


def record(results, sides, base, args):
    """Each side's times, images/s, fraction of the GPU's peak, peak memory and speed-up over the baseline."""
    peak, counted = results["peak_flops"], results["flops_per_image"]
    out = {}
    for side, key in [(s, "ours") for s in sides] + [(base, "baseline")]:
        if not side.times:
            continue
        images_per_s = args.batch_size / median(side.times)
        per_image = counted.get(key)
        out[side.name] = {"seconds": side.times, "images_per_s": images_per_s, "flops_per_image": per_image,
                          "fraction_of_peak": None if per_image is None else flops.mfu(per_image * images_per_s, 1.0,
                                                                                        peak),
                          "peak_memory_mib": side.peak_mib}
        if base.times and side is not base:
            out[side.name]["speedup"] = median(base.times) / median(side.times)
        if any(side.pieces):  # --breakdown
            out[side.name]["breakdown_s"] = median_pieces(side.pieces)
    results["sides"] = out
    if sides[0].times:  # the first side under the keys older results use
        results["ours_s"] = sides[0].times
    if base.times:
        results["baseline_s"] = base.times
        if sides[0].times:
            results["speedup"] = median(base.times) / median(sides[0].times)


def report(logger, name, times, batch_size, num_iter, row):
    seconds = median(times)
    per_image = "" if row["flops_per_image"] is None else f"  {flops.human(row['flops_per_image'])}/image"
    peak = "" if row["fraction_of_peak"] is None else f"  {100 * row['fraction_of_peak']:.1f}% of peak"
    logger.info("%-19s  %.4f images/s%s%s  %.3f s/image  %.3f s/step  (median of %d: %s s per batch)", name,
                batch_size / seconds, per_image, peak, seconds / batch_size, seconds / num_iter, len(times),
                ", ".join(f"{t:.2f}" for t in times))


if __name__ == "__main__":
    main()
