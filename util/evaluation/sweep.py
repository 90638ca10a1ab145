"""A cfg x temperature sweep's results: one table (CSV and JSON), one plot, and its best point.

Rows are the metrics dicts evaluate() returns; a later sweep of the same checkpoint and sizes adds
its points to the table (e.g. temperature 1.1 beside 1.0). Metrics are the numeric values that are not
settings or bookkeeping, so FID, IS, precision, recall and any extra score (the digits demo's
classifier accuracy) are tabled and plotted alike.
"""
import csv
import io
import json
import math

from util.io.files import atomic_write

NOT_METRICS = {"epoch", "num_images", "cfg", "temperature", "num_iter", "world_size", "sec_per_image",
               "images_drawn", "images_kept"}
# which metric decides the best point, in order of preference, and whether lower is better
RANK_BY = (("fid", True), ("accuracy", False))


def metric_keys(rows):
    """Numeric metrics present in any row, in first-seen order. Standard deviations are tabled, not
    plotted, and "real_<metric>" (the score of real data, e.g. the digits demo's real_accuracy) is drawn
    as a reference line in <metric>'s panel."""
    keys = {}
    for row in rows:
        for key, value in row.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in NOT_METRICS:
                keys.setdefault(key)
    return [k for k in keys if not k.endswith("_std") and not (k.startswith("real_") and k[5:] in keys)]


def best_point(rows):
    """(row, metric, lower_is_better) of the best row by the first RANK_BY metric present; None if none is."""
    for key, lower in RANK_BY:
        scored = [r for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        if scored:
            pick = min if lower else max
            return pick(scored, key=lambda r: r[key]), key, lower
    return None


def read_rows(path):
    """The rows of an earlier sweep table (JSON), or [] if there is none."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return []


def merge_rows(old, new):
    """old's rows with new's added; a point (cfg, temperature) evaluated again takes its new row."""
    fresh = {(r["cfg"], r["temperature"]) for r in new}
    return [r for r in old if (r["cfg"], r["temperature"]) not in fresh] + list(new)


def write_tables(rows, prefix):
    """prefix.csv and prefix.json: one row per (cfg, temperature) point."""
    columns = ["cfg", "temperature"]
    for row in rows:
        columns += [k for k in row if k not in columns]
    text = io.StringIO()
    table = csv.DictWriter(text, fieldnames=columns, extrasaction="ignore")
    table.writeheader()
    table.writerows(rows)
    atomic_write(f"{prefix}.csv", lambda f: f.write(text.getvalue().encode()))
    atomic_write(f"{prefix}.json", lambda f: f.write(json.dumps(rows, indent=2).encode()))
    return f"{prefix}.csv", f"{prefix}.json"


def plot(rows, path, title=""):
    """One panel per metric against cfg, one line per temperature; the best point is circled."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed

    keys = metric_keys(rows)
    if not keys:
        return None
    best = best_point(rows)
    temperatures = sorted({r["temperature"] for r in rows})
    fig = Figure(figsize=(max(4.2 * len(keys), 6.0), 3.6), layout="constrained")
    for ax, key in zip(fig.subplots(1, len(keys), squeeze=False)[0], keys):
        for t in temperatures:
            line = sorted((r["cfg"], r[key]) for r in rows if r["temperature"] == t and key in r)
            ax.plot([c for c, _ in line], [v for _, v in line], marker="o", label=f"temperature {t:g}")
        real = [r[f"real_{key}"] for r in rows if f"real_{key}" in r]
        if real:
            ax.axhline(real[0], color="grey", linestyle="--", label=f"real data {real[0]:.3g}")
        if best is not None and best[1] == key:
            ax.scatter([best[0]["cfg"]], [best[0][key]], s=160, facecolors="none", edgecolors="black",
                       label=f"best: cfg {best[0]['cfg']:g}, T {best[0]['temperature']:g}", zorder=3)
        direction = {"fid": " (lower is better)"}.get(key, "")
        ax.set(xlabel="cfg scale", ylabel=key, title=key + direction)
        ax.set_xticks(sorted({r["cfg"] for r in rows}))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    return path
