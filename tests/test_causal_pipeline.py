"""The causal family through the same main_mar.py flags as MAR: resume, DDP on cached latents with
online evaluation, bf16; nothing in main_mar.py / engine_mar.py / util knows the family."""
import json
import re

import numpy as np
import pytest
import torch

from models.families import causal
from tests.conftest import REPO
from tests.pipeline_fixtures import (TINY_CAUSAL, load, make_image_folder, python, run, run_main,
                                     run_main_killed_after_saves, tiny_flags, torchrun, write_launcher)
from tests.test_checkpoint import assert_same_optimizer, assert_same_tensors
from util.train.state import LAST

pytestmark = pytest.mark.usefixtures("one_thread")
SHARED_CODE = ("main_mar.py", "engine_mar.py", "main_cache.py", "sample.py", "demo_edit.py", "util", "sampling")


def causal_flags(**overrides):
    """tiny_flags for the tiny causal model (MAR's --buffer_size is not one of its settings)."""
    return tiny_flags(**{"model": TINY_CAUSAL, "buffer_size": None, **overrides})


def test_a_causal_run_resumes_bit_exactly(tmp_path, monkeypatch):
    """Killed after its second save and resumed, a run ends with the same weights, EMA and optimizer as one
    never stopped: the random orders come from the RNG streams the checkpoint restores."""
    data = make_image_folder(tmp_path / "data", per_class=3)  # 6 images / batch 2 = 3 steps per epoch
    flags = dict(data_path=data, epochs=2, save_every_steps=1)
    run_main(causal_flags(output_dir=tmp_path / "whole", **flags))
    run_main_killed_after_saves(monkeypatch, 2, causal_flags(output_dir=tmp_path / "broken", **flags))
    run_main(causal_flags(output_dir=tmp_path / "broken", resume=tmp_path / "broken", **flags))
    whole, resumed = load(tmp_path / "whole" / LAST), load(tmp_path / "broken" / LAST)
    assert whole["config"]["family"] == "causal" and "query_pos_embed" in whole["model"]
    assert whole["train_state"]["global_step"] == resumed["train_state"]["global_step"] == 6
    assert_same_tensors(whole["model"], resumed["model"], "model")
    assert_same_tensors(whole["model_ema"], resumed["model_ema"], "model_ema")
    assert_same_optimizer(whole["optimizer"], resumed["optimizer"])
    # the orders really are random per step: another seed trains other weights
    run_main(causal_flags(output_dir=tmp_path / "other", seed=4, **flags))
    other = load(tmp_path / "other" / LAST)["model"]
    assert not torch.equal(other["query_token"], whole["model"]["query_token"])


def test_ddp_on_cached_latents_with_online_evaluation(tmp_path):
    """main_cache.py, then two processes under torchrun on the cached latents: both ranks see other
    images, end with identical weights (every parameter got its all-reduced gradient), and the online
    evaluation splits its images between them."""
    data = make_image_folder(tmp_path / "data", classes=2, per_class=6)
    cached = run([python(), "main_cache.py", "--tokenizer", "pixel", "--img_size", "8", "--data_path", str(data),
                  "--cached_path", str(tmp_path / "cache"), "--batch_size", "4", "--num_workers", "0"])
    assert cached.returncode == 0, cached.stderr[-3000:]
    trained = run(torchrun() + ["--standalone", "--nproc_per_node=2", write_launcher(tmp_path)] + causal_flags(
        use_cached=True, cached_path=tmp_path / "cache", output_dir=tmp_path / "run", epochs=2, online_eval=True,
        eval_freq=5, num_images=4, eval_bsz=1, num_iter=2, cfg=2.0, fid_stats="none"), timeout=400)
    assert trained.returncode == 0, trained.stderr[-3000:]
    ckpt = load(tmp_path / "run" / LAST)
    state = ckpt["train_state"]
    assert ckpt["config"]["family"] == "causal" and state["global_step"] == 6
    assert state["data_order"]["world_size"] == 2
    first, second = state["data_order"]["last_batch_indices"]
    assert len(first) == len(second) == 2 and not set(first) & set(second)
    sums = state["replica_weight_sums"]
    assert len(sums) == 2 and sums[0] == sums[1]
    folders = sorted((tmp_path / "run").glob("eval-*"))
    assert len(folders) == 4  # cfg 1 and cfg 2 at epochs 0 and 1
    for folder in folders:
        assert sorted(p.name for p in (folder / "images").glob("*.png")) == [f"{i:06d}.png" for i in range(4)]
        metrics = json.loads((folder / "metrics.json").read_text())
        assert metrics["world_size"] == 2 and metrics["images_drawn"] == 4


def test_bf16_training_and_sampling(tmp_path, monkeypatch):
    """Under --precision bf16 the causal run trains (fp32 weights, finite) and its online evaluation
    samples under the backend's autocast, its KV cache held in bf16 (half the memory of fp32)."""
    caches = []
    real_append = causal.append_step
    monkeypatch.setattr(causal, "append_step", lambda model, cache, *rest: caches.append(cache.dtype) or
                        real_append(model, cache, *rest))
    data = make_image_folder(tmp_path / "data", per_class=2)
    run_main(causal_flags(data_path=data, output_dir=tmp_path / "run", epochs=1, precision="bf16", online_eval=True,
                          num_images=4, eval_bsz=2, num_iter=3, cfg=2.0, fid_stats="none"))
    ckpt = load(tmp_path / "run" / LAST)
    assert ckpt["args"]["precision"] == "bf16"
    weights = [v for v in ckpt["model"].values() if v.is_floating_point()]
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in weights)
    assert caches and set(caches) == {torch.bfloat16}
    folders = sorted((tmp_path / "run").glob("eval-*"))
    cfgs = sorted(json.loads((f / "metrics.json").read_text())["cfg"] for f in folders)
    assert cfgs == [1.0, 2.0]
    for folder in folders:
        images = np.load(folder / "samples.npz")["arr_0"]
        assert images.shape == (4, 8, 8, 3) and images.std() > 0


def test_the_shared_code_does_not_branch_on_the_family():
    """The family is a registry entry: neither the entry scripts nor util/ or sampling/ name one (a
    `config.family == "causal"` branch would)."""
    files = [path for name in SHARED_CODE for path in ([REPO / name] if name.endswith(".py")
                                                      else sorted((REPO / name).rglob("*.py")))]
    assert len(files) > 10
    for path in files:
        assert not re.search(r"""["'](causal|mar)["']""", path.read_text()), path
