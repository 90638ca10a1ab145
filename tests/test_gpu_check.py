"""bench/gpu_check.sh and its summary, on CPU: a part's JSON reaches the table, a failing or timed-out
part is reported, and numbers one part lacks are taken from the part that has them."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import bench_sampling, bench_train, gpu_summary
from bench.config import median
from tests.conftest import REPO

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = ["--width", "32", "--num_heads", "4", "--enc_dec_depth", "1", "--inner_ar_width", "32", "--img_size", "64",
        "--class_num", "10", "--device", "cpu", "--warmup", "0", "--num_iter", "2", "--backends", "eager"]


def test_summary_reads_what_the_benchmarks_write(tmp_path):
    small = bench_sampling.main(TINY + ["--batch_size", "1", "--repeats", "1", "--baseline_repeats", "1",
                                        "--breakdown", "--json", str(tmp_path / "sampling_b1.json")])
    big = bench_sampling.main(TINY + ["--batch_size", "2", "--repeats", "1", "--baseline_repeats", "1",
                                      "--flops_batch", "0", "--json", str(tmp_path / "sampling_b256.json")])
    # a compile part as the CUDA run writes it: its own side, no baseline of its own
    compiled = {**big, "sides": {"cuda_graphs+compile": {"seconds": [0.5], "images_per_s": 4.0, "flops_per_image": None,
                                                         "fraction_of_peak": None, "peak_memory_mib": None}}}
    (tmp_path / "compile_b256.json").write_text(json.dumps(compiled))
    # a compile part killed after its first call (the compilation) still reports how long that took
    killed = {"args": big["args"], "first_call_s": {"cuda_graphs+compile": 42.0}}
    (tmp_path / "compile_b1.json").write_text(json.dumps(killed))
    # a part with other work per image (fewer steps) must not borrow b1's FLOPs
    (tmp_path / "eager_rows.json").write_text(json.dumps({**big, "args": {**big["args"], "num_iter": 1}}))
    (tmp_path / "parts.tsv").write_text("sampling_b1\t0\t5\t120\t\nheads\t1\t3\t150\tValueError: x | y\n"
                                        "train\t124\t90\t90\ttimed out after 90 s\n"
                                        "compile_b1\tskipped\t0\t90\tbudget\n")
    gpu_summary.main([str(tmp_path), "--seconds", "98", "--budget", "470"])

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [p["status"] for p in summary["parts"]] == ["ok", "failed (rc 1)", "timed out", "skipped"]
    rows = {(r["part"], r["side"]): r for r in summary["sampling"]}
    counted = json.loads((tmp_path / "sampling_b1.json").read_text())["flops_per_image"]
    assert rows["sampling_b256", "eager"]["flops_per_image"] == counted["ours"] > 0  # batch-free, from b1
    assert rows["sampling_b256", "baseline"]["flops_per_image"] == counted["baseline"]
    assert rows["eager_rows", "eager"]["flops_per_image"] is None
    assert rows["compile_b1", "cuda_graphs+compile"]["first_call_s"] == 42.0
    assert rows["compile_b256", "cuda_graphs+compile"]["speedup"] == pytest.approx(
        median(big["sides"]["baseline"]["seconds"]) / 0.5)  # against the plain part's baseline
    table = (tmp_path / "summary.md").read_text()
    assert "| compile_b256 | 2 | 2 | cuda_graphs+compile |" in table and "timed out" in table
    split = small["sides"]["eager"]["breakdown_s"]  # batch 1's time split (--breakdown), that part's only
    assert f"sampling_b1 eager: outer {split['outer']:.3f}, head {split['head']:.3f}" in table
    assert table.count(": outer ") == 1
    assert "| heads | failed (rc 1) | 3 | 150 | ValueError: x \\| y |" in table  # the note's pipe escaped


def test_script_runs_a_part_and_writes_the_table(tmp_path):
    """--parts runs the parts it names, each replacing what an earlier run left for it (compile_b1 fails here:
    its old numbers must not stay in the table), and keeps the other parts' results (heads)."""
    env = {**os.environ, "PYTHON": sys.executable}
    old = {"args": {"batch_size": 1, "num_iter": 4, "cfg": 4.5}, "sides": {"cuda_graphs+compile": {
        "seconds": [9.0], "images_per_s": 123.456, "flops_per_image": None, "fraction_of_peak": None,
        "peak_memory_mib": None}}}
    (tmp_path / "compile_b1.json").write_text(json.dumps(old))
    (tmp_path / "parts.tsv").write_text("heads\t0\t5\t80\t\ncompile_b1\t0\t9\t90\t\n")
    out = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), str(tmp_path), "--cpu-smoke",
                          "--parts", "eager_rows compile_b1"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    parts = [line.split("\t")[:2] for line in (tmp_path / "parts.tsv").read_text().splitlines()]
    assert parts == [["heads", "0"], ["eager_rows", "0"], ["compile_b1", "1"]]  # no CUDA: compile fails, reported
    assert "123.456" not in out.stdout and not (tmp_path / "compile_b1.json").exists()
    rows = json.loads((tmp_path / "eager_rows.json").read_text())
    assert rows["sides"]["eager"]["images_per_s"] > 0 and rows["first_call_s"]["eager"] > 0  # --warmup 1, timed apart
    assert rows["args"]["warmup"] == 1 and len(rows["sides"]["eager"]["seconds"]) == 1
    assert "| eager_rows | ok |" in out.stdout and "| compile_b1 | failed (rc 1) |" in out.stdout
    assert (tmp_path / "summary.md").read_text() in out.stdout


