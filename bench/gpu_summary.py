"""The summary of a bench/gpu_check.sh run: its folder's parts.tsv and JSON files -> summary.json,
summary.md (markdown tables), and the markdown on stdout.

    python -m bench.gpu_summary bench/results/gpu [--seconds S --budget S]

A part that failed or was skipped shows as such; the tables hold whatever the parts left.
Standard library only: it runs even where torch cannot start.
"""
import argparse
import datetime
import json
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path
from statistics import median

SAMPLING_PARTS = ("eager_rows", "sampling_b1", "sampling_b256", "compile_b1", "compile_b256")
TRAIN_PARTS = ("train", "train_ckpt")
# a family's speed goal at its ARINAR-B-sized preset with the ARINAR head on one H100/H200 (issue 28):
# images/s at batch 256, s/image at batch 1
FAMILY_GOALS = {"causal": {"model": "causal_base", "images_per_s_b256": 200.0, "s_per_image_b1": 0.1}}
# issue 30's goals for ARINAR-B (mar_base, cfg 4.5, 64 steps) on one H100/H200, met by our best backend:
# (what, batch, the row's value, the better direction, the bound)
SAMPLING_GOALS = (("images/s", 256, "images_per_s", max, 40.0), ("s/image", 1, "s_per_image", min, 0.15),
                  ("s for the first call with torch.compile (compilation)", 256, "first_call_s", min, 60.0))


def load(folder, name):
    path = folder / f"{name}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def parts(folder):
    rows = []
    for line in (folder / "parts.tsv").read_text().splitlines():
        name, rc, seconds, limit, note = (line.split("\t") + [""] * 5)[:5]
        status = {"0": "ok", "skipped": "skipped", "124": "timed out", "137": "timed out"}.get(rc, f"failed (rc {rc})")
        rows.append({"part": name, "status": status, "seconds": seconds, "timeout_s": limit, "note": note})
    return rows


def tests(folder):
    """Counts and failing test ids from pytest's JUnit XML."""
    try:
        root = ET.parse(folder / "cuda_tests.xml").getroot()
    except (OSError, ET.ParseError):
        return None
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    failed = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    count = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    return {**count, "passed": count["tests"] - count["failures"] - count["errors"] - count["skipped"],
            "failed_ids": failed}


def fmt(value, spec, scale=1.0):
    return "–" if value is None else format(value * scale, spec)


def fmt_flops(value):
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3), ("", 1)):
        if value is not None and value >= scale:
            return f"{value / scale:.3g} {unit}FLOP"
    return "–" if value is None else "0"


# the flags that size a benchmark's model
MODEL_FLAGS = ("model", "width", "enc_dec_depth", "num_heads", "inner_ar_width", "inner_ar_depth", "inner_ar_heads",
               "num_gaussians", "img_size")
# the flags that set a sampling run's work per image (batch, backend and timing flags do not), and its
# precision and CFG sampler: a baseline timed at another one is no yardstick for a part that borrows it
SAME_WORK = MODEL_FLAGS + ("num_iter", "cfg", "decode", "precision", "cfg_sampler")


def same_work(a, b):
    return all(a["args"].get(k) == b["args"].get(k) for k in SAME_WORK)


def sampling_rows(folder):
    """One row per (part, side). FLOPs per image do not depend on the batch, so a part that did not
    count them takes sampling_b1's when it does the same work per image; a compile part takes the
    baseline of the plain part at its batch."""
    data = {name: load(folder, name) for name in SAMPLING_PARTS}
    rows = []
    for name, res in data.items():
        if not res:
            continue
        batch, peak = res["args"]["batch_size"], res.get("peak_flops")
        for side in sorted(set(res.get("first_call_s", {})) - set(res.get("sides", {}))):  # killed after 1st call
            rows.append({"part": name, "batch": batch, "steps": res["args"]["num_iter"], "side": side, **work(res),
                         **dict.fromkeys(("images_per_s", "s_per_image", "flops_per_image", "fraction_of_peak",
                                          "speedup", "peak_memory_mib")), "first_call_s": res["first_call_s"][side]})
        if "sides" not in res:
            continue
        counter = data["sampling_b1"]
        counted = counter["flops_per_image"] if counter and same_work(res, counter) else {}
        plain = data.get(name.replace("compile", "sampling"))
        base = res["sides"].get("baseline") or (plain["sides"].get("baseline") if plain and "sides" in plain
                                                and same_work(res, plain) else None) or {}
        for side, row in res["sides"].items():
            per_image = row.get("flops_per_image") or counted.get("baseline" if side == "baseline" else "ours")
            fraction = row.get("fraction_of_peak")
            if fraction is None and per_image and peak:
                fraction = per_image * row["images_per_s"] / peak
            speedup = row.get("speedup")
            if speedup is None and base.get("seconds") and side != "baseline":
                speedup = median(base["seconds"]) / median(row["seconds"])
            rows.append({"part": name, "batch": batch, "steps": res["args"]["num_iter"], "side": side, **work(res),
                         "images_per_s": row["images_per_s"], "s_per_image": 1 / row["images_per_s"],
                         "flops_per_image": per_image, "fraction_of_peak": fraction, "speedup": speedup,
                         "first_call_s": res.get("first_call_s", {}).get(side),
                         "peak_memory_mib": row.get("peak_memory_mib"), "breakdown_s": row.get("breakdown_s")})
    return rows


