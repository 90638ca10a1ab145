"""bench/bench_families.py (MAR family against others, one run), its peak-memory counter, and its part
in bench/gpu_check.sh and the summary. Plumbing and counts only: no timing is asserted."""
import json
import os
import subprocess
import sys
import types

import pytest
import torch

from bench import bench_families, gpu_summary
from bench.memory import peak_memory
from tests.conftest import REPO

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = ["--family", "causal", "--width", "32", "--num_heads", "4", "--enc_dec_depth", "1", "--depth", "2",
        "--inner_ar_width", "32", "--img_size", "64", "--class_num", "10", "--device", "cpu", "--warmup", "1",
        "--repeats", "1", "--cfg", "2.0"]
SIZES = TINY[2:]  # the same without --family
MB = 2 ** 20


def test_peak_memory_counts_what_the_call_holds_at_once():
    weights = torch.randn(256, MB // 1024)  # 1 MiB made before the call: not counted

    def work():
        a = torch.empty(MB // 4)              # 1 MiB
        b = torch.empty(MB // 2)              # 2 MiB, 3 held
        del a                                 # 2 held
        b.view(-1, 2).t().add_(1)             # a view and an in-place op: nothing new
        c = weights.t().contiguous()          # 1 MiB (the view of the old tensor is not new), 3 held
        d = c @ weights                       # 1024 x 1024 floats = 4 MiB, 7 held
        return d[0, 0] + b[0]                 # 4 bytes more while d, c and b are held

    peak, _ = peak_memory(work, "cpu")
    assert peak == 7 * MB + 4


def test_peak_memory_keeps_the_most_after_a_smaller_later_allocation():
    """1 MiB held and freed, then 64 bytes: the peak is 1 MiB, not what is live at the last allocation."""
    def work():
        a = torch.empty(MB // 4)
        del a
        return torch.empty(16)

    assert peak_memory(work, "cpu")[0] == MB


def test_peak_memory_on_cuda_is_the_peak_above_what_was_allocated_before(monkeypatch):
    """CUDA: the allocator's figures (stand-ins here): 100 MiB allocated before the call, 350 MiB at its most
    during it: 250 MiB, and the call's result."""
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 100 * MB)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 350 * MB)
    assert peak_memory(lambda x: x + 1, "cuda", 1) == (250 * MB, 2)


def test_finish_row_takes_the_median_run_and_flops_per_image_over_the_counted_batch(monkeypatch):
    """A batch of 4 timed at 2, 0.5 and 1 s: 4 / 1 (the median, not the fastest run) = 4 images/s, 0.25 s
    per image (not 1 s per batch); 1e9 FLOP per image x 4 / 1e12 = 0.004 of the peak; the pieces' medians.
    count_flops_per_image: a stand-in count of 5e9 per label sampled, over --flops_batch 3 = 5e9.
    Side.sample passes every sampling flag on."""
    row = {"batch_size": 4, "seconds": [2.0, 0.5, 1.0],
           "pieces": [{"outer": 0.5, "head": 1.0}, {"outer": 0.25, "head": 0.5}, {"outer": 0.1, "head": 0.8}]}
    bench_families.finish_row(row, 1e9, 1e12)
    assert (row["images_per_s"], row["s_per_image"], row["fraction_of_peak"]) == (4.0, 0.25, pytest.approx(0.004))
    assert row["breakdown_s"] == {"outer": 0.25, "head": 0.8}
    monkeypatch.setattr(bench_families, "make_backend", lambda model, **kwargs: "eager")
    monkeypatch.setattr(bench_families.flops, "count_flops", lambda fn, labels, args, backend: (5e9 * labels.numel(),
                                                                                              None))
    side = bench_families.Side.__new__(bench_families.Side)
    side.model = types.SimpleNamespace(config=types.SimpleNamespace(class_num=10))
    args = types.SimpleNamespace(flops_batch=3, cfg_sampler="sir", precision="fp32")
    assert bench_families.count_flops_per_image(side, args, "cpu") == 5e9
    calls = []  # Side.sample: every sampling flag reaches the model (a constant cfg schedule too)
    side.model = types.SimpleNamespace(sample_tokens=lambda *a, **k: calls.append((a, k)))
    side.backend = "graphs"
    args = types.SimpleNamespace(num_iter=7, cfg=3.0, cfg_schedule="constant", temperature=0.9)
    side.sample(torch.arange(2), args)
    assert calls[0][0] == (2, 7) and {k: v for k, v in calls[0][1].items() if k != "labels"} == {
        "cfg": 3.0, "cfg_schedule": "constant", "temperature": 0.9, "backend": "graphs"}


def test_causal_outer_passes_each_token_once_and_mar_s_every_step():
    """FLOPs per image of 16 tokens (4x4) in 1, 2 and 16 steps. The causal family passes each token through
    its self-attention half once, when it joins the KV cache, and the tokens of the last step never join
    it; everything else (the queries, the head) is the same whatever the steps. So its count is affine
    in the tokens appended: 0 (1 step), 5 (2 steps: cosine leaves floor(16 cos(pi/4)) = 11 for the last
    step) and 15 (one a step). MAR's outer runs the whole sequence at every step: its count grows with
    the steps. The JSON's ratios are the rows' ratios."""
    runs = {steps: bench_families.main(TINY + ["--num_iter", str(steps), "--batch_sizes", "2"]) for steps in (1, 2, 16)}
    count = {steps: {side["family"]: side["flops_per_image"] for side in res["sides"]} for steps, res in runs.items()}
    per_token = (count[16]["causal"] - count[1]["causal"]) / 15
    assert per_token > 0 and count[2]["causal"] == count[1]["causal"] + 5 * per_token
    assert count[1]["mar"] < count[2]["mar"] and count[16]["mar"] > 4 * count[1]["mar"]
    res = runs[16]
    (mar_row,), (causal_row,) = (side["rows"] for side in res["sides"])
    ratios = res["ratios"]["causal_base"][2]
    assert ratios["images_per_s"] == causal_row["images_per_s"] / mar_row["images_per_s"]
    assert ratios["flops_per_image"] == count[16]["causal"] / count[16]["mar"]
    assert ratios["peak_memory"] == causal_row["peak_memory_mib"] / mar_row["peak_memory_mib"]
    assert all(row["peak_memory_mib"] > 0 and len(row["seconds"]) == 1 for row in (mar_row, causal_row))
    mar, causal = res["sides"]
    assert (mar["model"], causal["model"]) == ("mar_base", "causal_base")
    assert (mar["head"], causal["head"]) == ("arinar", "arinar")


def test_family_alone_picks_its_preset_nearest_to_the_reference_in_outer_parameters():
    """ARINAR-B's outer model has 200.5M parameters: var_base (204.4M) is nearer than mvar_base (196.5M),
    var_d16 (306M) or the tiny ones. Against mar_tiny (1,040,128 on ImageNet's tokens), mvar_tiny's 1,140,732
    is nearer than scalewise_tiny's 1,141,900, and causal_tiny is the causal one. The presets are compared as
    defined: size flags given to the benchmark apply to both sides afterwards and do not change the pick."""
    assert bench_families.nearest_preset("scalewise", "mar_base") == "var_base"
    assert bench_families.nearest_preset("causal", "mar_base") == "causal_base"
    assert bench_families.nearest_preset("scalewise", "mar_tiny") == "mvar_tiny"
    assert bench_families.nearest_preset("causal", "mar_tiny") == "causal_tiny"
    args = bench_families.parse_args(["--family", "causal", "--width", "32", "--num_heads", "4"])
    assert [c.model for c in bench_families.side_configs(args)] == ["mar_base", "causal_base"]


def test_flags_of_neither_side_and_mismatched_presets_are_refused():
    with pytest.raises(ValueError, match="--diffloss_w is a setting of none of mar_base, causal_base"):
        bench_families.main(TINY + ["--diffloss_w", "64"])
    with pytest.raises(ValueError, match="--model mar_tiny is a mar model, not --family causal"):
        bench_families.main(TINY + ["--model", "mar_tiny"])
    with pytest.raises(ValueError, match="name the family to compare"):
        bench_families.main(SIZES)
    with pytest.raises(ValueError, match="--contenders names every contender: leave out --family and --model"):
        bench_families.main(TINY + ["--contenders", "scalewise"])
    with pytest.raises(ValueError, match="--contenders var: neither a family"):
        bench_families.main(SIZES + ["--contenders", "causal", "var"])
    with pytest.raises(ValueError, match="mar_base is the reference"):
        bench_families.main(SIZES + ["--contenders", "causal", "mar"])  # mar's nearest preset is the reference
    with pytest.raises(ValueError, match="--reference_model causal_tiny is not a mar model"):
        bench_families.main(SIZES + ["--contenders", "scalewise", "--reference_model", "causal_tiny"])


def test_contenders_run_against_one_reference_in_alternation(monkeypatch, tmp_path):
    """--contenders: a family (its nearest preset) and a preset; the reference runs once in the same process,
    first calls then timed calls alternate mar, causal, scalewise; a scale-wise model takes one step per scale
    (4 on the 4x4 grid of 64-pixel images), the others --num_iter; ratios per contender preset."""
    calls = []
    sample = bench_families.Side.sample
    monkeypatch.setattr(bench_families.Side, "sample",
                        lambda self, labels, args, backend=None: calls.append(self.preset) or sample(self, labels, args,
                                                                                                 backend))
    path = tmp_path / "families.json"
    res = bench_families.main(SIZES + ["--contenders", "causal", "scalewise_tiny", "causal_base", "--num_iter", "2",
                                       "--batch_sizes", "2", "--repeats", "2", "--flops_batch", "0", "--breakdown",
                                       "--json", str(path)])
    order = ["mar_base", "causal_base", "scalewise_tiny"]
    assert calls == order * 3  # first calls, then 2 timed rounds; causal_base named twice runs once
    assert [(side["model"], side["steps"]) for side in res["sides"]] == list(zip(order, [2, 2, 4]))
    rows = {side["model"]: side["rows"][0] for side in res["sides"]}
    assert all(len(row["seconds"]) == 2 for row in rows.values())
    for row in rows.values():  # --breakdown: each timed call's split (not the first call's), inside its time
        assert len(row["pieces"]) == 2 and set(row["breakdown_s"]) == {"outer", "head"}
        assert all(0 < sum(p.values()) <= t for p, t in zip(row["pieces"], row["seconds"]))
    assert list(res["ratios"]) == ["causal_base", "scalewise_tiny"]
    for model in ("causal_base", "scalewise_tiny"):
        assert res["ratios"][model][2]["images_per_s"] == rows[model]["images_per_s"] / rows["mar_base"]["images_per_s"]
    written = json.loads(path.read_text())
    assert written["ratios"]["scalewise_tiny"]["2"] == res["ratios"]["scalewise_tiny"][2]


def test_a_failing_contender_is_recorded_and_the_others_go_on(monkeypatch, tmp_path):
    """One contender cannot be built, another runs out of CUDA memory in its timed call at batch 2 (the cache is
    emptied once): both are recorded in one line each, the reference and the rest keep their rows, and the
    summary shows the errors in its table."""
    build = bench_families.Side.build
    sample = bench_families.Side.sample

    def failing_build(self, args, device):
        if self.preset == "scalewise_tiny":
            raise ValueError("no room | at all\nsecond line")
        build(self, args, device)

    seen = []

    def failing_sample(self, labels, args, backend=None):
        seen.append((self.preset, labels.numel()))
        if seen[-1] == ("causal_base", 2) and seen.count(seen[-1]) == 2:  # its timed call at batch 2
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return sample(self, labels, args, backend)

    emptied = []
    monkeypatch.setattr(bench_families.Side, "build", failing_build)
    monkeypatch.setattr(bench_families.Side, "sample", failing_sample)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(1))
    path = tmp_path / "families.json"
    bench_families.main(SIZES + ["--contenders", "causal", "scalewise_tiny", "mvar_tiny", "--num_iter", "2",
                                 "--batch_sizes", "1", "2", "--flops_batch", "0", "--json", str(path)])
    res = json.loads(path.read_text())
    assert emptied == [1]
    assert res["ratios"]["scalewise_tiny"] == {"error": "ValueError: no room | at all second line"}
    oom = "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert res["ratios"]["causal_base"]["2"] == {"error": oom}
    assert set(res["ratios"]["causal_base"]["1"]) == {"images_per_s", "peak_memory"}
    assert set(res["ratios"]["mvar_tiny"]) == {"1", "2"} and "error" not in res["ratios"]["mvar_tiny"]["2"]
    sides = {side["model"]: side for side in res["sides"]}
    assert sides["scalewise_tiny"] == {"family": "scalewise", "model": "scalewise_tiny",
                                       "error": "ValueError: no room | at all second line", "rows": []}
    assert sides["causal_base"]["rows"][1] == {"batch_size": 2, "error": oom}
    assert [len(sides[m]["rows"][1]["seconds"]) for m in ("mar_base", "mvar_tiny")] == [1, 1]

    (tmp_path / "parts.tsv").write_text("families\t0\t80\t150\t\n")
    gpu_summary.main([str(tmp_path)])
    table = (tmp_path / "summary.md").read_text()
    assert "| families | causal | causal_base | 2 | 2 | – | – | – | – | – | – | " + oom + " |" in table
    assert "| families | scalewise | scalewise_tiny | – | 2 | – |" in table
    assert table.count("no room \\| at all second line |") == 1  # the pipe escaped: the row keeps its 12 cells
    rows = {(r["model"], r["batch"]): r for r in json.loads((tmp_path / "summary.json").read_text())["families"]}
    assert rows["mvar_tiny", 2]["steps"] == 4 and rows["mar_base", 2]["vs_mar"] == 1.0
    assert rows["mvar_tiny", 2]["vs_mar"] == pytest.approx(
        sides["mvar_tiny"]["rows"][1]["images_per_s"] / sides["mar_base"]["rows"][1]["images_per_s"])


def family_result(family, model, b1_s_per_image, b256_images_per_s):
    rows = [{"batch_size": 1, "seconds": [b1_s_per_image], "images_per_s": 1 / b1_s_per_image,
             "s_per_image": b1_s_per_image, "flops_per_image": 1e11, "fraction_of_peak": 0.1, "peak_memory_mib": 10.0},
            {"batch_size": 256, "seconds": [256 / b256_images_per_s], "images_per_s": b256_images_per_s,
             "s_per_image": 1 / b256_images_per_s, "flops_per_image": 1e11, "fraction_of_peak": 0.1,
             "peak_memory_mib": 900.0}]
    return {"family": family, "model": model, "head": "arinar", "rows": rows}


@pytest.mark.parametrize("b1, b256, verdict", [(0.08, 250.0, "met"), (0.08, 150.0, "NOT met"),
                                               (0.2, 250.0, "NOT met")])
def test_summary_reports_the_families_and_the_goal(tmp_path, b1, b256, verdict):
    result = {"args": {"num_iter": 64}, "sides": [family_result("mar", "mar_base", 0.5, 25.0),
                                                  family_result("causal", "causal_base", b1, b256)],
              "ratios": {"causal_base": {"1": {"images_per_s": 0.5 / b1}, "256": {"images_per_s": b256 / 25.0}}}}
    (tmp_path / "families.json").write_text(json.dumps(result))
    (tmp_path / "parts.tsv").write_text("families\t0\t80\t150\t\n")
    gpu_summary.main([str(tmp_path)])
    summary = json.loads((tmp_path / "summary.json").read_text())
    rows = {(r["family"], r["batch"]): r for r in summary["families"]}
    assert rows["causal", 256]["vs_mar"] == pytest.approx(b256 / 25.0) and rows["mar", 256]["vs_mar"] == 1.0
    assert rows["causal", 1]["s_per_image"] == b1
    (goal,) = summary["family_goals"]
    assert goal["met"] == (verdict == "met")
    assert (tmp_path / "summary.md").read_text().rstrip().endswith(f"s/image: {verdict}")


def family_side(family, model, steps, rows):
    return {"family": family, "model": model, "head": "arinar", "steps": steps,
            "rows": [{"batch_size": b, "seconds": [b / ips], "images_per_s": ips, "s_per_image": 1 / ips,
                      "flops_per_image": None, "fraction_of_peak": None, "peak_memory_mib": 10.0} for b, ips in rows]}


def test_summary_reads_several_contenders_and_a_run_killed_midway(tmp_path):
    """The families part's layout: ratios per contender preset; the scale-wise rows show their scales as steps;
    a run killed during batch 256 (no ratios yet, the last side only through its first call) still shows the
    rows' ratios and the untimed side."""
    killed = family_side("scalewise", "mvar_base", 10, [(1, 4.0)])
    killed["rows"].append({"batch_size": 256, "peak_memory_mib": 500.0, "seconds": []})
    result = {"args": {"num_iter": 64},
              "sides": [family_side("mar", "mar_base", 64, [(1, 2.0), (256, 20.0)]),
                        family_side("causal", "causal_base", 64, [(1, 5.0), (256, 300.0)]),
                        family_side("scalewise", "var_base", 10, [(1, 8.0), (256, 50.0)]), killed],
              "ratios": {"causal_base": {"1": {"images_per_s": 2.5}}, "var_base": {"1": {"images_per_s": 4.0}},
                         "mvar_base": {"1": {"images_per_s": 2.0}}}}
    (tmp_path / "families.json").write_text(json.dumps(result))
    (tmp_path / "parts.tsv").write_text("families\t124\t150\t150\ttimed out after 150 s\n")
    gpu_summary.main([str(tmp_path)])
    summary = json.loads((tmp_path / "summary.json").read_text())
    got = [(r["model"], r["batch"], r["steps"], r["vs_mar"], r["note"]) for r in summary["families"]]
    assert got == [("mar_base", 1, 64, 1.0, None), ("causal_base", 1, 64, 2.5, None), ("var_base", 1, 10, 4.0, None),
                   ("mvar_base", 1, 10, 2.0, None), ("mar_base", 256, 64, 1.0, None),
                   ("causal_base", 256, 64, 15.0, None), ("var_base", 256, 10, 2.5, None),
                   ("mvar_base", 256, 10, None, "killed after its first call (not timed)")]
    assert summary["machine"].startswith("unknown")
    (goal,) = summary["family_goals"]
    assert (goal["images_per_s_b256"], goal["s_per_image_b1"], goal["met"]) == (300.0, 0.2, False)


def test_gpu_check_runs_the_families_part(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    out = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), str(tmp_path), "--cpu-smoke",
                          "--parts", "families"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    parts = [line.split("\t")[:2] for line in (tmp_path / "parts.tsv").read_text().splitlines()]
    assert parts == [["families", "0"]], (tmp_path / "families.log").read_text()[-2000:]
    res = json.loads((tmp_path / "families.json").read_text())
    assert [(side["family"], side["model"]) for side in res["sides"]] == [
        ("mar", "mar_tiny"), ("causal", "causal_tiny"), ("scalewise", "scalewise_tiny"), ("scalewise", "mvar_tiny")]
    assert all([row["batch_size"] for row in side["rows"]] == [1, 2] for side in res["sides"])
    assert all(len(side["rows"][0]["seconds"]) == 1 for side in res["sides"])  # --repeats 1
    assert "| families | mvar_tiny |" not in out.stdout and "| families | scalewise | mvar_tiny | 2 | 4 |" in out.stdout
    split = res["sides"][3]["rows"][0]["breakdown_s"]  # --breakdown, in the summary's line
    assert f"mvar_tiny at batch 1: outer {split['outer']:.3f}, head {split['head']:.3f}" in out.stdout