def test_each_part_compiles_into_its_own_empty_cache(tmp_path):
    """compile_b1 after compile_b256 must not find the block graphs compile_b256 left in a shared Inductor
    cache: its first call would look like a warm one. A stand-in for python records each part's cache."""
    record = tmp_path / "caches.txt"
    python = tmp_path / "python"
    python.write_text('#!/bin/bash\n'
                      '[ "$2" = bench.gpu_summary ] && exit 0\n'
                      'echo "$TORCHINDUCTOR_CACHE_DIR $TRITON_CACHE_DIR $(ls -A "$TORCHINDUCTOR_CACHE_DIR" | wc -l)"'
                      ' >> "$RECORD"\n'
                      'touch "$TORCHINDUCTOR_CACHE_DIR/compiled"\n')
    python.chmod(0o755)
    env = {**os.environ, "PYTHON": str(python), "RECORD": str(record), "TRITON_CACHE_DIR": str(tmp_path / "shared")}
    out = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), str(tmp_path / "gpu"), "--cpu-smoke",
                          "--parts", "compile_b256 compile_b1"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    caches = [line.split() for line in record.read_text().splitlines()]
    assert len(caches) == 2 and caches[0][0] != caches[1][0], caches
    assert all(triton == f"{cache}/triton" for cache, triton, _ in caches)  # Triton's kernels too, even if set
    assert [count for _, _, count in caches] == ["0", "0"]  # each empty when its part starts
    assert not any(Path(cache).exists() for cache, _, _ in caches)  # and removed after it


def test_largest_batch_fits_the_line_through_two_peaks():
    """Peaks of 12,000 MiB at batch 16 and 30,000 at 64: 375 MiB an image on 6,000 fixed. 90% of 40 GiB is
    36,864 MiB: (36,864 - 6,000) / 375 = 82.3 -> 82; of 80 GiB 73,728 MiB: 180.6 -> 180."""
    from bench.bench_train import largest_batch
    peaks = {64: 30_000.0, 16: 12_000.0}
    assert (largest_batch(peaks, 40), largest_batch(peaks, 80)) == (82, 180)
    assert largest_batch({1: 50_000.0, 2: 60_000.0}, 40) == 0  # the fixed part alone is too big
    with pytest.raises(ValueError, match="does not grow"):
        largest_batch({16: 100.0, 64: 100.0}, 40)


def test_fits_cards_measures_a_quarter_of_the_batch(monkeypatch):
    """fits_cards at batch 64 measures batch 16 (a stand-in peak of 6,000 + 375 MiB per image): the line of
    test_largest_batch_fits_the_line_through_two_peaks, 82 and 180 images."""
    monkeypatch.setattr(bench_train, "peak_memory_mb", lambda args, path: (6000.0 + 375.0 * args.batch_size, None))
    row = {}
    bench_train.fits_cards(bench_train.parse_args(["--batch_size", "64"]), "masked_only", 30_000.0, row)
    assert row == {"peak_memory_mib_by_batch": {64: 30_000.0, 16: 12_000.0}, "largest_batch": {"40GB": 82, "80GB": 180}}


def test_summary_shows_the_batch_each_card_fits(tmp_path):
    row = {"steps_per_s": 2.0, "images_per_s": 128.0, "flops_per_step": 1e12, "mfu": 0.3, "peak_memory_mib": 30000.0,
           "largest_batch": {"40GB": 82, "80GB": 180}}
    res = {"args": {"batch_size": 64, "grad_checkpointing": False}, "masked_only": row,
           "all_tokens": {**row, "steps_per_s": 1.0, "largest_batch": {"40GB": 40, "80GB": 90}}}
    (tmp_path / "train.json").write_text(json.dumps(res))
    (tmp_path / "parts.tsv").write_text("train\t0\t60\t90\t\n")
    gpu_summary.main([str(tmp_path)])
    table = (tmp_path / "summary.md").read_text()
    lines = [line for line in table.splitlines() if line.startswith("| train | ")][1:]  # after the parts table
    assert lines[0].rstrip().endswith("| 2.00 | 82 | 180 |") and lines[1].rstrip().endswith("| 1.00 | 40 | 90 |")


def sampling_part(batch, num_iter, sides, model="mar_base", device="cuda"):
    args = {"batch_size": batch, "num_iter": num_iter, "cfg": 4.5, "model": model, "device": device,
            "precision": "bf16", "cfg_sampler": "sir", "temperature": 1.0, "decode": False}
    return {"args": args, "peak_flops": None, "flops_per_image": {"ours": 5e11} if batch == 1 else {},
            "sides": {name: {"seconds": [batch / ips], "images_per_s": ips, "flops_per_image": None,
                             "fraction_of_peak": None, "peak_memory_mib": None} for name, ips in sides.items()}}


