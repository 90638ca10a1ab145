"""Checkpoints: atomic writes, the release layout, and exact (bit-identical) resume after SIGKILL."""
import os
import random
import re
import signal
import subprocess

import numpy as np
import pytest
import torch

from tests.conftest import REPO
from tests.pipeline_fixtures import (load, make_image_folder, python, run_main, run_main_killed_after_saves,
                                     subprocess_env, tiny_flags, write_launcher)
from util.train import state as checkpoint
from util.data.datasets import ResumableSampler
from util.train.state import LAST, capture_rng_state, restore_rng_state
from util.io.files import atomic_torch_save


pytestmark = pytest.mark.usefixtures("one_thread")


def assert_same_tensors(a, b, what):
    assert a.keys() == b.keys(), what
    for key in a:
        assert torch.equal(a[key], b[key]), f"{what}[{key}] differs"


def assert_same_optimizer(a, b):
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for i in a["state"]:
        for name, value in a["state"][i].items():
            assert torch.equal(value, b["state"][i][name]), f"optimizer state {i}.{name} differs"


# ----------------------------------------------------------------------------- atomic writes
class Unpicklable:
    def __reduce__(self):
        raise RuntimeError("boom while writing")


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "ckpt.pth"
    atomic_torch_save({"w": torch.arange(3)}, path)
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="boom"):
        atomic_torch_save({"w": torch.zeros(1000), "bad": Unpicklable()}, path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pth"]  # no temp file left behind
    assert torch.equal(load(path)["w"], torch.arange(3))


def test_rng_state_round_trip():
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    torch.rand(3), np.random.rand(), random.random(), np.random.randn()  # leave a cached gaussian too
    state = capture_rng_state()
    expected = (torch.rand(5), np.random.rand(5), [random.random() for _ in range(5)], np.random.randn(3))
    torch.rand(7), np.random.rand(7), random.random()
    restore_rng_state(state)
    got = (torch.rand(5), np.random.rand(5), [random.random() for _ in range(5)], np.random.randn(3))
    assert torch.equal(expected[0], got[0])
    np.testing.assert_array_equal(expected[1], got[1])
    assert expected[2] == got[2]
    np.testing.assert_array_equal(expected[3], got[3])


def test_cuda_rng_state_is_this_process_gpu_s(monkeypatch, caplog):
    """A process saves and restores its own GPU's CUDA RNG state: a list of every visible GPU's made a
    resume on another layout (2 nodes x 4 GPUs for 1 x 8) fail or restore another GPU's stream."""
    mine, other = torch.tensor([3], dtype=torch.uint8), torch.tensor([0], dtype=torch.uint8)
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: (mine if device == 3 else other).clone())
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: pytest.fail("every GPU's state saved"))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device: restored.append((s.tolist(), device)))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    state = capture_rng_state()
    assert torch.equal(state["cuda"], mine)
    restore_rng_state(state)
    restore_rng_state({**state, "cuda": [other, other, other, mine]})  # an older checkpoint's list per GPU
    assert restored == [([3], 3), ([3], 3)]
    assert "may not be" not in caplog.text  # the layout that wrote the list: no warning
    with pytest.raises(ValueError, match="CUDA RNG states for 2 GPUs, this process runs on GPU 3"):
        restore_rng_state({**state, "cuda": [other, other]})
    restore_rng_state({**state, "cuda": [other] * 3 + [mine] + [other] * 4})  # written on 8 GPUs, read on 4
    assert restored[-1] == ([3], 3) and "CUDA RNG states for 8 GPUs, this node has 4" in caplog.text


def test_checkpoint_path_semantics(tmp_path):
    assert checkpoint.checkpoint_path("") is None
    # first launch of a job always started with --resume OUTPUT_DIR; any other missing path is a typo
    assert checkpoint.checkpoint_path(tmp_path / "new_run", output_dir=tmp_path / "new_run") is None
    with pytest.raises(FileNotFoundError, match="--resume .*new_rnu"):
        checkpoint.checkpoint_path(tmp_path / "new_rnu", output_dir=tmp_path / "new_run")
    assert checkpoint.checkpoint_path(tmp_path) is None  # folder without a checkpoint
    with pytest.raises(FileNotFoundError, match="--resume"):
        checkpoint.checkpoint_path(tmp_path / "missing.pth")
    (tmp_path / LAST).write_bytes(b"x")
    assert checkpoint.checkpoint_path(tmp_path) == str(tmp_path / LAST)


