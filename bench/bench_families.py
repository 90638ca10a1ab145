"""Outer families side by side: MAR's bidirectional outer against another family, same head, one run.

The reference is the MAR family with the same per-token head through our own engine (the same
backend: eager, CUDA graphs, optionally torch.compile): for the question "which outer family", that is
the fair baseline, MAR doing what our release path does at its cost; the release's own, slower
sampler is bench_sampling's baseline. Both sides sample the same batch of labels with the same
steps, guidance and temperature; their timed runs alternate so that load from other users hits both
alike. Per side and batch: images/s, model FLOPs per image (util/flops.py, counted once on an eager
batch of --flops_batch), the fraction of the GPU's dense peak, and peak memory (bench/memory.py: the
most bytes the sampler allocates above what was allocated before, taken on each side's first call at
that batch, which also makes the KV caches and CUDA graphs). Ratios are the family's over MAR's.
Random weights: speed does not depend on them.

    python -m bench.bench_families --family causal --device cuda --precision bf16      # ARINAR-B size, b1 and b256
    python -m bench.bench_families --family causal --model causal_tiny --reference_model mar_tiny \\
        --batch_sizes 1 16 --threads 1 --json bench/results/families_cpu.json           # the demo size on a CPU
"""
import logging
import math

import torch

from bench.config import add_runtime_args, machine_line, median, parser, setup_runtime, time_runs, write_json
from bench.memory import peak_memory
from models import FAMILIES, PRESETS, build, config_from_flags
from models.config import check_flags_apply
from sampling import make_backend
from util import flags, flops

log = logging.getLogger("bench.families")
REFERENCE_FAMILY = "mar"


def parse_args(argv=None):
    p = parser(__doc__.splitlines()[0])
    flags.add_model_args(p)  # --family / --model: the contender; the other model flags apply to both sides
    add_runtime_args(p)
    flags.add_sampling_args(p, cfg=4.5, sweep=False)
    g = p.add_argument_group("families")
    g.add_argument("--reference_model", default=FAMILIES[REFERENCE_FAMILY].default,
                   help=f"the {REFERENCE_FAMILY} family's preset to compare with (the same outer size)")
    g.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 256])
    g.add_argument("--flops_batch", type=int, default=1,
                   help="count model FLOPs per image on an eager run of this batch (0 = do not count)")
    p.set_defaults(repeats=2)
    return p.parse_args(argv)


def side_configs(args):
    """(reference config, contender config) from the flags: --family/--model pick the contender (--family
    alone: its preset nearest in outer parameters to the reference, ARINAR-B's by default), --reference_model
    the MAR side; every other model flag goes to both and must be a setting of at least one."""
    given = flags.given_model_flags(args)
    family = given.pop("family", None)
    model = given.pop("model", None)
    if model is None and family is None:
        raise ValueError("name the family to compare with --family (or a preset with --model)")
    if model is None:
        model = nearest_preset(family, args.reference_model)
    if family is not None and PRESETS[model][0] != family:
        raise ValueError(f"--model {model} is a {PRESETS[model][0]} model, not --family {family}")
    if PRESETS[args.reference_model][0] != REFERENCE_FAMILY:
        raise ValueError(f"--reference_model {args.reference_model} is not a {REFERENCE_FAMILY} model")
    configs = tuple(config_from_flags({**given, "model": name}) for name in (args.reference_model, model))
    for name, value in given.items():
        if not any(applies(config, name, value) for config in configs):
            raise ValueError(f"--{name} is a setting of neither {args.reference_model} nor {model}")
    return configs


def outer_parameters(model):
    """Parameters of everything but the per-token head."""
    return sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in model.head.parameters())


def nearest_preset(family, reference):
    """The family's preset whose outer model is nearest in parameters to the reference preset's, both as
    the presets define them (other flags then apply to both sides alike; counted on the meta device:
    nothing is allocated); ties go to the family's default."""
    def size(name):
        with torch.device("meta"):
            return outer_parameters(build(config_from_flags({"model": name})))

    target = size(reference)
    names = sorted((name for name, (owner, _) in PRESETS.items() if owner == family),
                   key=lambda name: name != FAMILIES[family].default)
    return min(names, key=lambda name: abs(math.log(size(name) / target)))


def applies(config, name, value):
    try:
        check_flags_apply(config, {name: value})
        return True
    except ValueError:
        return False


class Side:
    """One family's model, backend and results."""

    def __init__(self, config, args, device):
        torch.manual_seed(args.seed)
        self.model = build(config).to(device).eval()
        self.name, self.preset = config.family, config.model
        self.backend = make_backend(self.model, cuda_graphs=args.cuda_graphs, compile=args.compile,
                                    cfg_sampler=args.cfg_sampler, precision=args.precision)
        self.params = sum(p.numel() for p in self.model.parameters())
        self.outer_params = outer_parameters(self.model)
        self.flops_per_image, self.rows = None, {}

    def sample(self, labels, args, backend=None):
        return self.model.sample_tokens(labels.numel(), args.num_iter, cfg=args.cfg, cfg_schedule=args.cfg_schedule,
                                        labels=labels, temperature=args.temperature, backend=backend or self.backend)

    def describe(self):
        return {"family": self.name, "model": self.preset, "head": self.model.head_name, "params": self.params,
                "outer_params": self.outer_params, "backend": self.backend.describe(),
                "flops_per_image": self.flops_per_image}