def test_heads_take_arinar_from_the_sampling_parts(tmp_path):
    """heads runs --only mar_64: ARINAR's rows (64 steps, cfg 4.5) come from the sampling part at the same
    batch, on the heads part's backend (CUDA graphs on CUDA), with the same model; a part with other steps
    or another model, or another backend (compile_b256's), does not stand in. s/image vs ARINAR = ARINAR's images/s over the head's."""
    (tmp_path / "sampling_b1.json").write_text(json.dumps(sampling_part(1, 64, {"eager": 2.0, "cuda_graphs": 8.0})))
    (tmp_path / "sampling_b256.json").write_text(json.dumps(sampling_part(256, 64, {"cuda_graphs": 100.0})))
    (tmp_path / "compile_b256.json").write_text(json.dumps(sampling_part(256, 64, {"cuda_graphs+compile": 999.0})))
    (tmp_path / "eager_rows.json").write_text(json.dumps(sampling_part(256, 2, {"cuda_graphs": 999.0})))
    heads_args = {"device": "cuda", "cuda_graphs": None, "compile": False, "model": "mar_base", "precision": "bf16",
                  "cfg_sampler": "sir", "temperature": 1.0, "num_iter": 32, "cfg": 1.0}
    rows = [{"setting": "mar_64", "head": "diffloss", "num_iter": 64, "cfg": 2.9, "batch_size": b, "seconds": [1.0],
             "images_per_s": ips, "flops_per_image": 1e12, "fraction_of_peak": 0.2}
            for b, ips in ((1, 2.0), (256, 40.0))]
    heads = {"args": heads_args, "rows": rows, "ratios": {},
             "settings": {"arinar": {"head": "arinar", "num_iter": 64, "cfg": 4.5}}}
    (tmp_path / "parts.tsv").write_text("heads\t0\t60\t80\t\n")

    def summarised(*keys):
        (tmp_path / "heads.json").write_text(json.dumps(heads))
        gpu_summary.main([str(tmp_path)])
        return [tuple(r[k] for k in keys) for r in json.loads((tmp_path / "summary.json").read_text())["heads"]]

    assert summarised("setting", "batch_size", "images_per_s", "flops_per_image", "vs_arinar") == [
        ("arinar (sampling_b1, cuda_graphs)", 1, 8.0, 5e11, 1.0),
        ("arinar (sampling_b256, cuda_graphs)", 256, 100.0, 5e11, 1.0),  # FLOPs per image from b1
        ("mar_64", 1, 2.0, 1e12, 4.0), ("mar_64", 256, 40.0, 1e12, 2.5)]
    heads["args"].update(model="mar_large")  # another model: no stand-in
    assert summarised("setting", "batch_size", "vs_arinar") == [("mar_64", 1, None), ("mar_64", 256, None)]
    heads["args"].update(model="mar_base", cuda_graphs=False)  # eager: sampling_b1's eager side, but 64 steps
    heads["settings"]["arinar"]["num_iter"] = 2  # as if the heads' ARINAR setting took eager_rows' 2 steps
    got = summarised("setting", "batch_size", "vs_arinar")
    assert got == [("mar_64", 1, None), ("mar_64", 256, None)]  # eager_rows has no eager side: no stand-in
    heads["settings"]["arinar"]["num_iter"] = 64
    assert summarised("setting", "batch_size", "vs_arinar") == [("arinar (sampling_b1, eager)", 1, 1.0),
                                                                ("mar_64", 1, 1.0), ("mar_64", 256, None)]

    # the heads part timed ARINAR at batch 1 only (killed before 256): batch 1 keeps its own, 256 borrows
    heads["args"].update(cuda_graphs=None)
    heads["rows"].insert(0, {**rows[0], "setting": "arinar", "head": "arinar", "cfg": 4.5, "images_per_s": 4.0})
    assert summarised("setting", "batch_size", "vs_arinar") == [
        ("arinar (sampling_b256, cuda_graphs)", 256, 1.0), ("arinar", 1, 1.0), ("mar_64", 1, 2.0),
        ("mar_64", 256, 2.5)]


