"""bench/bench_families.py (MAR family against another, one run), its peak-memory counter, and its part
in bench/gpu_check.sh and the summary. Plumbing and counts only: no timing is asserted."""
import json
import os
import subprocess
import sys

import pytest
import torch

from bench import bench_families, gpu_summary
from bench.memory import peak_memory
from tests.conftest import REPO

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = ["--family", "causal", "--width", "32", "--num_heads", "4", "--enc_dec_depth", "1", "--depth", "2",
        "--inner_ar_width", "32", "--img_size", "64", "--class_num", "10", "--device", "cpu", "--warmup", "1",
        "--repeats", "1", "--cfg", "2.0"]
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
    ratios = res["ratios"][2]
    assert ratios["images_per_s"] == causal_row["images_per_s"] / mar_row["images_per_s"]
    assert ratios["flops_per_image"] == count[16]["causal"] / count[16]["mar"]
    assert ratios["peak_memory"] == causal_row["peak_memory_mib"] / mar_row["peak_memory_mib"]
    assert all(row["peak_memory_mib"] > 0 and len(row["seconds"]) == 1 for row in (mar_row, causal_row))
    mar, causal = res["sides"]
    assert (mar["model"], causal["model"], mar["head"], causal["head"]) == ("mar_base", "causal_base", "arinar", "arinar")


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
    with pytest.raises(ValueError, match="--diffloss_w is a setting of neither mar_base nor causal_base"):
        bench_families.main(TINY + ["--diffloss_w", "64"])
    with pytest.raises(ValueError, match="--model mar_tiny is a mar model, not --family causal"):
        bench_families.main(TINY + ["--model", "mar_tiny"])
    with pytest.raises(ValueError, match="name the family to compare"):
        bench_families.main(TINY[2:])


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
              "ratios": {"1": {"images_per_s": 0.5 / b1}, "256": {"images_per_s": b256 / 25.0}}}
    (tmp_path / "family_causal.json").write_text(json.dumps(result))
    (tmp_path / "parts.tsv").write_text("family_causal\t0\t80\t150\t\n")
    gpu_summary.main([str(tmp_path)])
    summary = json.loads((tmp_path / "summary.json").read_text())
    rows = {(r["family"], r["batch"]): r for r in summary["families"]}
    assert rows["causal", 256]["vs_mar"] == pytest.approx(b256 / 25.0) and rows["mar", 256]["vs_mar"] == 1.0
    assert rows["causal", 1]["s_per_image"] == b1
    (goal,) = summary["family_goals"]
    assert goal["met"] == (verdict == "met")
    assert (tmp_path / "summary.md").read_text().rstrip().endswith(f"s/image: {verdict}")


def test_gpu_check_runs_the_family_part(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    out = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), str(tmp_path), "--cpu-smoke",
                          "--parts", "family_causal"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    parts = [line.split("\t")[:2] for line in (tmp_path / "parts.tsv").read_text().splitlines()]
    assert parts == [["family_causal", "0"]], (tmp_path / "family_causal.log").read_text()[-2000:]
    res = json.loads((tmp_path / "family_causal.json").read_text())
    assert [side["family"] for side in res["sides"]] == ["mar", "causal"]
    assert [row["batch_size"] for row in res["sides"][1]["rows"]] == [1, 2]
    assert "| family_causal | causal | causal_base | 2 | 4 |" in out.stdout
