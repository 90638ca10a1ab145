"""The few-row CPU linear (models/cpu_linear.py) against F.linear (MKL) at the inner loop's shapes.

One "feature step" multiplies `rows` rows by the inner block's four weights in turn (q/k/v
768 -> 2304, proj 768 -> 768, fc1 768 -> 3072, fc2 3072 -> 768: 28 MB of fp32 at ARINAR-B size),
as the sampling loop does, so each weight is re-read after the other three have passed through the
cache. Reports ms per step and GMAC/s for both, alternating, and their ratio.

    python -m bench.bench_linear --threads 1
"""
import logging

import torch
import torch.nn.functional as F

from bench.config import median, parser, time_runs, write_json
from models.cpu_linear import cpu_supports_kernel, load_small_linear

log = logging.getLogger("bench.linear")


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=768, help="the inner model's width (MLP 4x)")
    p.add_argument("--rows", type=int, nargs="+", default=[16, 48, 96])
    p.add_argument("--steps", type=int, default=20, help="feature steps per timed run")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per path (alternating; median reported)")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if not cpu_supports_kernel():
        raise SystemExit("this CPU lacks AVX2 + FMA: the kernel is not used here")
    if args.threads:
        torch.set_num_threads(args.threads)
    small_linear = load_small_linear()
    w = args.width
    torch.manual_seed(0)
    layers = [(torch.randn(n_out, n_in) * 0.02, torch.zeros(n_out)) for n_in, n_out in
              [(w, 3 * w), (w, w), (w, 4 * w), (4 * w, w)]]
    results = {}
    for rows in args.rows:
        inputs = [torch.randn(rows, weight.shape[1]) for weight, _ in layers]
        macs = rows * sum(weight.numel() for weight, _ in layers)
        paths = {"F.linear": F.linear, "small_linear": small_linear}
        times = {name: [] for name in paths}
        for _ in range(args.repeats):
            for name, linear in paths.items():
                def run(linear=linear):
                    for _ in range(args.steps):
                        for x, (weight, bias) in zip(inputs, layers):
                            linear(x, weight, bias)
                times[name] += time_runs(run, torch.device("cpu"), 1, 1)
        step = {name: median(t) / args.steps for name, t in times.items()}
        results[rows] = {name: 1e3 * s for name, s in step.items()}
        log.info("%4d rows: F.linear %.2f ms/step (%.1f GMAC/s), small_linear %.2f ms/step (%.1f GMAC/s): %.2fx",
                 rows, 1e3 * step["F.linear"], macs / step["F.linear"] / 1e9, 1e3 * step["small_linear"],
                 macs / step["small_linear"] / 1e9, step["F.linear"] / step["small_linear"])
    write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