def test_summary_machine_and_training_losses_from_any_part(tmp_path):
    """The machine line from the families part when no other part left one; bench_train's losses check."""
    (tmp_path / "families.json").write_text(json.dumps({"machine_before": "NVIDIA H200; torch 2.11", "args": {}}))
    losses = {"masked_only": 20.001, "all_tokens": 20.0}
    res = {"args": {"batch_size": 64}, "losses": losses, "losses_agree": bench_train.losses_agree(losses, "bf16")}
    (tmp_path / "train.json").write_text(json.dumps(res))
    (tmp_path / "train_ckpt.json").write_text(json.dumps({**res, "losses_agree": bench_train.losses_agree(losses,
                                                                                                         "fp32")}))
    (tmp_path / "parts.tsv").write_text("families\t124\t150\t150\t\ntrain\t124\t60\t60\t\n")
    gpu_summary.main([str(tmp_path)])
    text = (tmp_path / "summary.md").read_text()
    assert "Machine: NVIDIA H200; torch 2.11;" in text
    assert ("Losses on the same draws (train): masked-only 20.001, all-tokens 20, relative difference 5.0e-05, "
            "tolerance 2e-02: agree") in text
    assert "Losses on the same draws (train_ckpt): masked-only 20.001, all-tokens 20, relative difference 5.0e-05, " \
           "tolerance 1e-05: DIFFER" in text


def test_losses_agree_within_the_precision_s_tolerance():
    assert bench_train.losses_agree({"masked_only": 20.0, "all_tokens": 20.0}, "fp32")["agree"]
    assert not bench_train.losses_agree({"masked_only": 20.001, "all_tokens": 20.0}, "fp32")["agree"]
    assert bench_train.losses_agree({"masked_only": 20.2, "all_tokens": 20.0}, "bf16")["agree"]
    assert not bench_train.losses_agree({"masked_only": 20.5, "all_tokens": 20.0}, "bf16")["agree"]
    assert bench_train.losses_agree({"masked_only": 0.0, "all_tokens": 0.02}, "bf16")["agree"]  # at the tolerance
    near_zero = bench_train.losses_agree({"masked_only": 0.001, "all_tokens": 0.0}, "bf16")  # not divided by 0
    assert near_zero == {"relative_difference": 0.001, "tolerance": 2e-2, "agree": True}


def test_bench_train_writes_what_it_measured_before_a_kill(monkeypatch, tmp_path):
    """The JSON is written after the timing and after each peak-memory measurement: a run killed while it
    measures the second path's memory leaves the timings and the first path's peak."""
    def peak_in_child(args, path):
        if path == "all_tokens":
            raise KeyboardInterrupt  # stands for the part's timeout
        return 123.0, 45.0
    monkeypatch.setattr(bench_train, "peak_memory_in_child", peak_in_child)
    path = tmp_path / "train.json"
    with pytest.raises(KeyboardInterrupt):
        bench_train.main(TINY[:-4] + ["--batch_size", "2", "--steps", "1", "--repeats", "1", "--json", str(path)])
    res = json.loads(path.read_text())
    assert res["masked_only"]["peak_memory_mib"] == 123.0 and res["masked_only"]["rss_before_steps_mib"] == 45.0
    assert "peak_memory_mib" not in res["all_tokens"] and res["all_tokens"]["steps_per_s"] > 0
    assert res["losses_agree"]["agree"] and "machine_after" not in res


def test_bench_sampling_peak_is_the_most_above_what_was_allocated_over_every_call():
    """A side's peak memory: the most MiB a call allocates above what was allocated before it, the maximum
    over its first call (a capture that keeps a pool) and its timed runs; what exists before is not counted."""
    import torch
    side = bench_sampling.Side("cuda_graphs", None, torch.device("cpu"), False, memory=True)
    kept = []
    weights = torch.empty(2 ** 20)  # 4 MiB before any call: not counted

    def capture():  # keeps 1 MiB (a pool), 3 MiB at its most
        kept.append(torch.empty(2 ** 18))
        scratch = torch.empty(2 ** 19)
        weights.view(-1, 2).add_(1)  # an in-place op on what was there: nothing new
        del scratch

    def replay(values):
        return lambda: torch.empty(values)

    side.call(capture)
    assert side.peak_mib == 3.0 and side.times == []
    side.run(replay(2 ** 18))  # 1 MiB
    assert side.peak_mib == 3.0  # the most over every call, not the last call's 1 MiB
    side.run(replay(2 ** 19 + 2 ** 18))  # 3 MiB
    assert side.peak_mib == 3.0 and len(side.times) == 2
    side.run(replay(2 ** 20 + 2 ** 16))  # 4.25 MiB: above the capture's
    assert side.peak_mib == 4.25
    cpu = bench_sampling.Side("eager", None, torch.device("cpu"), False)  # CPU default: not measured
    cpu.run(replay(2 ** 18))
    assert cpu.peak_mib is None and len(cpu.times) == 1


def test_cuda_tests_plugin_keeps_a_skip_only_when_it_asks_for_cuda():
    """needs_cuda: a test that skips for another reason, or asks for CUDA without skipping, is not a CUDA test;
    one that does both is, and so is a skipif whose reason names CUDA in any case."""
    from types import SimpleNamespace

    import torch

    from bench.cuda_tests import needs_cuda

    def skips_for_data():
        pytest.skip("no data")

    def asks_only():
        return torch.cuda.is_available()

    def skips_without_cuda():
        if not torch.cuda.is_available():
            pytest.skip("needs CUDA")
    marker = SimpleNamespace(kwargs={"reason": "Needs a CUDA device"})

    def item(function, markers=()):
        return SimpleNamespace(function=function, iter_markers=lambda name: list(markers))
    assert [needs_cuda(item(f)) for f in (skips_for_data, asks_only, skips_without_cuda)] == [False, False, True]
    assert needs_cuda(item(skips_for_data, [marker]))


