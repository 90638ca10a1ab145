"""The benchmarks' FLOPs and fraction-of-peak columns (plumbing only: no timing is asserted)."""
import pytest

from bench import bench_heads, bench_sampling, bench_train
from util import flops

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = ["--width", "32", "--num_heads", "4", "--enc_dec_depth", "1", "--inner_ar_width", "32", "--img_size", "64",
        "--class_num", "10", "--device", "cpu", "--warmup", "0", "--repeats", "1"]
PEAK = 1e12


@pytest.fixture
def pretend_peak(monkeypatch):
    monkeypatch.setattr(flops, "peak_flops", lambda device, precision: PEAK)


def test_bench_sampling_counts_both_sides(pretend_peak):
    res = bench_sampling.main(TINY + ["--batch_size", "3", "--num_iter", "3", "--cfg", "2.0", "--baseline_repeats", "1",
                                      "--backends", "eager"])
    ours, base = res["sides"]["eager"], res["sides"]["baseline"]
    # the release runs the whole decoder at every step, we run its last block only where tokens are drawn
    assert 0 < ours["flops_per_image"] < base["flops_per_image"]
    for row in (ours, base):
        assert row["fraction_of_peak"] == pytest.approx(row["flops_per_image"] * row["images_per_s"] / PEAK)
    assert ours["speedup"] == pytest.approx(base["seconds"][0] / ours["seconds"][0])


def test_bench_sampling_flops_do_not_depend_on_the_counted_batch():
    counts = [bench_sampling.main(TINY + ["--batch_size", "4", "--num_iter", "3", "--baseline_repeats", "0",
                                          "--flops_batch", str(b)])["flops_per_image"]["ours"] for b in (1, 4)]
    assert counts[0] == counts[1] > 0


def test_bench_train_reports_images_per_s_and_mfu(pretend_peak):
    res = bench_train.main(TINY + ["--batch_size", "2", "--steps", "1", "--no_memory"])
    for path in bench_train.PATHS:
        row = res[path]
        assert row["images_per_s"] == pytest.approx(2 * row["steps_per_s"])
        assert row["mfu"] == pytest.approx(row["flops_per_step"] * row["steps_per_s"] / PEAK)


def test_bench_heads_reports_flops_per_image(pretend_peak):
    res = bench_heads.main(TINY + ["--only", "arinar", "--batch_sizes", "2"])
    (row,) = res["rows"]
    assert row["flops_per_image"] > 0
    assert row["fraction_of_peak"] == pytest.approx(row["flops_per_image"] * row["images_per_s"] / PEAK)
