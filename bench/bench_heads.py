"""The paper's speed table in one command: per-token heads on the same outer model, same device, same batch.

Times ARINAR's inner AR (64 outer steps, cfg 4.5), MAR's diffusion head (100 diffusion steps; 256
outer steps at cfg 2.9 as MAR evaluates, and 64 steps), and the whole-token mixture head (64 steps,
cfg 4.5), each through the engine's backend for this device (eager; CUDA graphs on CUDA, --compile
to add torch.compile), at every --batch_sizes, and prints images/s, each setting's model FLOPs per
image and the fraction of the GPU's dense peak (util/flops.py; counted once per setting on an eager
batch of --flops_batch), and each head's time relative to ARINAR's. Random weights (speed does not
depend on them). The paper (one A100, 100 images one by one): MAR-B 65.69 s / ARINAR-B 11.57 s = 5.7x.
The JSON's "ratios" ({batch: {setting: its seconds per image / ARINAR's}}) need the arinar setting in
--only; "settings" records every setting's steps and cfg, so that bench/gpu_summary.py can take ARINAR's
row from a bench_sampling run of the same model instead (bench/gpu_check.sh runs --only mar_64).

    python -m bench.bench_heads --device cuda --precision bf16 --batch_sizes 1 256     # ARINAR-B size
    python -m bench.bench_heads --width 128 --enc_dec_depth 2 --num_heads 4 --inner_ar_width 128 --diffloss_w 256 \\
        --batch_sizes 1 8 --threads 1                                                   # a CPU-sized run
"""
import logging

import torch

from bench.config import (add_model_args, add_runtime_args, build_model, machine_line, median, parser,
                          setup_runtime, time_runs, write_json)
from util import flags
from sampling import make_backend
from util import flops

log = logging.getLogger("bench.heads")
PAPER_RATIO = 65.69 / 11.57  # MAR-B / ARINAR-B seconds per image at batch 1 (ARINAR paper, A100)
# (name, head, outer steps, cfg): the paper's settings for each
SETTINGS = (("arinar", "arinar", 64, 4.5), ("mar_256", "diffloss", 256, 2.9), ("mar_64", "diffloss", 64, 2.9),
            ("gmm", "gmm", 64, 4.5))


def parse_args(argv=None):
    p = parser(__doc__.splitlines()[0])
    add_model_args(p)
    add_runtime_args(p)
    flags.add_sampling_args(p, cfg=4.5, sweep=False)  # --num_iter and --cfg are set per head below
    g = p.add_argument_group("heads")
    g.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 256])
    g.add_argument("--only", nargs="+", default=[s[0] for s in SETTINGS], choices=[s[0] for s in SETTINGS],
                   help="time these settings only")
    g.add_argument("--flops_batch", type=int, default=1,
                   help="count model FLOPs per image on an eager run of this batch (0 = do not count)")
    # MAR-B's diffusion MLP unless the model flags say otherwise
    p.set_defaults(repeats=2, diffloss_d=6, diffloss_w=1024)
    return p.parse_args(argv)


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    device = setup_runtime(args)
    head_args = {"arinar": {}, "gmm": {"head": "gmm"}, "diffloss": {"head": "diffloss"}}
    log.info("machine: %s", machine_line(device))
    peak = flops.peak_flops(device, args.precision)
    results = {"machine_before": machine_line(device), "args": vars(args), "peak_flops": peak, "rows": [],
               "settings": {name: {"head": head, "num_iter": num_iter, "cfg": cfg}  # every one, timed or not
                            for name, head, num_iter, cfg in SETTINGS}}
    models = {}
    for name, head, num_iter, cfg in (s for s in SETTINGS if s[0] in args.only):
        if head not in models:
            torch.manual_seed(args.seed)
            model = build_model(args, **head_args[head]).to(device)
            models[head] = (model, make_backend(model, cuda_graphs=args.cuda_graphs, compile=args.compile,
                                                cfg_sampler=args.cfg_sampler, precision=args.precision))
        model, backend = models[head]
        per_image = None
        if args.flops_batch:  # the same for every batch (each op works per image); graph replays are not seen
            eager = make_backend(model, cuda_graphs=False, cfg_sampler=args.cfg_sampler, precision=args.precision)
            some = torch.arange(args.flops_batch, device=device) % model.config.class_num
            counted, _ = flops.count_flops(model.sample_tokens, args.flops_batch, num_iter, cfg=cfg, labels=some,
                                           backend=eager)
            per_image = counted / args.flops_batch
        for batch in args.batch_sizes:
            labels = torch.randint(0, model.config.class_num, (batch,),
                                   generator=torch.Generator().manual_seed(args.seed))

            def run():
                model.sample_tokens(batch, num_iter, cfg=cfg, labels=labels, backend=backend)
            # warm-up: CUDA graphs capture each schedule step and row bucket on first use
            times = time_runs(run, device, args.warmup, args.repeats)
            row = {"setting": name, "head": head, "num_iter": num_iter, "cfg": cfg, "batch_size": batch,
                   "seconds": times, "images_per_s": batch / median(times), "flops_per_image": per_image,
                   "fraction_of_peak": None if per_image is None else flops.mfu(per_image * batch, median(times), peak)}
            results["rows"].append(row)
            log.info("%-8s batch %4d  %8.3f images/s  %8.3f s/image  %s/image  %s of peak  (runs: %s s)", name, batch,
                     row["images_per_s"], median(times) / batch, "?" if per_image is None else flops.human(per_image),
                     "n/a" if row["fraction_of_peak"] is None else f"{100 * row['fraction_of_peak']:.1f}%",
                     ", ".join(f"{t:.2f}" for t in times))
            write_json(args.json, results)  # so far: a later setting that times out leaves these behind
    results["ratios"] = ratios(results["rows"])
    for batch, row in results["ratios"].items():
        log.info("batch %d, seconds per image relative to ARINAR: %s", batch,
                 ", ".join(f"{k} {v:.2f}x" for k, v in row.items()))
    log.info("the paper's MAR-B / ARINAR-B at batch 1 (A100): %.1fx", PAPER_RATIO)
    results["machine_after"] = machine_line(device)
    write_json(args.json, results)
    return results


def ratios(rows):
    """{batch: {setting: its seconds per image / ARINAR's}} for batches where ARINAR was timed."""
    out = {}
    for batch in sorted({r["batch_size"] for r in rows}):
        at = {r["setting"]: r["images_per_s"] for r in rows if r["batch_size"] == batch}
        if "arinar" in at:
            out[batch] = {k: at["arinar"] / v for k, v in at.items() if k != "arinar"}
    return out


if __name__ == "__main__":
    main()