CUDA_STANDINS = '''
import os
import time
import pytest

@pytest.mark.skipif(False, reason="needs a CUDA device")  # kept by its reason; runs here
@pytest.mark.parametrize("compile", [True, False])
@pytest.mark.parametrize("case", [1, 2])
def test_on_cuda(case, compile):
    time.sleep(float(os.environ["STANDIN_SECONDS"]))

def test_cpu_only():
    pass
'''


@pytest.mark.parametrize("seconds, ran", [(None, 4), ("2.5", 2), ("0", 0)])
def test_cuda_tests_plugin_keeps_cuda_tests_compile_last_and_stops_at_its_deadline(tmp_path, seconds, ran):
    """The plugin's selection, its order (compile variants after the rest, file order otherwise) and its
    deadline: a test due after CUDA_TESTS_SECONDS is skipped, so pytest still writes its report. With a
    deadline the tests take 1.5 s each: the second starts at 1.5 s (+ collection, well under 1 s), the
    third at 3 s."""
    import xml.etree.ElementTree as ET
    (tmp_path / "test_standins.py").write_text(CUDA_STANDINS)
    env = {k: v for k, v in os.environ.items() if k != "CUDA_TESTS_SECONDS"}
    if seconds is not None:
        env["CUDA_TESTS_SECONDS"] = seconds
    env.update(PYTHONPATH=str(REPO), STANDIN_SECONDS="0" if seconds is None else "1.5")
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "bench.cuda_tests", "-p", "no:cacheprovider",
                          str(tmp_path), "--junitxml", str(tmp_path / "report.xml")], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    cases = ET.parse(tmp_path / "report.xml").getroot().iter("testcase")
    order = [(case.get("name"), case.find("skipped") is None) for case in cases]
    assert [name for name, _ in order] == ["test_on_cuda[1-False]", "test_on_cuda[2-False]",
                                           "test_on_cuda[1-True]", "test_on_cuda[2-True]"]
    assert [ran_ for _, ran_ in order] == [True] * ran + [False] * (4 - ran)


STUCK_STANDINS = '''
import os
import pathlib
import time
import pytest

@pytest.mark.skipif(False, reason="needs a CUDA device")
def test_quick():
    pass

@pytest.mark.skipif(False, reason="needs a CUDA device")
def test_stuck():
    pathlib.Path(os.environ["STARTED_FILE"]).touch()
    time.sleep(120)
'''


def test_cuda_tests_plugin_writes_its_report_when_killed_by_timeout(tmp_path):
    """A test that outlives the part's limit (a cold compile) is ended by `timeout`'s SIGTERM: the report of
    the tests that ran must still be written (SIGTERM's default action leaves no --junitxml at all)."""
    import signal
    import time
    import xml.etree.ElementTree as ET
    (tmp_path / "test_stuck.py").write_text(STUCK_STANDINS)
    started = tmp_path / "started"
    env = {**{k: v for k, v in os.environ.items() if k != "CUDA_TESTS_SECONDS"}, "PYTHONPATH": str(REPO),
           "STARTED_FILE": str(started)}
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "bench.cuda_tests", "-p", "no:cacheprovider",
                             str(tmp_path), "--junitxml", str(tmp_path / "report.xml")], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while not started.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert started.exists(), proc.communicate()[0] if proc.poll() is not None else "test_stuck never started"
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=60)[0]
    finally:
        proc.kill()
    assert proc.returncode == 2, out  # pytest's "interrupted"
    cases = {case.get("name"): case for case in ET.parse(tmp_path / "report.xml").getroot().iter("testcase")}
    assert "test_quick" in cases and not list(cases["test_quick"]), out


def test_sampling_goals_take_our_best_side_at_arinar_b_s_setting():
    """Issue 30: >= 40 images/s at batch 256, <= 0.15 s/image at batch 1, compilation <= 60 s; the
    baseline, other settings and other models never count."""
    def row(part, batch, side, images_per_s, first=None, model="mar_base", steps=64, cfg=4.5):
        return {"part": part, "batch": batch, "side": side, "steps": steps, "model": model, "cfg": cfg,
                "images_per_s": images_per_s, "s_per_image": None if images_per_s is None else 1 / images_per_s,
                "first_call_s": first}
    rows = [row("sampling_b256", 256, "cuda_graphs", 25.3, 14.0), row("compile_b256", 256, "cuda_graphs+compile",
            41.0, 55.0), row("sampling_b256", 256, "baseline", 99.0), row("x", 256, "eager", 90.0, cfg=3.0),
            row("y", 256, "eager", 95.0, model="mar_large"), row("z", 256, "eager", 97.0, steps=16),
            row("sampling_b1", 1, "cuda_graphs", 1 / 0.336), row("compile_b1", 1, "cuda_graphs+compile", 1 / 0.31)]
    goals = gpu_summary.sampling_goals(rows)
    assert [(g["side"], g["met"]) for g in goals] == [("cuda_graphs+compile", True), ("cuda_graphs+compile", False),
                                                      ("cuda_graphs+compile", True)]
    assert [g["value"] for g in goals] == [41.0, pytest.approx(0.31), 55.0]
    assert [g["met"] for g in gpu_summary.sampling_goals(rows[2:6])] == [None, None, None]