# ----------------------------------------------------------------------------- layout
def test_release_layout_and_weights_only_loading(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=4)
    run_main(tiny_flags(data_path=data, output_dir=tmp_path / "run", epochs=2, save_copy_freq=1))
    ckpt = load(tmp_path / "run" / LAST)  # weights_only=True works: args is a plain dict
    assert {"model", "model_ema", "optimizer", "epoch", "scaler", "args"} <= set(ckpt)
    assert ckpt["epoch"] == 1 and isinstance(ckpt["args"], dict) and ckpt["args"]["model"] == "test_tiny"
    assert ckpt["model"].keys() == ckpt["model_ema"].keys()
    assert not any(k.startswith("module.") for k in ckpt["model"])
    # EMA at rate 0.9999 after a few steps is still close to the initial weights, and not the live ones
    assert any(not torch.equal(ckpt["model"][k], ckpt["model_ema"][k]) for k in ckpt["model"])
    # buffers are live values in model_ema, as in the release
    for key in ckpt["model"]:
        if key.endswith("zero_k_bias"):
            assert torch.equal(ckpt["model"][key], ckpt["model_ema"][key])
    groups = ckpt["optimizer"]["param_groups"]
    assert len(groups) == 2 and groups[0]["weight_decay"] == 0.0 and groups[1]["weight_decay"] == 0.02
    assert (tmp_path / "run" / "checkpoint-0.pth").is_file() and (tmp_path / "run" / "checkpoint-1.pth").is_file()


# ----------------------------------------------------------------------------- exact resume
def test_resume_mid_epoch_is_bit_identical_in_process(tmp_path, monkeypatch):
    """Crash right after the 4th step's checkpoint (mid-epoch), resume, compare with an unbroken run."""
    data = make_image_folder(tmp_path / "data", per_class=5)  # 10 images / batch 2 = 5 steps per epoch
    flags = dict(data_path=data, epochs=2, save_every_steps=1, label_drop_prob=0.5)
    run_main(tiny_flags(output_dir=tmp_path / "whole", **flags))

    run_main_killed_after_saves(monkeypatch, 4, tiny_flags(output_dir=tmp_path / "broken", **flags))
    partial = load(tmp_path / "broken" / LAST)
    assert partial["train_state"]["step_in_epoch"] == 4 and partial["epoch"] == -1

    run_main(tiny_flags(output_dir=tmp_path / "broken", resume=tmp_path / "broken", **flags))
    whole, resumed = load(tmp_path / "whole" / LAST), load(tmp_path / "broken" / LAST)
    assert resumed["train_state"]["global_step"] == whole["train_state"]["global_step"] == 10
    assert_same_tensors(whole["model"], resumed["model"], "model")
    assert_same_tensors(whole["model_ema"], resumed["model_ema"], "model_ema")
    assert_same_optimizer(whole["optimizer"], resumed["optimizer"])


def test_resume_mid_epoch_with_another_batch_size_is_refused(tmp_path, monkeypatch):
    data = make_image_folder(tmp_path / "data", per_class=4)
    real_save = checkpoint.atomic_torch_save

    def crash(obj, path):
        real_save(obj, path)
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "atomic_torch_save", crash)
    with pytest.raises(KeyboardInterrupt):
        run_main(tiny_flags(data_path=data, output_dir=tmp_path / "run", epochs=1, save_every_steps=1))
    monkeypatch.setattr(checkpoint, "atomic_torch_save", real_save)
    before = (tmp_path / "run" / LAST).read_bytes()
    with pytest.raises(ValueError, match="--batch_size"):
        run_main(tiny_flags(data_path=data, output_dir=tmp_path / "run", resume=tmp_path / "run", epochs=1,
                            batch_size=1))
    assert (tmp_path / "run" / LAST).read_bytes() == before