def work(res):
    """The model and guidance a sampling part ran (a goal holds for one setting only)."""
    return {"model": res["args"].get("model"), "cfg": res["args"].get("cfg")}


def sampling_goals(rows):
    """Issue 30's goals (SAMPLING_GOALS) with the best of our sides at ARINAR-B's setting; met None when
    no part measured it."""
    ours = [r for r in rows if r["side"] != "baseline" and r.get("model") == "mar_base" and r["steps"] == 64
            and r.get("cfg") == 4.5]
    out = []
    for what, batch, key, better, bound in SAMPLING_GOALS:
        measured = [r for r in ours if r["batch"] == batch and r[key] is not None
                    and (key != "first_call_s" or "compile" in r["side"])]
        best = better(measured, key=lambda r: r[key]) if measured else None
        text = f"{'>=' if better is max else '<='} {bound:g} {what} at batch {batch}"
        out.append({"goal": text, "value": best and best[key], "side": best and best["side"],
                    "met": None if best is None else (best[key] >= bound if better is max else best[key] <= bound)})
    return out


def heads_backend(args):
    """The backend a bench_heads or bench_sampling run without --backends used, from its flags (the engine's
    rule: CUDA graphs by default on CUDA, --compile on top of them)."""
    if args.get("compile"):
        return "cuda_graphs+compile"
    graphs = args.get("cuda_graphs")
    return "cuda_graphs" if (str(args.get("device", "")).startswith("cuda") if graphs is None else graphs) else "eager"


# the flags that must agree for a sampling part to stand for the heads part's ARINAR setting
SAME_MODEL = MODEL_FLAGS + ("class_num", "device", "precision", "cfg_sampler", "temperature")
ARINAR_SETTING = {"num_iter": 64, "cfg": 4.5}  # bench_heads' "arinar" setting, for files that do not record it


def arinar_rows(folder, heads):
    """{batch: row} of ARINAR's setting taken from the sampling parts, for a heads part run without it
    (--only mar_64: the sampling parts time the same model, backend, steps and cfg): the side of the
    heads part's backend in a sampling part at that batch with the same model flags, steps and cfg."""
    setting = heads.get("settings", {}).get("arinar", ARINAR_SETTING)
    backend = heads_backend(heads["args"])
    found = {}
    for row in sampling_rows(folder):
        res = load(folder, row["part"])
        args = res["args"]
        if (row["side"] != backend or row["images_per_s"] is None or row["batch"] in found or args.get("decode")
                or args.get("num_iter") != setting["num_iter"] or args.get("cfg") != setting["cfg"]
                or any(args.get(k) != heads["args"].get(k) for k in SAME_MODEL)):
            continue
        found[row["batch"]] = {"setting": f"arinar ({row['part']}, {backend})", "batch_size": row["batch"],
                               "num_iter": setting["num_iter"], "cfg": setting["cfg"],
                               "images_per_s": row["images_per_s"], "flops_per_image": row["flops_per_image"],
                               "fraction_of_peak": row["fraction_of_peak"], "vs_arinar": 1.0}
    return found