def test_the_gpu_commands_parse_and_name_real_models(tmp_path):
    """The GPU run's own commands (--dry-run prints them, runs nothing): each benchmark's flags parse, and its
    model, or each side of the families part, builds (on the meta device: nothing allocated). On a CPU the
    script runs only its --cpu-smoke commands, so a typo in the GPU ones would cost a GPU run."""
    import importlib
    import shlex

    import torch

    from bench.bench_families import side_configs
    from bench.config import build_model
    env = {**os.environ, "PYTHON": sys.executable}
    out = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), str(tmp_path / "gpu"), "--dry-run"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = dict(line.split(": ", 1) for line in out.stdout.splitlines())
    assert [name.split()[0] for name in lines] == ["eager_rows", "cuda_tests", "families", "sampling_b256",
                                                   "sampling_b1", "train", "train_ckpt", "heads", "compile_b256",
                                                   "compile_b1", "compile_ways"]
    assert not (tmp_path / "gpu").exists()
    for name, command in lines.items():
        words = shlex.split(command)
        if words[2] == "pytest":
            continue
        assert words[1] == "-m" and "--device" in words and words[words.index("--device") + 1] == "cuda", name
        args = importlib.import_module(words[2]).parse_args(words[3:])
        with torch.device("meta"):
            if words[2] == "bench.bench_families":
                names = [c.model for c in side_configs(args)]
                assert names == ["mar_base", "causal_base", "var_base", "mvar_base"], names
            else:
                assert build_model(args).config.model == "mar_base", name


def test_summary_compile_rows_whole_against_blocks(tmp_path):
    """The compile_ways part's rows: per Step both ways and their ratio; a part killed after the first way
    still shows it, without a ratio."""
    row = {"first_s": 50.0, "later_s": 2.0, "graphs": 1}
    ways = {"whole": {"mar.outer": {**row, "compile_s": 48.0}},
            "blocks": {"mar.outer": {**row, "compile_s": 12.0, "graphs": 2}}}
    (tmp_path / "compile_ways.json").write_text(json.dumps({"args": {"model": "mar_base"}, "ways": ways}))
    (tmp_path / "parts.tsv").write_text("compile_ways\t0\t70\t150\t\n")
    gpu_summary.main([str(tmp_path)])
    assert "| mar_base | mar.outer | 48.0 | 12.0 | 4.00 |" in (tmp_path / "summary.md").read_text()
    del ways["blocks"]
    (tmp_path / "compile_ways.json").write_text(json.dumps({"args": {"model": "mar_base"}, "ways": ways}))
    gpu_summary.main([str(tmp_path)])
    assert "| mar_base | mar.outer | 48.0 | – | – |" in (tmp_path / "summary.md").read_text()
    ways["blocks"] = {"mar.outer": {**row, "compile_s": 0.0}}  # nothing to divide by: no ratio
    (tmp_path / "compile_ways.json").write_text(json.dumps({"args": {"model": "mar_base"}, "ways": ways}))
    assert [r["ratio"] for r in gpu_summary.compile_rows(tmp_path)] == [None]


CUDA_TESTS_XML = '''<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" errors="1" failures="1" skipped="2" tests="6">
<testcase classname="tests.test_a" name="test_ok"/>
<testcase classname="tests.test_a" name="test_broken"><failure message="assert"/></testcase>
<testcase classname="tests.test_b" name="test_setup"><error message="fixture"/></testcase>
<testcase classname="tests.test_b" name="test_ok"/>
<testcase classname="tests.test_b" name="test_late"><skipped message="deadline"/></testcase>
<testcase classname="tests.test_b" name="test_later"><skipped message="deadline"/></testcase>
</testsuite></testsuites>'''


def test_summary_counts_a_killed_part_the_failed_tests_and_unchecked_losses(tmp_path):
    """rc 137 (SIGKILL after `timeout -k`) is a timeout like 124; of 6 tests, 1 failure + 1 error (both listed,
    an error too) + 2 skipped leave 2 passed; a training part that recorded no losses_agree gets the relative
    difference |0.5 - 0.25| / max(1, 0.25) = 0.25 worked out here and no verdict (not "agree")."""
    (tmp_path / "parts.tsv").write_text("train\t137\t90\t90\t\ncuda_tests\t1\t50\t300\t\n")
    (tmp_path / "cuda_tests.xml").write_text(CUDA_TESTS_XML)
    res = {"args": {"batch_size": 64}, "losses": {"masked_only": 0.5, "all_tokens": 0.25}}
    (tmp_path / "train.json").write_text(json.dumps(res))
    gpu_summary.main([str(tmp_path)])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [p["status"] for p in summary["parts"]] == ["timed out", "failed (rc 1)"]
    assert summary["tests"] == {"tests": 6, "failures": 1, "errors": 1, "skipped": 2, "passed": 2,
                                "failed_ids": ["tests.test_a::test_broken", "tests.test_b::test_setup"]}
    text = (tmp_path / "summary.md").read_text()
    assert ("2 passed, 2 failed, 2 skipped: tests.test_a::test_broken, tests.test_b::test_setup") in text
    assert ("Losses on the same draws (train): masked-only 0.5, all-tokens 0.25, relative difference 2.5e-01: "
            "no verdict recorded") in text