def test_sigkill_then_resume_is_bit_identical(tmp_path):
    """A real SIGKILL at an arbitrary point after step k; resuming finishes with identical weights."""
    data = make_image_folder(tmp_path / "data", per_class=5)  # 5 steps per epoch
    launcher = write_launcher(tmp_path)
    common = dict(data_path=data, epochs=4, label_drop_prob=0.5)  # K = 20 steps

    whole = subprocess.run([python(), launcher] + tiny_flags(output_dir=tmp_path / "whole", save_last_freq=1,
                                                             **common),
                           cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=240)
    assert whole.returncode == 0, whole.stderr[-2000:]

    cmd = [python(), launcher] + tiny_flags(output_dir=tmp_path / "killed", save_every_steps=1, **common)
    proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            text=True)
    seen = []
    try:
        for line in proc.stderr:
            seen.append(line)
            # kill as soon as step 6 (epoch 1, step 1) is on disk: 13 steps remain
            if re.search(r"saved .* \(epoch 1, step 1,", line):
                os.kill(proc.pid, signal.SIGKILL)
                break
    finally:
        proc.wait(timeout=60)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL, "".join(seen[-20:])
    killed_at = load(tmp_path / "killed" / LAST)["train_state"]["global_step"]
    assert 6 <= killed_at < 20

    resumed = subprocess.run([python(), launcher] + tiny_flags(output_dir=tmp_path / "killed",
                                                               resume=tmp_path / "killed", save_every_steps=1,
                                                               **common),
                             cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert re.search(r"resuming .* at epoch \d+ step \d+", resumed.stderr)
    a, b = load(tmp_path / "whole" / LAST), load(tmp_path / "killed" / LAST)
    assert a["epoch"] == b["epoch"] == 3
    assert_same_tensors(a["model"], b["model"], "model")
    assert_same_tensors(a["model_ema"], b["model_ema"], "model_ema")
    assert_same_optimizer(a["optimizer"], b["optimizer"])


def test_a_missing_resume_path_says_how_to_fetch_released_weights(tmp_path):
    from util.train.state import checkpoint_path
    with pytest.raises(FileNotFoundError, match=r"--resume pretrained_models/arinar/arinar_b: no such checkpoint "
                                                r"file or run folder; fetch it with `python -m util.io.download "
                                                r"arinar_b`"):
        checkpoint_path("pretrained_models/arinar/arinar_b", tmp_path / "run")
    with pytest.raises(FileNotFoundError, match=r"no such checkpoint file or run folder; fetch released weights"):
        checkpoint_path(str(tmp_path / "typo" / "run"), tmp_path / "run")


# ----------------------------------------------------------------------------- resume bookkeeping
def test_python_gauss_cache_survives_an_rng_round_trip():
    """random.getstate()'s third entry is random.gauss's cached second value: dropping it changes the next draw."""
    random.seed(3)
    random.gauss(0.0, 1.0)  # leaves the pair's second value cached
    state = capture_rng_state()
    expected = [random.gauss(0.0, 1.0) for _ in range(3)]
    random.gauss(0.0, 1.0)
    restore_rng_state(state)
    assert [random.gauss(0.0, 1.0) for _ in range(3)] == expected


def test_last_batch_indices_are_the_most_recent_steps_literal():
    """Mid-epoch: step s's batch is the slice [(s-1) b, s b) of this rank's stream; at an epoch boundary the
    previous epoch's last full batch (10 items per rank, batch 3: 3 steps, items 6-8)."""
    sampler = ResumableSampler(21, num_replicas=2, rank=1, seed=7)
    assert checkpoint.last_batch_indices(sampler, checkpoint.TrainState(1, 2, 5), 3) == sampler.epoch_indices(1)[3:6]
    assert checkpoint.last_batch_indices(sampler, checkpoint.TrainState(2, 0, 6), 3) == sampler.epoch_indices(1)[6:9]
    assert checkpoint.last_batch_indices(sampler, checkpoint.TrainState(), 3) == []


def saved_then_resumed(tmp_path, state, batch_size=2, resume_batch_size=None):
    """Write a step-granular checkpoint of a tiny model at `state`, then resume a fresh model from it."""
    import argparse
    from tests.conftest import tiny_mar
    from util.train.ema import EMA

    def parts():
        torch.manual_seed(0)
        model = tiny_mar()
        return model, EMA(model, 0.9), torch.optim.AdamW(model.parameters()), \
            torch.amp.GradScaler("cpu", enabled=False)

    model, ema, optimizer, scaler = parts()
    sampler = ResumableSampler(12, seed=0)
    checkpoint.save_training_checkpoint(tmp_path / LAST, model, ema, optimizer, scaler,
                                        argparse.Namespace(batch_size=batch_size, seed=0), state, sampler)
    model, ema, optimizer, scaler = parts()
    args = argparse.Namespace(batch_size=resume_batch_size or batch_size, seed=0)
    return checkpoint.resume_training(load(tmp_path / LAST), "ckpt", model, ema, optimizer, scaler, args, sampler)


def test_resume_keeps_the_skipped_steps_streak(tmp_path):
    """Bug: skips_in_a_row reset on resume, so --max_skipped_steps in a row never triggers across a requeue."""
    resumed = saved_then_resumed(tmp_path, checkpoint.TrainState(1, 2, 8, skipped_steps=4, skips_in_a_row=2))
    assert resumed == checkpoint.TrainState(1, 2, 8, 4, 2)


def test_resume_at_an_epoch_boundary_may_change_the_batch_size(tmp_path):
    """Only a mid-epoch resume needs the same processes x --batch_size (the data position is a step count):
    from an epoch boundary the next epoch starts at its beginning, whatever the batch size."""
    resumed = saved_then_resumed(tmp_path, checkpoint.TrainState(2, 0, 12), batch_size=2, resume_batch_size=3)
    assert resumed == checkpoint.TrainState(2, 0, 12)


def test_resume_restores_the_fp16_loss_scale(tmp_path):
    """Bug: the scaler's state not loaded on resume: an fp16 run would restart from GradScaler's default scale
    2^16 (and its growth tracker) instead of the scale it had backed off to (here 2^7, growth tracker 3)."""
    import argparse
    from tests.conftest import tiny_mar
    from util.train.ema import EMA

    torch.manual_seed(0)
    model = tiny_mar()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 7, growth_interval=50, enabled=True)
    scaler.load_state_dict({**scaler.state_dict(), "_growth_tracker": 3})
    args = argparse.Namespace(batch_size=2, seed=0)
    sampler = ResumableSampler(12, seed=0)
    checkpoint.save_training_checkpoint(tmp_path / LAST, model, EMA(model, 0.9), torch.optim.AdamW(model.parameters()),
                                        scaler, args, checkpoint.TrainState(1, 2, 8), sampler)
    fresh = torch.amp.GradScaler("cpu", enabled=True)
    assert fresh.get_scale() == 2.0 ** 16
    checkpoint.resume_training(load(tmp_path / LAST), "ckpt", model, EMA(model, 0.9),
                               torch.optim.AdamW(model.parameters()), fresh, args, sampler)
    assert fresh.get_scale() == 2.0 ** 7
    assert fresh.state_dict()["_growth_tracker"] == 3


