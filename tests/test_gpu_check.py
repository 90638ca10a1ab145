"""bench/gpu_check.sh and its summary, on CPU: a part's JSON reaches the table, a failing or timed-out
part is reported, and numbers one part lacks are taken from the part that has them."""
import json
import os
import subprocess
import sys

import pytest

from bench import bench_sampling, gpu_summary
from bench.config import median
from tests.conftest import REPO

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = ["--width", "32", "--num_heads", "4", "--enc_dec_depth", "1", "--inner_ar_width", "32", "--img_size", "64",
        "--class_num", "10", "--device", "cpu", "--warmup", "0", "--num_iter", "2", "--backends", "eager"]


def test_summary_reads_what_the_benchmarks_write(tmp_path):
    bench_sampling.main(TINY + ["--batch_size", "1", "--repeats", "1", "--baseline_repeats", "1",
                                "--json", str(tmp_path / "sampling_b1.json")])
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
    (tmp_path / "parts.tsv").write_text("sampling_b1\t0\t5\t120\t\nheads\t1\t3\t150\tValueError: x\n"
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


def test_script_runs_a_part_and_writes_the_table(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    out = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), str(tmp_path), "--cpu-smoke",
                          "--parts", "eager_rows compile_b1"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    parts = [line.split("\t")[:2] for line in (tmp_path / "parts.tsv").read_text().splitlines()]
    assert parts == [["eager_rows", "0"], ["compile_b1", "1"]]  # no CUDA here: compile fails, and is reported
    assert json.loads((tmp_path / "eager_rows.json").read_text())["sides"]["eager"]["images_per_s"] > 0
    assert "| eager_rows | ok |" in out.stdout and "| compile_b1 | failed (rc 1) |" in out.stdout
    assert (tmp_path / "summary.md").read_text() in out.stdout


def test_largest_batch_fits_the_line_through_two_peaks():
    """Peaks of 12,000 MiB at batch 16 and 30,000 at 64: 375 MiB an image on 6,000 fixed. 90% of 40 GiB is
    36,864 MiB: (36,864 - 6,000) / 375 = 82.3 -> 82; of 80 GiB 73,728 MiB: 180.6 -> 180."""
    from bench.bench_train import largest_batch
    peaks = {64: 30_000.0, 16: 12_000.0}
    assert (largest_batch(peaks, 40), largest_batch(peaks, 80)) == (82, 180)
    assert largest_batch({1: 50_000.0, 2: 60_000.0}, 40) == 0  # the fixed part alone is too big
    with pytest.raises(ValueError, match="does not grow"):
        largest_batch({16: 100.0, 64: 100.0}, 40)


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