def test_fmt_flops_changes_unit_at_exactly_a_thousand():
    assert [gpu_summary.fmt_flops(v) for v in (1e12, 999e9, 1e3, 999.0, 0, None)] == [
        "1 TFLOP", "999 GFLOP", "1 kFLOP", "999 FLOP", "0", "–"]


def test_sampling_rows_fill_in_speedup_fraction_and_s_per_image(tmp_path):
    """What sampling_rows works out for a part that left it out, from numbers picked by hand:
    sampling_b1's baseline runs 3, 1, 2 s (median 2), ours 0.4, 0.1, 0.5 s (median 0.4): 2 / 0.4 = 5x (medians,
    not minima: 1 / 0.1 = 10x); ours' fraction of a 1e15 peak: 2e12 FLOP x 2.5 images/s = 0.005; the baseline
    gets no speed-up over itself and keeps the fraction it recorded. sampling_b256 (256 images in 2 s): 1/128
    s per image, not 2 s per batch (FLOPs from b1: 8e12 x 16 / 1e15 = 0.128, 2e12 x 128 / 1e15 = 0.256).
    compile_b1 takes sampling_b1's baseline (2 / 0.2 = 10x), not b256's, and is one row though its first call
    is recorded too; compile_b256 runs 32 steps: no baseline of the same work, no speed-up. Peak 10,240 MiB
    shows as 10.0 GiB."""
    def part(batch, sides, num_iter=64, **extra):
        args = {"batch_size": batch, "num_iter": num_iter, "cfg": 4.5, "model": "mar_base"}
        return {"args": args, "peak_flops": 1e15, "flops_per_image": {}, **extra, "sides": {
            name: {"seconds": seconds, "images_per_s": batch / median(seconds), "flops_per_image": None,
                   "fraction_of_peak": fraction, "peak_memory_mib": 10240.0}
            for name, (seconds, fraction) in sides.items()}}
    parts = {"sampling_b1": part(1, {"baseline": ([3.0, 1.0, 2.0], 0.123), "cuda_graphs": ([0.4, 0.1, 0.5], None)},
                                 flops_per_image={"ours": 2e12, "baseline": 8e12}),
             "sampling_b256": part(256, {"baseline": ([16.0], None), "cuda_graphs": ([2.0], None)}),
             "compile_b1": part(1, {"cuda_graphs+compile": ([0.2], None)}, first_call_s={"cuda_graphs+compile": 30.0}),
             "compile_b256": part(256, {"cuda_graphs+compile": ([1.0], None)}, num_iter=32)}
    for name, res in parts.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(res))
    (tmp_path / "parts.tsv").write_text("".join(f"{name}\t0\t10\t90\t\n" for name in parts))
    gpu_summary.main([str(tmp_path)])
    rows = json.loads((tmp_path / "summary.json").read_text())["sampling"]
    got = [(r["part"], r["side"], r["speedup"], r["s_per_image"], r["fraction_of_peak"]) for r in rows]
    assert got == [("sampling_b1", "baseline", None, pytest.approx(2.0), 0.123),
                   ("sampling_b1", "cuda_graphs", pytest.approx(5.0), pytest.approx(0.4), pytest.approx(0.005)),
                   ("sampling_b256", "baseline", None, pytest.approx(1 / 16), pytest.approx(0.128)),
                   ("sampling_b256", "cuda_graphs", pytest.approx(8.0), pytest.approx(1 / 128), pytest.approx(0.256)),
                   ("compile_b1", "cuda_graphs+compile", pytest.approx(10.0), pytest.approx(0.2), pytest.approx(0.01)),
                   ("compile_b256", "cuda_graphs+compile", None, pytest.approx(1 / 256), None)]
    assert "| sampling_b1 | 1 | 64 | cuda_graphs | 2.500 | 0.400 | 2 TFLOP | 0.5 | 5.00 | – | 10.0 |" in (
        tmp_path / "summary.md").read_text()