def test_a_release_layout_checkpoint_resumes_at_the_epoch_after_its_own(tmp_path):
    """A checkpoint without train_state (MAR's release layout: `epoch` = the last finished epoch) continues at
    epoch + 1, step 0 (bug: at `epoch`, training that epoch twice); one without optimizer/epoch (a stripped
    release file) restores the weights only and starts at epoch 0."""
    import argparse
    from tests.conftest import tiny_mar
    from util.train.ema import EMA

    torch.manual_seed(0)
    model = tiny_mar()
    ema, optimizer = EMA(model, 0.9), torch.optim.AdamW(model.parameters())
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    args = argparse.Namespace(batch_size=2, seed=0)
    ckpt = checkpoint.build_checkpoint(model, ema, optimizer, scaler, 4, args)
    assert "train_state" not in ckpt and ckpt["epoch"] == 4
    resume = lambda c: checkpoint.resume_training(c, "release", model, ema, optimizer, scaler, args,
                                                  ResumableSampler(12, seed=0))
    assert resume(ckpt) == checkpoint.TrainState(epoch=5)
    stripped = {k: v for k, v in ckpt.items() if k not in ("optimizer", "epoch")}
    assert resume(stripped) == checkpoint.TrainState()


def test_rng_states_of_another_process_count_are_not_restored(tmp_path, caplog):
    """A checkpoint written by 2 processes, resumed (at an epoch boundary) by 1: no saved stream is this
    process's, so the RNGs keep the --seed streams they were given (bug: taking rank 0's anyway, or an
    IndexError for ranks the file has no state for)."""
    import argparse
    from tests.conftest import tiny_mar
    from util.train.ema import EMA

    torch.manual_seed(0)
    model = tiny_mar()
    ema, optimizer = EMA(model, 0.9), torch.optim.AdamW(model.parameters())
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    args, sampler = argparse.Namespace(batch_size=2, seed=0), ResumableSampler(12, seed=0)
    checkpoint.save_training_checkpoint(tmp_path / LAST, model, ema, optimizer, scaler, args,
                                        checkpoint.TrainState(2, 0, 12), sampler)
    ckpt = load(tmp_path / LAST)
    torch.manual_seed(11)
    ckpt["train_state"]["rng"] = [capture_rng_state(), capture_rng_state()]  # both "ranks" at seed 11
    torch.manual_seed(5)
    expected = torch.rand(4)
    torch.manual_seed(5)
    with caplog.at_level("WARNING"):
        state = checkpoint.resume_training(ckpt, "ckpt", model, ema, optimizer, scaler, args, sampler)
    assert state == checkpoint.TrainState(2, 0, 12)
    assert torch.equal(torch.rand(4), expected)
    assert "written by 2 processes, this run has 1" in caplog.text


