"""Outer families side by side: MAR's bidirectional outer against other families, same head, one run.

The reference is the MAR family with the same per-token head through our own engine (the same
backend: eager, CUDA graphs, optionally torch.compile): for the question "which outer family", that is
the fair baseline, MAR doing what our release path does at its cost; the release's own, slower
sampler is bench_sampling's baseline. The contenders are one (--family / --model) or several
(--contenders): the reference is measured once, in the same process. Every side samples the same batch
of labels with the same steps, guidance and temperature (a scale-wise model takes one step per scale:
its "steps" in the JSON); their timed runs alternate so that load from other users hits all alike.
Per side and batch: images/s, model FLOPs per image (util/flops.py, counted once on an eager batch of
--flops_batch), the fraction of the GPU's dense peak, and peak memory (bench/memory.py: the most bytes
the sampler allocates above what was allocated before, taken on each side's first call at that batch,
which also makes the KV caches and CUDA graphs); with --breakdown, each timed call's split between the
outer Steps and the head (bench/config.py: PieceTimer). Ratios are each contender's over MAR's. A side that
raises (CUDA out of memory, say) while it is built or at one batch is logged in one line and recorded
as {"error": ...} there; the others go on. Random weights: speed does not depend on them.

    python -m bench.bench_families --family causal --device cuda --precision bf16      # ARINAR-B size, b1 and b256
    python -m bench.bench_families --contenders causal scalewise mvar_base --device cuda --precision bf16
    python -m bench.bench_families --family causal --model causal_tiny --reference_model mar_tiny \\
        --batch_sizes 1 16 --threads 1 --json bench/results/families_cpu.json           # the demo size on a CPU
"""
import gc
import logging
import math

import torch

from bench.config import (PieceTimer, add_runtime_args, machine_line, median, median_pieces, parser, setup_runtime,
                          time_runs, write_json)
from bench.memory import peak_memory
from models import FAMILIES, PRESETS, build, config_from_flags
from models.config import check_flags_apply
from sampling import make_backend
from util import flags, flops

log = logging.getLogger("bench.families")
REFERENCE_FAMILY = "mar"
MAX_ERROR_CHARS = 300


def parse_args(argv=None):
    p = parser(__doc__.splitlines()[0])
    flags.add_model_args(p)  # --family / --model: the contender; the other model flags apply to every side
    add_runtime_args(p)
    flags.add_sampling_args(p, cfg=4.5, sweep=False)
    g = p.add_argument_group("families")
    g.add_argument("--reference_model", default=FAMILIES[REFERENCE_FAMILY].default,
                   help=f"the {REFERENCE_FAMILY} family's preset to compare with (the same outer size)")
    g.add_argument("--contenders", nargs="+", metavar="NAME",
                   help="several contenders in one run, each a family (its preset nearest to --reference_model "
                        "in outer parameters) or a preset of models.PRESETS; instead of --family / --model")
    g.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 256])
    g.add_argument("--flops_batch", type=int, default=1,
                   help="count model FLOPs per image on an eager run of this batch (0 = do not count)")
    g.add_argument("--breakdown", action="store_true",
                   help="also split each timed call between the outer Steps and the head (breakdown_s)")
    p.set_defaults(repeats=2)
    return p.parse_args(argv)


def side_configs(args):
    """[reference config, contender configs...] from the flags: --contenders, or --family/--model, pick the
    contenders (a family alone: its preset nearest in outer parameters to the reference, ARINAR-B's by
    default), --reference_model the MAR side; every other model flag goes to every side and must be a
    setting of at least one."""
    given = flags.given_model_flags(args)
    family = given.pop("family", None)
    model = given.pop("model", None)
    if args.reference_model not in PRESETS or PRESETS[args.reference_model][0] != REFERENCE_FAMILY:
        raise ValueError(f"--reference_model {args.reference_model} is not a {REFERENCE_FAMILY} model")
    if args.contenders:
        if family is not None or model is not None:
            raise ValueError("--contenders names every contender: leave out --family and --model")
        names = [contender_preset(name, args.reference_model) for name in args.contenders]
    else:
        if model is None and family is None:
            raise ValueError("name the family to compare with --family (or a preset with --model, or several "
                             "with --contenders)")
        if model is None:
            model = nearest_preset(family, args.reference_model)
        if family is not None and PRESETS[model][0] != family:
            raise ValueError(f"--model {model} is a {PRESETS[model][0]} model, not --family {family}")
        names = [model]
    names = list(dict.fromkeys(names))  # each once
    if args.reference_model in names:
        raise ValueError(f"{args.reference_model} is the reference (--reference_model), not a contender")
    names = [args.reference_model] + names
    configs = [config_from_flags({**given, "model": name}) for name in names]
    for name, value in given.items():
        if not any(applies(config, name, value) for config in configs):
            raise ValueError(f"--{name} is a setting of none of {', '.join(names)}")
    return configs