def test_a_part_at_another_precision_or_cfg_sampler_borrows_no_baseline(tmp_path):
    """compile_b1 at fp32 (or with the exact CFG sampler) against sampling_b1's bf16 (SIR) baseline would be a
    speed-up over another job: it gets none. Bug caught: same_work comparing the model and steps only."""
    def part(sides, **args):
        args = {"batch_size": 1, "num_iter": 64, "cfg": 4.5, "model": "mar_base", "precision": "bf16",
                "cfg_sampler": "sir", **args}
        return {"args": args, "flops_per_image": {},
                "sides": {name: {"seconds": [seconds], "images_per_s": 1 / seconds} for name, seconds in sides.items()}}
    (tmp_path / "sampling_b1.json").write_text(json.dumps(part({"baseline": 2.0, "cuda_graphs": 0.5})))
    for other in ({"precision": "fp32"}, {"cfg_sampler": "exact"}, {}):
        (tmp_path / "compile_b1.json").write_text(json.dumps(part({"cuda_graphs+compile": 0.25}, **other)))
        rows = {r["part"]: r for r in gpu_summary.sampling_rows(tmp_path) if r["side"] == "cuda_graphs+compile"}
        assert rows["compile_b1"]["speedup"] == (pytest.approx(8.0) if not other else None), other


def test_goals_are_met_at_exactly_their_bounds_and_count_only_their_setting():
    """A goal is ">=" or "<=": a value at the bound meets it (40 images/s, 0.15 s/image, 60 s; the family's 200
    images/s and 0.1 s/image). A faster family row with another head, or either figure unmeasured, does not."""
    def row(batch, side, images_per_s, s_per_image, first=None):
        return {"part": "p", "batch": batch, "side": side, "steps": 64, "model": "mar_base", "cfg": 4.5,
                "images_per_s": images_per_s, "s_per_image": s_per_image, "first_call_s": first}
    rows = [row(256, "cuda_graphs+compile", 40.0, 0.025, 60.0), row(1, "cuda_graphs", 1 / 0.15, 0.15)]
    assert [g["met"] for g in gpu_summary.sampling_goals(rows)] == [True, True, True]

    def family(batch, images_per_s, s_per_image, head="arinar"):
        return {"family": "causal", "model": "causal_base", "head": head, "batch": batch,
                "images_per_s": images_per_s, "s_per_image": s_per_image}
    at_bounds = [family(256, 200.0, 0.005), family(1, 10.0, 0.1)]
    assert [g["met"] for g in gpu_summary.family_goals(at_bounds)] == [True]
    other_head = [family(256, 150.0, 1 / 150), family(1, 10.0, 0.1), family(256, 900.0, 1 / 900, head="gmm")]
    assert [g["met"] for g in gpu_summary.family_goals(other_head)] == [False]
    assert [g["met"] for g in gpu_summary.family_goals(other_head[2:] + at_bounds[1:])] == [None]


def test_heads_do_not_take_arinar_from_a_sampling_part_at_another_cfg(tmp_path):
    """arinar_rows: a sampling part at cfg 3.0 (same model, steps, backend) is not ARINAR's setting (cfg 4.5);
    a heads part's own ARINAR row wins over a sampling part's; the backend a heads part ran, from its flags."""
    other = sampling_part(1, 64, {"cuda_graphs": 8.0})
    other["args"]["cfg"] = 3.0
    (tmp_path / "sampling_b1.json").write_text(json.dumps(other))
    heads_args = {"device": "cuda", "cuda_graphs": None, "compile": False, "model": "mar_base", "precision": "bf16",
                  "cfg_sampler": "sir", "temperature": 1.0}
    rows = [{"setting": "mar_64", "head": "diffloss", "num_iter": 64, "cfg": 2.9, "batch_size": 1, "seconds": [0.5],
             "images_per_s": 2.0, "flops_per_image": 1e12, "fraction_of_peak": 0.2}]
    (tmp_path / "heads.json").write_text(json.dumps({"args": heads_args, "rows": rows}))
    assert [(r["setting"], r["vs_arinar"]) for r in gpu_summary.heads_rows(tmp_path)] == [("mar_64", None)]
    other["args"]["cfg"] = 4.5  # the same part at ARINAR's cfg does stand in: 8 / 2 = 4x
    (tmp_path / "sampling_b1.json").write_text(json.dumps(other))
    assert [(r["setting"], r["vs_arinar"]) for r in gpu_summary.heads_rows(tmp_path)] == [
        ("arinar (sampling_b1, cuda_graphs)", 1.0), ("mar_64", 4.0)]
    # a heads part that timed ARINAR itself (4 images/s) uses its own row, not the sampling part's 8
    own = {**rows[0], "setting": "arinar", "head": "arinar", "num_iter": 64, "cfg": 4.5, "images_per_s": 4.0}
    (tmp_path / "heads.json").write_text(json.dumps({"args": heads_args, "rows": [own] + rows}))
    assert [(r["setting"], r["vs_arinar"]) for r in gpu_summary.heads_rows(tmp_path)] == [("arinar", 1.0),
                                                                                         ("mar_64", 2.0)]
    assert [gpu_summary.heads_backend(a) for a in ({"device": "cuda", "compile": True}, {"device": "cuda"},
                                                   {"device": "cpu"}, {"device": "cuda", "cuda_graphs": False})] == [
        "cuda_graphs+compile", "cuda_graphs", "eager", "eager"]
