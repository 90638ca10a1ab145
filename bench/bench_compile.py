"""torch.compile warm-up: each sampling Step compiled whole against block by block (Step.regions), in one run.

--compile compiles the Steps' repeated blocks (sampling/cuda_graphs.py: StepModule), one graph per block
class that every block shares, and the head's compile_regions inside its sampler (ARINAR: its block, the
pre-head norm, the mixture draw, shared by the 16 features); compiling each Step whole, as one graph, costs
a compilation the size of the network (the head's sampler: unrolled over its 16 features). Both ways here,
each in a fresh process with an empty Inductor cache (so neither reuses the other's kernels): for every
Step of one sampling run (recorded on the eager backend: a call of each Step with no size-0/1 dimension,
as --compile compiles it) and the head's sampler, the first call (compilation included), a later call, and
how many graphs Dynamo traced. The compile time is first - later. Outside CUDA graphs: the
compilation is the same inside them.

CPU (Inductor's C++ backend; needs a C++ compiler):
    python -m bench.bench_compile --model mar_base
    python -m bench.bench_compile --model causal_base
On a GPU (Triton):
    python -m bench.bench_compile --model mar_base --device cuda --precision bf16
"""
import json
import logging
import os
import subprocess
import sys
import tempfile
import time

import torch
import torch.fx.experimental._config as fx_config

from bench.config import (add_model_args, add_runtime_args, build_model, machine_line, median, parser,
                          setup_runtime, synchronize, write_json)
from models.families.common import Step
from sampling import EagerBackend, precision_autocast
from sampling.cuda_graphs import StepModule, compiles_well

log = logging.getLogger("bench.compile")
WAYS = ("whole", "blocks")


def parse_args(argv=None):
    p = parser(__doc__.splitlines()[0])
    add_model_args(p)
    add_runtime_args(p)
    g = p.add_argument_group("compile")
    g.add_argument("--batch_size", type=int, default=2, help="images of the recorded sampling run")
    g.add_argument("--num_iter", type=int, default=8, help="steps of the recorded sampling run")
    g.add_argument("--cfg", type=float, default=4.5)
    g.add_argument("--compiler", default="inductor", help="torch.compile backend (eager: Dynamo alone, no compiler)")
    g.add_argument("--way", choices=WAYS, help="measure this way only, in this process (a child of the run)")
    return p.parse_args(argv)


class RecordingBackend(EagerBackend):
    """The eager backend, keeping the last call that --compile would compile of each Step and of the head's
    sampler (as a Step whose regions are the head's compile_regions)."""

    def __init__(self, model, precision):
        super().__init__(model, precision=precision)
        self.calls = {}

    def run(self, step, *args):
        if compiles_well(args):
            self.calls[step.name] = (step, [a.clone() for a in args])
        return super().run(step, *args)

    def sample_head(self, head, z, temperature, cfg):
        regions = getattr(head, "compile_regions", ())
        if regions:
            step = Step(f"head.{type(head).__name__}", head, type(head).sample, regions=tuple(regions))
            self.calls[step.name] = (step, [z.clone(), temperature, cfg])
        return super().sample_head(head, z, temperature, cfg)


def compiled_step(step, way, compiler):
    """fn(*args) running the Step compiled whole (one graph) or block by block (--compile's way)."""
    if way == "blocks":
        return StepModule(step.module, step.fn, step.regions, backend=compiler)
    fn = torch.compile(step.fn, dynamic=True, backend=compiler)

    def whole(*args):
        with fx_config.patch(use_duck_shape=False):  # as StepModule traces
            return fn(step.module, *args)
    return whole


def measure(args):
    """{step name: {first_s, later_s, compile_s, graphs}} of one way, in this process."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    device = setup_runtime(args)
    model = build_model(args).to(device)
    labels = torch.arange(args.batch_size, device=device) % model.config.class_num
    recorder = RecordingBackend(model, args.precision)
    model.sample_tokens(args.batch_size, args.num_iter, cfg=args.cfg, labels=labels, backend=recorder)
    if all(step.module is model.head for step, _ in recorder.calls.values()):
        raise ValueError(f"every Step call of {args.num_iter} steps has a size-0/1 dimension (--compile leaves "
                         "those uncompiled): use fewer --num_iter or a larger --batch_size")
    results = {}
    for name, (step, inputs) in recorder.calls.items():
        torch._dynamo.reset()
        counters.clear()
        fn = compiled_step(step, args.way, args.compiler)

        def call():
            with torch.no_grad(), precision_autocast(device, args.precision):
                fn(*inputs)
            synchronize(device)
        start = time.perf_counter()
        call()
        first = time.perf_counter() - start
        later = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            call()
            later.append(time.perf_counter() - start)
        results[name] = {"first_s": first, "later_s": median(later), "compile_s": first - median(later),
                         "graphs": counters["stats"]["unique_graphs"]}
    return results


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.way:  # a child: one way, its results as JSON on the last line of stdout
        print(json.dumps(measure(args)))
        return None
    device = setup_runtime(args)
    results = {"machine_before": machine_line(device), "args": vars(args), "ways": {}}
    log.info("machine: %s", results["machine_before"])
    for way in WAYS:
        with tempfile.TemporaryDirectory() as cache:  # an empty Inductor cache for each way
            out = subprocess.run([sys.executable, "-m", "bench.bench_compile", *argv, "--way", way],
                                 env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}, capture_output=True,
                                 text=True, check=False)
        if out.returncode != 0:
            last = (out.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"bench_compile --way {way} failed: {last}")
        results["ways"][way] = json.loads(out.stdout.strip().splitlines()[-1])
        write_json(args.json, results)
    for name, whole in results["ways"]["whole"].items():
        blocks = results["ways"]["blocks"][name]
        for way, row in (("whole", whole), ("blocks", blocks)):
            log.info("%-16s %-6s compile %6.1f s (first call %6.1f s, later %.3f s), %d graph(s)", name, way,
                     row["compile_s"], row["first_s"], row["later_s"], row["graphs"])
        if blocks["compile_s"] > 0:
            log.info("%-16s compile time whole / block by block: %.2fx", name, whole["compile_s"] / blocks["compile_s"])
    results["machine_after"] = machine_line(device)
    write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