def count_flops_per_image(side, args, device):
    """FLOPs per image of an eager run (replayed CUDA graphs are invisible to the counter; the count
    does not depend on the batch: every op works per image)."""
    eager = make_backend(side.model, cuda_graphs=False, cfg_sampler=args.cfg_sampler, precision=args.precision)
    labels = torch.arange(args.flops_batch, device=device) % side.model.config.class_num
    return flops.count_flops(side.sample, labels, args, eager)[0] / args.flops_batch


def run_batch(sides, batch, args, device, peak):
    """Each side's first call (memory, warm-up), then --repeats timed calls alternating between the sides."""
    labels = torch.randint(0, sides[0].model.config.class_num, (batch,),
                           generator=torch.Generator().manual_seed(args.seed)).to(device)
    for side in sides:
        torch.manual_seed(args.seed)
        memory, _ = peak_memory(side.sample, device, labels, args)
        side.rows[batch] = {"batch_size": batch, "peak_memory_mib": memory / 2 ** 20, "seconds": []}
        for _ in range(args.warmup - 1):
            side.sample(labels, args)
    for _ in range(args.repeats):
        for side in sides:
            side.rows[batch]["seconds"] += time_runs(lambda: side.sample(labels, args), device, 0, 1)
    for side in sides:
        row = side.rows[batch]
        row["images_per_s"] = batch / median(row["seconds"])
        row["s_per_image"] = 1 / row["images_per_s"]
        row["flops_per_image"] = side.flops_per_image
        row["fraction_of_peak"] = None if side.flops_per_image is None else flops.mfu(
            side.flops_per_image * row["images_per_s"], 1.0, peak)


def ratios(reference, contender, batch):
    """The contender's images/s, FLOPs per image and peak memory over the reference's at one batch size."""
    ref, new = reference.rows[batch], contender.rows[batch]
    out = {"images_per_s": new["images_per_s"] / ref["images_per_s"],
           "peak_memory": new["peak_memory_mib"] / ref["peak_memory_mib"] if ref["peak_memory_mib"] else None}
    if reference.flops_per_image and contender.flops_per_image is not None:
        out["flops_per_image"] = contender.flops_per_image / reference.flops_per_image
    return out


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    device = setup_runtime(args)
    args.repeats, args.warmup = max(1, args.repeats), max(1, args.warmup)  # the first call is the memory run
    reference, contender = sides = [Side(config, args, device) for config in side_configs(args)]
    peak = flops.peak_flops(device, args.precision)
    results = {"machine_before": machine_line(device), "args": vars(args), "peak_flops": peak}
    log.info("machine: %s", results["machine_before"])
    for side in sides:
        log.info("%s: %s, %.2fM parameters (outer %.2fM, head %s), backend %s", side.name, side.preset,
                 side.params / 1e6, side.outer_params / 1e6, side.model.head_name, side.backend.describe())
    log.info("outer parameters %s / %s: %.3f", contender.name, reference.name, contender.outer_params /
             reference.outer_params)
    if args.flops_batch:
        for side in sides:
            side.flops_per_image = count_flops_per_image(side, args, device)
        log.info("model FLOPs per image: %s", ", ".join(f"{s.name} {flops.human(s.flops_per_image)}" for s in sides))
    results["ratios"] = {}
    for batch in args.batch_sizes:
        run_batch(sides, batch, args, device, peak)
        results["ratios"][batch] = ratios(reference, contender, batch)
        results["sides"] = [dict(side.describe(), rows=list(side.rows.values())) for side in sides]
        write_json(args.json, results)  # so far: a later batch that times out leaves these behind
        for side in sides:
            report(side, batch)
        r = results["ratios"][batch]
        log.info("batch %d, %s / %s: %.2fx images/s, %s FLOPs per image, %s peak memory", batch, contender.name,
                 reference.name, r["images_per_s"], fmt_ratio(r.get("flops_per_image")), fmt_ratio(r["peak_memory"]))
    results["machine_after"] = machine_line(device)
    write_json(args.json, results)
    return results


def fmt_ratio(value):
    return "?" if value is None else f"{value:.3g}x"


def report(side, batch):
    row = side.rows[batch]
    per_image = "?" if row["flops_per_image"] is None else flops.human(row["flops_per_image"])
    share = "" if row["fraction_of_peak"] is None else f"  {100 * row['fraction_of_peak']:.1f}% of peak"
    log.info("batch %4d  %-7s %-12s %9.3f images/s  %8.4f s/image  %s/image%s  peak %.1f MiB  (runs: %s s)", batch,
             side.name, side.preset, row["images_per_s"], row["s_per_image"], per_image, share, row["peak_memory_mib"],
             ", ".join(f"{t:.2f}" for t in row["seconds"]))


if __name__ == "__main__":
    main()