def heads_rows(folder):
    """bench_heads' rows with each setting's seconds per image over ARINAR's at the same batch: ARINAR's from
    the heads part itself where it timed it at that batch, else from the sampling parts (arinar_rows)."""
    res = load(folder, "heads")
    if not res or "rows" not in res:
        return []
    own = {row["batch_size"]: row["images_per_s"] for row in res["rows"] if row["setting"] == "arinar"}
    batches = {row["batch_size"] for row in res["rows"]}
    borrowed = {b: row for b, row in arinar_rows(folder, res).items() if b in batches - set(own)}
    rows = [borrowed[b] for b in sorted(borrowed)]
    for row in res["rows"]:
        arinar = own.get(row["batch_size"]) or borrowed.get(row["batch_size"], {}).get("images_per_s")
        rows.append({**{k: row[k] for k in ("setting", "batch_size", "num_iter", "cfg", "images_per_s",
                                            "flops_per_image", "fraction_of_peak")},
                     "vs_arinar": arinar / row["images_per_s"] if arinar else None})
    return rows


def train_rows(folder):
    rows = []
    for name in TRAIN_PARTS:
        res = load(folder, name)
        if not res:
            continue
        for path in ("masked_only", "all_tokens"):
            row = res.get(path, {})
            if "steps_per_s" not in row:
                continue
            rows.append({"part": name, "path": path, "batch": res["args"]["batch_size"],
                         "grad_checkpointing": res["args"].get("grad_checkpointing", False),
                         **{k: row.get(k) for k in ("steps_per_s", "images_per_s", "flops_per_step", "mfu",
                                                     "peak_memory_mib")},
                         "largest_batch": row.get("largest_batch") or {},
                         "vs_all_tokens": row["steps_per_s"] / res["all_tokens"]["steps_per_s"]
                         if "steps_per_s" in res.get("all_tokens", {}) else None})
    return rows


def family_rows(folder):
    """One row per (batch, side) of the families part, with the side's images/s over MAR's (the reference,
    the first side) at that batch; a side that failed to build, or at a batch, gets a row with its error,
    one killed before its timed call a note."""
    res = load(folder, "families")
    if not res or "sides" not in res:
        return []
    reference = {row["batch_size"]: row.get("images_per_s") for row in res["sides"][0].get("rows", [])}
    rows = []
    for i, side in enumerate(res["sides"]):
        base = {"part": "families", "family": side["family"], "model": side["model"], "head": side.get("head"),
                "steps": side.get("steps", res["args"]["num_iter"]), "note": None,
                **dict.fromkeys(("batch", "images_per_s", "s_per_image", "flops_per_image", "fraction_of_peak",
                                 "peak_memory_mib", "vs_mar"))}
        if side.get("error"):
            rows.append({**base, "note": side["error"], "key": (float("inf"), i)})
        for row in side.get("rows", []):
            batch = row["batch_size"]
            if "error" in row:
                rows.append({**base, "batch": batch, "note": row["error"], "key": (batch, i)})
                continue
            ips = row.get("images_per_s")
            rows.append({**base, "batch": batch, "key": (batch, i),
                         "vs_mar": ips / reference[batch] if ips and reference.get(batch) else None,
                         "note": None if ips else "killed after its first call (not timed)",
                         **{k: row.get(k) for k in ("images_per_s", "s_per_image", "flops_per_image",
                                                    "fraction_of_peak", "peak_memory_mib", "breakdown_s")}})
    rows.sort(key=lambda r: r.pop("key"))  # by batch, then side (MAR first)
    return rows


def family_goals(rows):
    """Each family goal (FAMILY_GOALS) with what was measured: rows of its preset with the ARINAR head."""
    out = []
    for family, goal in FAMILY_GOALS.items():
        at = {r["batch"]: r for r in rows if r["family"] == family and r["model"] == goal["model"]
              and r["head"] == "arinar" and r["images_per_s"] is not None}
        b256, b1 = at.get(256, {}).get("images_per_s"), at.get(1, {}).get("s_per_image")
        text = (f"{goal['model']}: >= {goal['images_per_s_b256']:g} images/s at batch 256, "
                f"<= {goal['s_per_image_b1']:g} s/image at batch 1")
        out.append({"family": family, "goal": text,
                    "images_per_s_b256": b256, "s_per_image_b1": b1,
                    "met": None if b256 is None or b1 is None else
                    b256 >= goal["images_per_s_b256"] and b1 <= goal["s_per_image_b1"]})
    return out