def contender_preset(name, reference):
    """A --contenders NAME: a family (its preset nearest to the reference) or a preset."""
    if name in PRESETS:
        return name
    if name in FAMILIES:
        return nearest_preset(name, reference)
    raise ValueError(f"--contenders {name}: neither a family ({', '.join(FAMILIES)}) nor a preset "
                     f"({', '.join(PRESETS)})")


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
    """One family's model, backend and results; `error` is set when building it (then model is None) or
    counting its FLOPs failed."""

    def __init__(self, config):
        self.config, self.name, self.preset = config, config.family, config.model
        self.model = self.backend = self.error = self.timer = None
        self.flops_per_image, self.rows = None, {}

    def build(self, args, device):
        torch.manual_seed(args.seed)
        model = build(self.config).to(device).eval()  # kept only once all went well (a failure frees it)
        backend = make_backend(model, cuda_graphs=args.cuda_graphs, compile=args.compile,
                               cfg_sampler=args.cfg_sampler, precision=args.precision)
        self.model, self.backend = model, backend
        if args.breakdown:
            self.timer = PieceTimer(device)
            self.timer.split(backend)
        self.params = sum(p.numel() for p in model.parameters())
        self.outer_params = outer_parameters(model)
        scales = getattr(model, "scales", None)  # a scale-wise model: one step per scale, num_iter ignored
        self.steps = len(scales) if scales else args.num_iter

    def sample(self, labels, args, backend=None):
        return self.model.sample_tokens(labels.numel(), args.num_iter, cfg=args.cfg, cfg_schedule=args.cfg_schedule,
                                        labels=labels, temperature=args.temperature, backend=backend or self.backend)

    def describe(self):
        if self.model is None:
            return {"family": self.name, "model": self.preset, "error": self.error, "rows": []}
        return {"family": self.name, "model": self.preset, "head": self.model.head_name, "params": self.params,
                "outer_params": self.outer_params, "backend": self.backend.describe(), "steps": self.steps,
                "flops_per_image": self.flops_per_image, "rows": list(self.rows.values()),
                **({"error": self.error} if self.error else {})}


def attempt_to(side, what, fn):
    """fn() -> (True, None); an exception -> logged in one line, (False, its one-line message). After a CUDA
    out-of-memory error the cache is emptied (once the failed call's frames are gone) for the next side."""
    try:
        fn()
        return True, None
    except Exception as error:  # noqa: BLE001 - one side's failure must not stop the others
        message = one_line(error)
        out_of_memory = isinstance(error, torch.cuda.OutOfMemoryError)
    log.warning("%s (%s) failed %s: %s", side.name, side.preset, what, message)
    if out_of_memory:
        gc.collect()
        torch.cuda.empty_cache()
    return False, message


def one_line(error):
    text = " ".join(str(error).split())
    text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text if len(text) <= MAX_ERROR_CHARS else text[:MAX_ERROR_CHARS - 3] + "..."


def count_flops_per_image(side, args, device):
    """FLOPs per image of an eager run (replayed CUDA graphs are invisible to the counter; the count
    does not depend on the batch: every op works per image)."""
    eager = make_backend(side.model, cuda_graphs=False, cfg_sampler=args.cfg_sampler, precision=args.precision)
    labels = torch.arange(args.flops_batch, device=device) % side.model.config.class_num
    return flops.count_flops(side.sample, labels, args, eager)[0] / args.flops_batch


def run_batch(sides, batch, args, device, peak, save=lambda: None):
    """Each side's first call (memory, warm-up), then --repeats timed calls alternating among the sides;
    save() after each side's call (a part killed midway keeps what was measured). A side that raises at
    this batch gets {"batch_size", "error"} as its row and sits out the rest of it."""
    labels = torch.randint(0, sides[0].config.class_num, (batch,),
                           generator=torch.Generator().manual_seed(args.seed)).to(device)
    live = []
    for side in sides:
        if side.model is None:
            continue

        def first():
            torch.manual_seed(args.seed)
            memory, _ = peak_memory(side.sample, device, labels, args)
            side.rows[batch] = {"batch_size": batch, "peak_memory_mib": memory / 2 ** 20, "seconds": []}
            for _ in range(args.warmup - 1):
                side.sample(labels, args)
        if attempt(side, batch, first):
            live.append(side)
        save()
    for _ in range(args.repeats):
        for side in list(live):
            if side.timer:
                side.timer.reset()
            if attempt(side, batch, lambda: side.rows[batch]["seconds"].extend(
                    time_runs(lambda: side.sample(labels, args), device, 0, 1))):
                if side.timer:
                    side.rows[batch].setdefault("pieces", []).append(side.timer.seconds())
                finish_row(side.rows[batch], side.flops_per_image, peak)
            else:
                live.remove(side)
            save()


