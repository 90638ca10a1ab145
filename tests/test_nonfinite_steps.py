"""Non-finite gradients and losses: skipped steps, the --max_skipped_steps stop, no save from bad weights,
and messages that only name checkpoints which exist."""
import argparse

import pytest
import torch

import engine_mar
import main_mar
from tests.conftest import tiny_mar
from models import PRESETS
from tests.pipeline_fixtures import TINY, load, make_image_folder, run_main, TINY_PRESET, tiny_flags
from util.train import state as checkpoint
from util.train.state import LAST, TrainState, save_training_checkpoint
from util.data.datasets import ResumableSampler
from util.train.ema import EMA

pytestmark = pytest.mark.usefixtures("one_thread")


def inf_gradient_at(monkeypatch, bad_steps):
    """Make one gradient entry +inf at the given (1-based) optimizer steps of a fresh run, as an overflow
    in a backward pass would; the loss stays finite."""
    real = torch.nn.utils.clip_grad_norm_
    calls = {"n": 0}

    def clip(params, max_norm, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] in bad_steps:
            params[0].grad.view(-1)[0] = float("inf")
        return real(params, max_norm, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)


def record_saves(monkeypatch):
    """{global step: a deep copy of the checkpoint written at it}, while still writing the files."""
    saves = {}
    real = checkpoint.atomic_torch_save

    def save(obj, path):
        saves[obj["train_state"]["global_step"]] = clone(obj)
        real(obj, path)

    monkeypatch.setattr(checkpoint, "atomic_torch_save", save)
    return saves


def clone(obj):
    if torch.is_tensor(obj):
        return obj.clone()
    if isinstance(obj, dict):
        return {k: clone(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [clone(v) for v in obj]
    return obj


def assert_same_state(a, b):
    for part in ("model", "model_ema"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}[{key}] changed"
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for i, values in a["optimizer"]["state"].items():
        for name, value in values.items():
            assert torch.equal(value, b["optimizer"]["state"][i][name]), f"optimizer state {i}.{name} changed"


NO_INNER = {"inner_ar_width": None, "inner_ar_heads": None}  # the other heads have no inner model to size
HEADS = {"arinar": {}, "diffloss": {"head": "diffloss", "diffloss_d": 1, "diffloss_w": 32, "num_sampling_steps": 8,
                                    **NO_INNER},
         "gmm": {"head": "gmm", "diffloss_d": 1, "diffloss_w": 32, **NO_INNER}}


@pytest.mark.parametrize("head", sorted(HEADS))  # the guard sits in the training step, whatever the head
def test_inf_gradient_at_a_save_step_is_skipped_and_the_checkpoint_stays_finite(tmp_path, monkeypatch, head):
    data = make_image_folder(tmp_path / "data", per_class=3)  # 6 images / batch 2 = 3 steps per epoch
    inf_gradient_at(monkeypatch, {4})
    saves = record_saves(monkeypatch)
    run_main(tiny_flags(data_path=data, output_dir=tmp_path / "run", epochs=2, save_every_steps=1, **HEADS[head]))

    assert sorted(saves) == [1, 2, 3, 4, 5, 6]
    assert_same_state(saves[3], saves[4])  # step 4 left weights, EMA and optimizer moments as they were
    assert saves[4]["train_state"]["skipped_steps"] == 1 and saves[3]["train_state"]["skipped_steps"] == 0
    assert saves[5]["train_state"]["skips_in_a_row"] == 0  # the next good step resets the streak
    assert not torch.equal(saves[5]["model"]["z_proj.weight"], saves[4]["model"]["z_proj.weight"])
    final = load(tmp_path / "run" / LAST)
    assert all(torch.isfinite(v).all() for part in ("model", "model_ema") for v in final[part].values())
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "step 4 (epoch 1, iteration 1): gradient norm inf, step skipped" in log


def test_max_skipped_steps_in_a_row_stop_training_in_one_line(tmp_path, monkeypatch, capsys):
    data = make_image_folder(tmp_path / "data", per_class=3)
    # 2 and 3 are only two in a row (step 4 is good again); 5, 6, 7 reach the limit of 3
    inf_gradient_at(monkeypatch, {2, 3, 5, 6, 7, 8, 9})
    saves = record_saves(monkeypatch)
    flags = tiny_flags(data_path=data, output_dir=tmp_path / "run", epochs=3, save_every_steps=1,
                       max_skipped_steps=3)
    monkeypatch.setitem(PRESETS, TINY, TINY_PRESET)
    with pytest.raises(SystemExit) as stopped:
        main_mar.cli(flags)
    assert stopped.value.code == 1
    assert max(saves) == 6 and saves[6]["train_state"]["skips_in_a_row"] == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if " ERROR " in line]
    assert len(errors) == 1, errors
    assert "not finite at 3 steps in a row (steps 5-7, --max_skipped_steps 3)" in errors[0]
    assert f"the last checkpoint, {tmp_path / 'run' / LAST}, is the last good one" in errors[0]
    final = load(tmp_path / "run" / LAST)
    assert final["train_state"]["global_step"] == 6
    assert all(torch.isfinite(v).all() for v in final["model"].values())


def test_non_finite_weights_are_never_saved(tmp_path):
    model = tiny_mar()
    ema = EMA(model, 0.9)
    optimizer = torch.optim.AdamW(model.parameters())
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    args = argparse.Namespace(batch_size=2, seed=0)
    sampler = ResumableSampler(8, seed=0)
    path = tmp_path / LAST
    save = lambda: save_training_checkpoint(path, model, ema, optimizer, scaler, args, TrainState(0, 1, 1), sampler)
    save()
    before = path.read_bytes()
    with torch.no_grad():
        ema.params[3].view(-1)[0] = float("nan")  # a bad EMA alone is enough to refuse
    with pytest.raises(FloatingPointError, match=f"refusing to write {path}: .* 1 non-finite values at step 1"):
        save()
    ema.params[3].view(-1)[0] = 0.0
    with torch.no_grad():
        model.z_proj.weight[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="refusing to write"):
        save()
    model.z_proj.weight.data[0, 0] = 0.0
    # the optimizer's moments too (AdamW's exp_avg_sq after a step): check_finite must not leave them out
    model.z_proj.weight.grad = torch.ones_like(model.z_proj.weight)
    optimizer.step()
    optimizer.state[model.z_proj.weight]["exp_avg_sq"].view(-1)[0] = float("inf")
    with pytest.raises(FloatingPointError, match="refusing to write .* 1 non-finite values"):
        save()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [LAST]


def test_nan_before_any_save_and_epochs_0_name_no_checkpoint(tmp_path, monkeypatch):
    data = make_image_folder(tmp_path / "data", per_class=3)
    run_main(tiny_flags(data_path=data, output_dir=tmp_path / "zero", epochs=0))
    assert "no checkpoint was written" in (tmp_path / "zero" / "log.txt").read_text()
    assert not (tmp_path / "zero" / LAST).exists()

    real = engine_mar.to_latents
    calls = {"n": 0}

    def nan_at_step_2(*args):
        calls["n"] += 1
        latents = real(*args)
        return latents * float("nan") if calls["n"] == 2 else latents

    monkeypatch.setattr(engine_mar, "to_latents", nan_at_step_2)
    with pytest.raises(FloatingPointError, match=r"at step 2 .*; no checkpoint has been written yet$"):
        run_main(tiny_flags(data_path=data, output_dir=tmp_path / "nan", epochs=1))
    assert not (tmp_path / "nan" / LAST).exists()