def table(header, rows):
    """Markdown table lines; a "|" inside a cell (an error message, a note) is escaped."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]


def machine(folder):
    """The machine line of the first part JSON that has one (the usual parts first, then any other)."""
    names = SAMPLING_PARTS + TRAIN_PARTS + ("heads", "families")
    names += tuple(sorted(path.stem for path in folder.glob("*.json") if path.stem not in names + ("summary",)))
    for name in names:
        res = load(folder, name)
        if isinstance(res, dict) and res.get("machine_before"):
            return res["machine_before"]
    return "unknown (no part left a JSON file)"


def train_losses(folder):
    """bench_train's losses of both paths on the same draws (they should agree), per training part."""
    out = []
    for name in TRAIN_PARTS:
        res = load(folder, name)
        losses = (res or {}).get("losses") or {}
        if "masked_only" not in losses or "all_tokens" not in losses:
            continue
        check = res.get("losses_agree") or {}
        a, b = losses["masked_only"], losses["all_tokens"]
        out.append({"part": name, "masked_only": a, "all_tokens": b,
                    "relative_difference": check.get("relative_difference", abs(a - b) / max(1.0, abs(b))),
                    "tolerance": check.get("tolerance"), "agree": check.get("agree")})
    return out


def compile_rows(folder):
    """bench_compile's rows: per Step, the compile time of the Step whole and block by block (--compile's way)."""
    res = load(folder, "compile_ways")
    ways = (res or {}).get("ways", {})
    names = dict.fromkeys(name for way in ways.values() for name in way)
    rows = []
    for name in names:
        whole, blocks = ways.get("whole", {}).get(name), ways.get("blocks", {}).get(name)
        rows.append({"step": name, "model": res["args"].get("model"),
                     "whole_s": whole and whole["compile_s"], "blocks_s": blocks and blocks["compile_s"],
                     "ratio": whole["compile_s"] / blocks["compile_s"] if whole and blocks and blocks["compile_s"] > 0
                     else None})
    return rows


def commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def time_split(rows, name):
    """The summary's line of where each batch's time goes, for the rows a --breakdown run measured."""
    split = [r for r in rows if r.get("breakdown_s")]
    if not split:
        return []
    return ["", "Where a batch's time goes (--breakdown, median per timed run: the family's outer Steps and "
            "the head's sampling, in seconds per batch): " + "; ".join(
                f"{name(r)}: " + ", ".join(f"{k} {v:.3f}" for k, v in r["breakdown_s"].items()) for r in split)]