def attempt(side, batch, fn):
    """fn() -> True; an exception -> side's row at this batch is {"batch_size", "error"}, False (attempt_to)."""
    ok, error = attempt_to(side, f"at batch {batch}", fn)
    if not ok:
        side.rows[batch] = {"batch_size": batch, "error": error}
    return ok


def finish_row(row, flops_per_image, peak):
    row["images_per_s"] = row["batch_size"] / median(row["seconds"])
    row["s_per_image"] = 1 / row["images_per_s"]
    row["flops_per_image"] = flops_per_image
    row["fraction_of_peak"] = None if flops_per_image is None else flops.mfu(
        flops_per_image * row["images_per_s"], 1.0, peak)
    if row.get("pieces"):  # --breakdown
        row["breakdown_s"] = median_pieces(row["pieces"])


def ratios(reference, contender, batch):
    """The contender's images/s, FLOPs per image and peak memory over the reference's at one batch size;
    {"error": ...} when either side failed there."""
    ref, new = reference.rows.get(batch, {}), contender.rows.get(batch, {})
    if "error" in new or "error" in ref or not ref or not new:
        return {"error": new.get("error") or f"the reference {reference.preset} failed: "
                         f"{ref.get('error') or reference.error}"}
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
    sides = [Side(config) for config in side_configs(args)]
    reference, contenders = sides[0], sides[1:]
    peak = flops.peak_flops(device, args.precision)
    results = {"machine_before": machine_line(device), "args": vars(args), "peak_flops": peak}
    log.info("machine: %s", results["machine_before"])
    for side in sides:
        ok, side.error = attempt_to(side, "to build", lambda: side.build(args, device))
        if ok:
            log.info("%s: %s, %.2fM parameters (outer %.2fM, head %s), backend %s, %d steps", side.name,
                     side.preset, side.params / 1e6, side.outer_params / 1e6, side.model.head_name,
                     side.backend.describe(), side.steps)
    if reference.model is not None:
        for side in contenders:
            if side.model is not None:
                log.info("outer parameters %s / %s: %.3f", side.preset, reference.preset,
                         side.outer_params / reference.outer_params)
    if args.flops_batch:
        for side in sides:
            if side.model is not None:
                ok, error = attempt_to(side, "counting FLOPs", lambda: setattr(
                    side, "flops_per_image", count_flops_per_image(side, args, device)))
                if not ok:  # the side still samples; its FLOP columns stay empty
                    side.error = f"counting FLOPs: {error}"
        log.info("model FLOPs per image: %s", ", ".join(f"{s.preset} {flops.human(s.flops_per_image)}" for s in sides
                                                        if s.flops_per_image is not None))
    results["ratios"] = {side.preset: {} if side.model is not None else {"error": side.error} for side in contenders}

    def save():  # so far: a side or batch that times out later leaves these behind
        results["sides"] = [side.describe() for side in sides]
        write_json(args.json, results)
    save()
    for batch in args.batch_sizes:
        run_batch(sides, batch, args, device, peak, save)
        for side in contenders:
            if side.model is not None:
                results["ratios"][side.preset][batch] = ratios(reference, side, batch)
        save()
        for side in sides:
            report(side, batch)
        for side in contenders:
            r = results["ratios"].get(side.preset, {}).get(batch)
            if r and "error" not in r:
                log.info("batch %d, %s / %s: %.2fx images/s, %s FLOPs per image, %s peak memory", batch,
                         side.preset, reference.preset, r["images_per_s"], fmt_ratio(r.get("flops_per_image")),
                         fmt_ratio(r["peak_memory"]))
    results["machine_after"] = machine_line(device)
    write_json(args.json, results)
    return results


def fmt_ratio(value):
    return "?" if value is None else f"{value:.3g}x"


def report(side, batch):
    row = side.rows.get(batch)
    if row is None or "error" in row:
        return
    per_image = "?" if row["flops_per_image"] is None else flops.human(row["flops_per_image"])
    share = "" if row["fraction_of_peak"] is None else f"  {100 * row['fraction_of_peak']:.1f}% of peak"
    split = "".join(f", {k} {v:.3f} s" for k, v in row.get("breakdown_s", {}).items())
    log.info("batch %4d  %-9s %-14s %9.3f images/s  %8.4f s/image  %s/image%s  peak %.1f MiB  (runs: %s s%s)", batch,
             side.name, side.preset, row["images_per_s"], row["s_per_image"], per_image, share,
             row["peak_memory_mib"], ", ".join(f"{t:.2f}" for t in row["seconds"]), split)


if __name__ == "__main__":
    main()
