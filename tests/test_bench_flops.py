"""The benchmarks' FLOPs and fraction-of-peak columns (plumbing only: no timing is asserted)."""
import pytest
import torch

from bench import bench_heads, bench_sampling, bench_train
from bench.config import build_model
from sampling import EagerBackend
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


def test_bench_train_divides_each_timed_run_by_its_steps(pretend_peak, monkeypatch):
    """--steps 3 and timed runs (a stand-in for time_runs) of 6, 3 and 9 s: 2, 1 and 3 s per step; the median
    2 s gives 0.5 steps/s and, at batch 2, 1 image/s; the all-tokens path is timed the same: speed-up 1."""
    monkeypatch.setattr(bench_train, "time_runs", lambda fn, device, warmup, repeats: [6.0, 3.0, 9.0])
    res = bench_train.main(TINY + ["--batch_size", "2", "--steps", "3", "--no_memory"])
    for path in bench_train.PATHS:
        row = res[path]
        assert (row["s_per_step"], row["steps_per_s"], row["images_per_s"]) == ([2.0, 1.0, 3.0], 0.5, 1.0)
        assert row["mfu"] == pytest.approx(row["flops_per_step"] / 2.0 / PEAK)
    assert res["speedup"] == 1.0


def test_bench_heads_reports_flops_per_image(pretend_peak):
    res = bench_heads.main(TINY + ["--only", "arinar", "--batch_sizes", "2"])
    (row,) = res["rows"]
    assert row["flops_per_image"] > 0
    assert row["fraction_of_peak"] == pytest.approx(row["flops_per_image"] * row["images_per_s"] / PEAK)


def test_bench_heads_ratios_are_seconds_per_image_over_arinar_s():
    """ARINAR at 4 images/s, MAR at 1, GMM at 8: MAR takes 4x ARINAR's seconds per image, GMM 0.5x; a batch
    without ARINAR gets no ratios (an inverted ratio would read 0.25x and 2x)."""
    rows = [{"setting": s, "batch_size": b, "images_per_s": ips}
            for s, b, ips in (("arinar", 1, 4.0), ("mar_64", 1, 1.0), ("gmm", 1, 8.0), ("mar_64", 2, 3.0))]
    assert bench_heads.ratios(rows) == {1: {"mar_64": 4.0, "gmm": 0.5}}


def test_bench_heads_times_and_counts_each_setting_at_its_own_steps_and_cfg(pretend_peak, monkeypatch):
    """Every sample_tokens call, the eager FLOP count and the timed runs alike, uses the setting's steps and
    cfg (a count without cfg would miss the unconditional half). Timed runs of 0.5, 0.25 and 2 s per batch
    of 2: 2 / 0.5 = 4 images/s (the median, not the fastest run); FLOPs per image counted on 2 images equal
    a count on 1 image done here; fraction of peak: FLOPs per image x 4 / PEAK."""
    calls, models, heads = [], [], []

    def build(args, **overrides):  # records the head asked for, builds ARINAR's (the smallest) every time
        heads.append(overrides.get("head", "arinar"))
        model = build_model(args)
        sample = model.sample_tokens
        models.append((model, sample))

        def recorded(bsz, num_iter, cfg=1.0, **kwargs):
            calls.append((bsz, num_iter, cfg, type(kwargs["backend"]).__name__))
            return sample(bsz, num_iter, cfg=cfg, **kwargs)
        model.sample_tokens = recorded
        return model

    def three_runs(fn, device, warmup, repeats):
        fn()
        return [0.5, 0.25, 2.0]
    monkeypatch.setattr(bench_heads, "build_model", build)
    monkeypatch.setattr(bench_heads, "time_runs", three_runs)
    monkeypatch.setattr(bench_heads, "SETTINGS", (("arinar", "arinar", 2, 4.5), ("other", "gmm", 3, 2.0)))
    res = bench_heads.main(TINY + ["--batch_sizes", "2", "--flops_batch", "2"])
    assert heads == ["arinar", "gmm"]  # each setting's own head
    assert calls == [(2, 2, 4.5, "EagerBackend"), (2, 2, 4.5, "EagerBackend"),
                     (2, 3, 2.0, "EagerBackend"), (2, 3, 2.0, "EagerBackend")]
    model, sample = models[0]
    one = flops.count_flops(sample, 1, 2, cfg=4.5, labels=torch.tensor([0]), backend=EagerBackend(model))[0]
    arinar, other = res["rows"]
    assert arinar["flops_per_image"] == one > 0
    for row in (arinar, other):
        assert (row["images_per_s"], row["seconds"]) == (4.0, [0.5, 0.25, 2.0])
        assert row["fraction_of_peak"] == pytest.approx(row["flops_per_image"] * 4.0 / PEAK)