def markdown(summary):
    out = [f"## GPU check, {summary['date']}", "",
           f"Machine: {summary['machine']}; commit {summary['commit']}; {summary['seconds']} s of a "
           f"{summary['budget']} s budget.", ""]
    out += table(["part", "result", "s", "timeout s", "note"],
                 [[p["part"], p["status"], p["seconds"], p["timeout_s"], p["note"] or ""] for p in summary["parts"]])
    t = summary["tests"]
    if t:
        out += ["", f"Tests that skip without CUDA (bench/cuda_tests.py; their CPU variants run too): {t['passed']} "
                f"passed, {t['failures'] + t['errors']} failed, {t['skipped']} skipped"
                + (": " + ", ".join(t["failed_ids"][:10]) if t["failed_ids"] else "")]
    if summary["sampling"]:
        out += ["", "Sampling (cfg 4.5): ours against the release-cost baseline (peak: the most allocated above "
                "what was allocated before a call, over the first call and the timed ones)", ""]
        out += table(["part", "batch", "steps", "side", "images/s", "s/image", "FLOP/image", "% of peak",
                      "vs release", "first call s", "peak GiB"],
                     [[r["part"], r["batch"], r["steps"], r["side"], fmt(r["images_per_s"], ".3f"),
                       fmt(r["s_per_image"], ".3f"), fmt_flops(r["flops_per_image"]),
                       fmt(r["fraction_of_peak"], ".1f", 100), fmt(r["speedup"], ".2f"), fmt(r["first_call_s"], ".1f"),
                       fmt(r["peak_memory_mib"], ".1f", 1 / 1024)] for r in summary["sampling"]])
    out += time_split(summary["sampling"], lambda r: f"{r['part']} {r['side']}")
    if summary["sampling"]:
        out.append("")
        for g in summary["sampling_goals"]:
            verdict = {True: "met", False: "NOT met", None: "not measured"}[g["met"]]
            measured = "" if g["value"] is None else f"; measured {g['value']:.3g} ({g['side']})"
            out.append(f"Goal (ARINAR-B, cfg 4.5, 64 steps): {g['goal']}{measured}: {verdict}")
    if summary["heads"]:
        out += ["", "Heads (same outer model; ARINAR's rows from the sampling part at that batch when the heads part "
                "did not time it)", ""]
        out += table(["setting", "batch", "steps", "cfg", "images/s", "FLOP/image", "% of peak", "s/image vs ARINAR"],
                     [[r["setting"], r["batch_size"], r["num_iter"], r["cfg"], fmt(r["images_per_s"], ".3f"),
                       fmt_flops(r["flops_per_image"]), fmt(r["fraction_of_peak"], ".1f", 100),
                       fmt(r["vs_arinar"], ".2f")] for r in summary["heads"]])
    if summary["training"]:
        out += ["", "Training (one step: forward, backward, AdamW)", ""]
        out += table(["part", "loss path", "batch", "grad ckpt", "steps/s", "images/s", "FLOP/step", "MFU %",
                      "peak GiB", "vs all-tokens", "batch on 40 GB", "batch on 80 GB"],
                     [[r["part"], r["path"], r["batch"], "yes" if r["grad_checkpointing"] else "no",
                       fmt(r["steps_per_s"], ".3f"), fmt(r["images_per_s"], ".1f"),
                       fmt_flops(r["flops_per_step"]), fmt(r["mfu"], ".1f", 100),
                       fmt(r["peak_memory_mib"], ".1f", 1 / 1024), fmt(r["vs_all_tokens"], ".2f"),
                       fmt(r["largest_batch"].get("40GB"), ".0f"), fmt(r["largest_batch"].get("80GB"), ".0f")]
                      for r in summary["training"]])
    for r in summary.get("train_losses", []):
        verdict = {True: "agree", False: "DIFFER", None: "no verdict recorded"}[r["agree"]]
        tolerance = "" if r["tolerance"] is None else f", tolerance {r['tolerance']:.0e}"
        out += ["", f"Losses on the same draws ({r['part']}): masked-only {r['masked_only']:.6g}, all-tokens "
                f"{r['all_tokens']:.6g}, relative difference {r['relative_difference']:.1e}{tolerance}: {verdict}"]
    if summary.get("compile"):
        out += ["", "torch.compile time per Step with an empty cache, whole against block by block (--compile's way; "
                "bench/bench_compile.py)", ""]
        out += table(["model", "step", "whole s", "block by block s", "ratio"],
                     [[r["model"] or "–", r["step"], fmt(r["whole_s"], ".1f"), fmt(r["blocks_s"], ".1f"), fmt(r["ratio"], ".2f")]
                      for r in summary["compile"]])
    if summary["families"]:
        out += ["", "Outer families (the same head and backend; the reference: the MAR family through our engine)", ""]
        out += table(["part", "family", "model", "batch", "steps", "images/s", "s/image", "FLOP/image", "% of peak",
                      "peak GiB", "images/s vs MAR", "note"],
                     [[r["part"], r["family"], r["model"], "–" if r["batch"] is None else r["batch"], r["steps"],
                       fmt(r["images_per_s"], ".3f"), fmt(r["s_per_image"], ".4f"), fmt_flops(r["flops_per_image"]),
                       fmt(r["fraction_of_peak"], ".1f", 100), fmt(r["peak_memory_mib"], ".2f", 1 / 1024),
                       fmt(r["vs_mar"], ".2f"), r["note"] or ""] for r in summary["families"]])
        out += time_split(summary["families"], lambda r: f"{r['model']} at batch {r['batch']}")
        out.append("")
        for g in summary["family_goals"]:
            verdict = {True: "met", False: "NOT met", None: "not measured"}[g["met"]]
            out.append(f"Goal ({g['family']}, ARINAR head): {g['goal']}; measured {fmt(g['images_per_s_b256'], '.1f')} "
                       f"images/s and {fmt(g['s_per_image_b1'], '.4f')} s/image: {verdict}")
    return "\n".join(out) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", type=Path)
    p.add_argument("--seconds", default="?")
    p.add_argument("--budget", default="?")
    args = p.parse_args(argv)
    summary = {"date": datetime.date.today().isoformat(), "commit": commit(), "machine": machine(args.folder),
               "seconds": args.seconds, "budget": args.budget, "parts": parts(args.folder),
               "tests": tests(args.folder), "sampling": sampling_rows(args.folder), "heads": heads_rows(args.folder),
               "training": train_rows(args.folder), "train_losses": train_losses(args.folder),
               "families": family_rows(args.folder), "compile": compile_rows(args.folder)}
    summary["family_goals"] = family_goals(summary["families"])
    summary["sampling_goals"] = sampling_goals(summary["sampling"])
    (args.folder / "summary.json").write_text(json.dumps(summary, indent=1))
    text = markdown(summary)
    (args.folder / "summary.md").write_text(text)
    print(text, end="")  # the script's output is the table


if __name__ == "__main__":
    main()