def test_epoch_saves_and_copies_follow_their_frequencies(tmp_path, monkeypatch):
    """--save_last_freq 2 over 4 epochs saves after epochs 0, 2 and the last, 3 (bug: `(epoch + 1) % freq`, which
    saves after 1 and 3); --save_copy_freq 2 keeps checkpoint-1.pth and checkpoint-3.pth, the copies after
    every 2nd epoch, each holding its own epoch (bug: `epoch % freq`: checkpoint-0 and -2). One step per epoch."""
    data = make_image_folder(tmp_path / "data", per_class=1)  # 2 images, batch 2
    saved = []
    real = checkpoint.atomic_torch_save
    monkeypatch.setattr(checkpoint, "atomic_torch_save",
                        lambda obj, path: (saved.append(obj["epoch"]), real(obj, path))[1])
    run_main(tiny_flags(data_path=data, output_dir=tmp_path / "last", epochs=4, save_last_freq=2))
    assert saved == [0, 2, 3]
    assert sorted(p.name for p in (tmp_path / "last").glob("checkpoint-*.pth")) == [LAST]
    saved.clear()
    run_main(tiny_flags(data_path=data, output_dir=tmp_path / "copy", epochs=4, save_last_freq=1, save_copy_freq=2))
    assert saved == [0, 1, 2, 3]
    copies = sorted(p.name for p in (tmp_path / "copy").glob("checkpoint-*.pth") if p.name != LAST)
    assert copies == ["checkpoint-1.pth", "checkpoint-3.pth"]
    assert [load(tmp_path / "copy" / name)["epoch"] for name in copies] == [1, 3]


def test_save_every_steps_writes_each_step_once(tmp_path, monkeypatch):
    """--save_every_steps 1, 2 steps per epoch: a mid-epoch save after step 1 of each epoch and the epoch-end save
    after step 2 (as the next epoch, step 0); bug: `<=` for `<` in on_step also saves the epoch's last step
    mid-epoch (step_in_epoch 2 of 2), writing every epoch's last checkpoint twice."""
    data = make_image_folder(tmp_path / "data", per_class=2)  # 4 images, batch 2
    saved = []
    real = checkpoint.atomic_torch_save

    def record(obj, path):
        s = obj["train_state"]
        saved.append((s["global_step"], s["epoch"], s["step_in_epoch"]))
        real(obj, path)

    monkeypatch.setattr(checkpoint, "atomic_torch_save", record)
    run_main(tiny_flags(data_path=data, output_dir=tmp_path / "run", epochs=2, save_every_steps=1))
    assert saved == [(1, 0, 1), (2, 1, 0), (3, 1, 1), (4, 2, 0)]


def test_a_copy_due_at_an_epoch_without_a_last_save_holds_that_epoch(tmp_path):
    """Bug: --save_copy_freq copied checkpoint-last.pth as it was on disk, so at an epoch --save_last_freq skips
    (default 5: epochs 1-4) checkpoint-1.pth held epoch 0's weights under epoch 1's name."""
    data = make_image_folder(tmp_path / "data", per_class=1)
    run_main(tiny_flags(data_path=data, output_dir=tmp_path / "run", epochs=3, save_copy_freq=1))
    for epoch in range(3):
        copy = load(tmp_path / "run" / f"checkpoint-{epoch}.pth")
        assert copy["epoch"] == epoch and copy["train_state"]["global_step"] == epoch + 1
