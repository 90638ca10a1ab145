"""bench/bench_compile.py on CPU with Dynamo's "eager" backend (no C++ compiler): each way in its own
process, the whole Step traced as one graph against one graph per block class and call form."""
import json

import pytest

from bench import bench_compile

TINY = ["--width", "32", "--enc_dec_depth", "2", "--num_heads", "4", "--inner_ar_width", "32", "--img_size", "64",
        "--class_num", "10", "--threads", "1", "--compiler", "eager", "--repeats", "1"]


def test_both_ways_each_in_a_fresh_process(tmp_path):
    out = tmp_path / "compile.json"
    results = bench_compile.main([*TINY, "--json", str(out)])
    assert json.loads(out.read_text())["ways"] == results["ways"]
    whole, blocks = results["ways"]["whole"]["mar.outer"], results["ways"]["blocks"]["mar.outer"]
    assert whole["graphs"] == 1 and blocks["graphs"] == 2  # the blocks; the last decoder block at its queries
    for row in (whole, blocks):
        assert row["first_s"] > 0 and row["compile_s"] == row["first_s"] - row["later_s"]
    # the head's sampler, recorded at its last call: its regions (bench_compile's docstring; test_cuda_graphs_emulated
    # names the six graphs), or the whole sampler, cut into more graphs at its cache writes (left out of the graphs)
    head_whole, head_blocks = results["ways"]["whole"]["head.InnerAR"], results["ways"]["blocks"]["head.InnerAR"]
    assert head_blocks["graphs"] == 6 and head_whole["graphs"] > head_blocks["graphs"]


def test_only_calls_compile_would_build_are_measured():
    """As --compile: calls with a size-0/1 dimension are left out (16 tokens in 16 steps: one a step)."""
    args = bench_compile.parse_args([*TINY, "--way", "blocks", "--num_iter", "16"])
    with pytest.raises(ValueError, match="size-0/1 dimension.*fewer --num_iter"):
        bench_compile.measure(args)


def test_each_way_runs_in_a_child_with_its_own_empty_inductor_cache(monkeypatch):
    """The two children (a stand-in for subprocess.run) get --way whole, then blocks, each a
    TORCHINDUCTOR_CACHE_DIR of its own that is empty when it starts (a shared cache would let the second
    way reuse the first's kernels and look cheaper)."""
    import os
    import subprocess
    import types
    seen = []

    def child(command, env, **kwargs):
        cache = env["TORCHINDUCTOR_CACHE_DIR"]
        seen.append((command[command.index("--way") + 1], cache, os.listdir(cache)))
        open(os.path.join(cache, "kernel"), "w").close()
        row = {"first_s": 3.0, "later_s": 1.0, "compile_s": 2.0, "graphs": 1}
        return subprocess.CompletedProcess(command, 0, stdout=json.dumps({"mar.outer": row}) + "\n", stderr="")
    monkeypatch.setattr(bench_compile, "subprocess", types.SimpleNamespace(run=child))
    results = bench_compile.main([*TINY, "--device", "cpu"])
    assert [(way, listed) for way, _, listed in seen] == [("whole", []), ("blocks", [])]
    assert seen[0][1] != seen[1][1] and set(results["ways"]) == {"whole", "blocks"}
