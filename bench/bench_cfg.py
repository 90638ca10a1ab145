"""CFG samplers for one feature: speed, and agreement with the 1-D target density.

For fixed conditional/unconditional mixtures and several (cfg, temperature) pairs, draws many
samples with the release's SIR (models.gmm.sample_gmm_cfg), its fused form (CFG_SAMPLERS["sir"])
and the exact grid sampler (CFG_SAMPLERS["exact"]); reports each one's KS distance to the target
CDF (numerically integrated) and the SIR-vs-exact two-sample KS distance. Then times each sampler
at a few row counts (32 rows is one outer step's conditional rows at batch 8).

    python -m bench.bench_cfg --samples 50000
"""
import logging

import numpy as np
import torch
from scipy import stats

from bench.config import median, parser, time_runs, write_json
from bench.reference import random_mixtures, reference_mixtures, target_cdf
from models.gmm import CFG_SAMPLERS, sample_gmm_cfg

log = logging.getLogger("bench.cfg")
SAMPLERS = {"sir_release": sample_gmm_cfg, "sir_fused": CFG_SAMPLERS["sir"], "exact": CFG_SAMPLERS["exact"]}
SETTINGS = ((1.5, 1.0), (3.9, 1.1), (4.5, 1.0), (8.0, 0.7))


def draw(sampler, n, cfg, temperature, seed, chunk=10000):
    torch.manual_seed(seed)
    out = []
    for start in range(0, n, chunk):
        rows = min(chunk, n - start)
        out.append(sampler(*reference_mixtures(rows), cfg, temperature))
    return torch.cat(out).numpy()


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=50000)
    p.add_argument("--rows", type=int, nargs="+", default=[32, 512])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {"agreement": [], "speed_ms": {}}
    for cfg, temperature in SETTINGS:
        cdf = target_cdf(cfg, temperature)
        samples = {name: draw(fn, args.samples, cfg, temperature, seed=1) for name, fn in SAMPLERS.items()}
        row = {"cfg": cfg, "temperature": temperature}
        for name, x in samples.items():
            row[f"ks_{name}"] = float(stats.kstest(x, cdf).statistic)
        row["ks_sir_vs_exact"] = float(stats.ks_2samp(samples["sir_release"], samples["exact"]).statistic)
        results["agreement"].append(row)
        log.info("cfg %.1f T %.1f: KS to target  SIR %.4f  fused SIR %.4f  exact %.4f;  SIR vs exact %.4f "
                 "(n = %d; KS of an exact sampler is about %.4f)", cfg, temperature, row["ks_sir_release"],
                 row["ks_sir_fused"], row["ks_exact"], row["ks_sir_vs_exact"], args.samples,
                 0.87 / np.sqrt(args.samples))
    device = torch.device("cpu")
    for rows in args.rows:
        cond, uncond = random_mixtures(rows, 0), random_mixtures(rows, 1)
        for name, fn in SAMPLERS.items():
            ms = 1e3 * median(time_runs(lambda: fn(cond, uncond, 4.5, 1.0), device, 1, args.repeats))
            results["speed_ms"][f"{name}@{rows}"] = ms
            log.info("%-11s %5d rows: %.2f ms per call", name, rows, ms)
    write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
