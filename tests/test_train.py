"""Training: schedule, optimizer groups, EMA, precisions, logging, NaN stop, bad input at start-up."""
import json
import math
import os
import shutil
import sys
import types

import numpy as np
import pytest
import torch

import main_cache
from main_mar import param_groups
from tests.conftest import tiny_mar
from models.families import common as families_common
from tests.pipeline_fixtures import load, make_image_folder, parse, python, run, run_main, tiny_flags
from util.train.state import LAST
from util.train.ema import EMA
from util.train.lr_sched import lr_at


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- pure pieces
def test_lr_schedule_warmup_constant_and_cosine():
    lr, warm, total = 4e-4, 10, 110
    assert lr_at(0, lr, warm, total) == 0.0
    assert lr_at(2.5, lr, warm, total) == pytest.approx(lr * 0.25)
    for epoch in (10, 50, 109.9):
        assert lr_at(epoch, lr, warm, total, "constant") == pytest.approx(lr)
    assert lr_at(10, lr, warm, total, "cosine") == pytest.approx(lr)
    assert lr_at(60, lr, warm, total, "cosine", min_lr=1e-5) == pytest.approx(1e-5 + (lr - 1e-5) * 0.5)
    assert lr_at(110, lr, warm, total, "cosine", min_lr=1e-5) == pytest.approx(1e-5)
    values = [lr_at(e, lr, warm, total, "cosine") for e in np.linspace(10, 110, 50)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    with pytest.raises(ValueError, match="--lr_schedule"):
        lr_at(1, lr, warm, total, "step")


def test_lr_schedule_without_warmup_and_past_the_end():
    """Bugs: `epoch <= warmup_epochs` (--warmup_epochs 0, which the config allows, divides by zero at epoch 0),
    and the cosine's progress left unclamped (past the last epoch it climbs back towards lr)."""
    lr = 4e-4
    assert lr_at(0, lr, 0, 10) == lr
    assert lr_at(0, lr, 0, 10, "cosine", min_lr=1e-5) == pytest.approx(lr)
    assert lr_at(5, lr, 0, 10, "cosine", min_lr=1e-5) == pytest.approx(1e-5 + (lr - 1e-5) * 0.5)
    for epoch in (10, 12.5, 15, 20):  # cos(pi * 1.5) = 0, cos(pi * 2) = 1: unclamped gives lr / 2 + ..., lr
        assert lr_at(epoch, lr, 0, 10, "cosine", min_lr=1e-5) == pytest.approx(1e-5), epoch


def test_set_lr_sets_every_param_group():
    """Bug: only the first group updated; the training optimizer has two (no weight decay, weight decay)."""
    from util.train.lr_sched import set_lr
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2, 2))
    optimizer = torch.optim.AdamW([{"params": [a], "weight_decay": 0.0}, {"params": [b], "weight_decay": 0.02}],
                                  lr=1.0)
    set_lr(optimizer, 0.25)
    assert [g["lr"] for g in optimizer.param_groups] == [0.25, 0.25]


def test_param_groups_follow_the_recipe():
    model = tiny_mar()
    no_decay, decay = param_groups(model, 0.02)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = [names[id(p)] for p in no_decay["params"]]
    decay_names = [names[id(p)] for p in decay["params"]]
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.02
    assert not any(n.startswith("arhead.") for n in decay_names)  # none at all on the inner model
    assert all(model.get_parameter(n).ndim >= 2 for n in decay_names)
    assert "z_proj.weight" in decay_names and "encoder_blocks.0.attn.qkv.weight" in decay_names
    assert "z_proj.bias" in no_decay_names and "encoder_norm.weight" in no_decay_names
    assert "arhead.mat_qkv.weight" not in decay_names
    # named_parameters order inside each group
    order = [n for n, _ in model.named_parameters()]
    assert no_decay_names == [n for n in order if n in no_decay_names]
    assert len(no_decay_names) + len(decay_names) == len(order)


def test_param_groups_leave_out_frozen_parameters():
    """Bug caught: frozen parameters handed to the optimizer (AdamW's weight decay would still change them)."""
    model = tiny_mar()
    model.z_proj.weight.requires_grad_(False)
    model.encoder_norm.weight.requires_grad_(False)
    names = {id(p): n for n, p in model.named_parameters()}
    grouped = [names[id(p)] for group in param_groups(model, 0.02) for p in group["params"]]
    assert "z_proj.weight" not in grouped and "encoder_norm.weight" not in grouped
    assert "z_proj.bias" in grouped and len(grouped) == len(names) - 2


def test_ema_update_rule_and_layout():
    model = tiny_mar()
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    ema = EMA(model, rate=0.9)
    expected = {n: v.clone() for n, v in initial.items()}
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.add_(torch.randn(p.shape, generator=gen))
                expected[n] = 0.9 * expected[n] + 0.1 * p.detach()
        ema.update(model)
    state = ema.state_dict_for(model)
    assert state.keys() == model.state_dict().keys()
    for n, _ in model.named_parameters():
        torch.testing.assert_close(state[n], expected[n], rtol=1e-6, atol=1e-6)
    assert torch.equal(state["arhead.blocks.0.attn.zero_k_bias"], model.state_dict()["arhead.blocks.0.attn.zero_k_bias"])
    live = {n: p.detach().clone() for n, p in model.named_parameters()}
    with ema.swapped_in(model):
        for n, p in model.named_parameters():
            torch.testing.assert_close(p, expected[n], rtol=1e-6, atol=1e-6)
    for n, p in model.named_parameters():
        assert torch.equal(p, live[n])


def test_ema_load_refuses_missing_or_misshapen_parameters():
    """Bugs: the missing-name check dropped (a KeyError with no hint about the flags), or the shape check
    dropped (copy_ broadcasts a [1, 4] weight into [3, 4] without a word); neither may touch the average."""
    model = torch.nn.Linear(4, 3)
    ema = EMA(model, rate=0.9)
    before = [p.clone() for p in ema.params]
    with pytest.raises(ValueError, match=r"ckpt: model_ema lacks 1 parameters \(first: bias\)"):
        ema.load_state_dict({"weight": torch.ones(3, 4)}, "ckpt")
    with pytest.raises(ValueError, match=r"ckpt: model_ema\[weight\] has shape \(1, 4\), model expects \(3, 4\)"):
        ema.load_state_dict({"weight": torch.ones(1, 4), "bias": torch.ones(3)}, "ckpt")
    with pytest.raises(ValueError, match=r"model_ema\[bias\] has shape \(4,\)"):  # a later bad shape: nothing copied
        ema.load_state_dict({"weight": torch.full((3, 4), 5.0), "bias": torch.ones(4)}, "ckpt")
    with pytest.raises(ValueError, match=r"model_ema\[weight\] has shape \(4, 3\)"):  # transposed: same numel
        ema.load_state_dict({"weight": torch.ones(4, 3), "bias": torch.ones(3)}, "ckpt")
    assert all(torch.equal(p, q) for p, q in zip(ema.params, before))
    ema.load_state_dict({"weight": torch.full((3, 4), 2.0), "bias": torch.full((3,), 3.0)}, "ckpt")
    assert ema.params[0].eq(2.0).all() and ema.params[1].eq(3.0).all()


# ----------------------------------------------------------------------------- end to end
def test_training_logs_progress_and_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = make_image_folder(tmp_path / "data", per_class=4)
    run_main(tiny_flags(data_path=data, output_dir=tmp_path / "run", epochs=2, lr_schedule="cosine"))
    log = (tmp_path / "run" / "log.txt").read_text()
    progress = [line for line in log.splitlines() if "images/s" in line]
    assert len(progress) == 8  # --log_freq 1, 4 steps per epoch, 2 epochs
    assert all(word in progress[0] for word in ("loss", "lr", "grad_norm"))
    events = EventAccumulator(str(tmp_path / "run")).Reload()
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/images_per_s"):
        assert len(events.Scalars(tag)) == 8, tag
    losses = [s.value for s in events.Scalars("train/loss")]
    assert all(math.isfinite(v) and v != 0 for v in losses)
    lrs = [s.value for s in events.Scalars("train/lr")]
    assert lrs[0] == 0.0 and max(lrs) > 0  # per-iteration warmup from zero


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_training(tmp_path, precision):
    data = make_image_folder(tmp_path / "data", per_class=2)
    run_main(tiny_flags(data_path=data, output_dir=tmp_path / "run", epochs=1, precision=precision))
    ckpt = load(tmp_path / "run" / LAST)
    assert ckpt["args"]["precision"] == precision
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert all(v.dtype == torch.float32 for v in ckpt["model"].values() if v.is_floating_point())
    if precision == "fp16":
        assert ckpt["scaler"]["scale"] > 0  # GradScaler in use, its state saved
    else:
        assert ckpt["scaler"] == {}


def test_grad_checkpointing_gives_the_same_training(tmp_path, monkeypatch):
    data = make_image_folder(tmp_path / "data", per_class=2)
    run_main(tiny_flags(data_path=data, output_dir=tmp_path / "plain", epochs=1))
    calls = []
    real = families_common.checkpoint  # OuterModel.run_blocks's
    monkeypatch.setattr(families_common, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    run_main(tiny_flags(data_path=data, output_dir=tmp_path / "ckpt", epochs=1, grad_checkpointing=True))
    assert calls  # the blocks really were checkpointed
    a, b = load(tmp_path / "plain" / LAST)["model"], load(tmp_path / "ckpt" / LAST)["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_freeze_outer_with_init_outer_from(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=2)
    run_main(tiny_flags(data_path=data, output_dir=tmp_path / "source", epochs=1, seed=11))
    source = load(tmp_path / "source" / LAST)["model_ema"]
    run_main(tiny_flags(data_path=data, output_dir=tmp_path / "inner", epochs=1,
                        init_outer_from=tmp_path / "source" / LAST, freeze_outer=True))
    trained = load(tmp_path / "inner" / LAST)
    for key, value in trained["model"].items():
        if key.startswith("arhead."):
            continue
        assert torch.equal(value, source[key]), key  # loaded, then frozen
    assert not torch.equal(trained["model"]["arhead.head.weight"], source["arhead.head.weight"])
    assert sum(len(g["params"]) for g in trained["optimizer"]["param_groups"]) == \
        sum(1 for k in trained["model"] if k.startswith("arhead.") and "zero_k_bias" not in k)


def test_single_channel_digits_run_with_extra_score(tmp_path, monkeypatch):
    """--dataset digits: 1-channel images through training, evaluation, the grid and the demo's score hook."""
    class FakeDigits(torch.utils.data.Dataset):
        def __init__(self, split, img_size):
            gen = torch.Generator().manual_seed(0)
            self.images = torch.rand(8, 1, img_size, img_size, generator=gen) * 2 - 1
            self.split = split

        def __len__(self):
            return len(self.images)

        def __getitem__(self, i):
            return self.images[i], i % 2

    scored = []
    fake = types.ModuleType("util.data.digits")
    fake.DigitsDataset = FakeDigits
    fake.score_samples = lambda images, labels: scored.append((images.shape, list(labels))) or {"accuracy": 0.25}
    monkeypatch.setitem(sys.modules, "util.data.digits", fake)
    run_main(tiny_flags(dataset="digits", class_num=2, output_dir=tmp_path / "run", epochs=1, online_eval=True,
                        num_images=4, eval_bsz=2, num_iter=2))
    assert load(tmp_path / "run" / LAST)["model"]["z_proj.weight"].shape == (32, 4)  # 1 channel x 2 x 2
    assert scored == [((4, 8, 8, 1), [0, 0, 1, 1])]
    (folder,) = (tmp_path / "run").glob("eval-ep0-*")
    assert json.loads((folder / "metrics.json").read_text())["accuracy"] == 0.25
    assert (folder / "grid.png").is_file()


def make_pixel_cache(tmp_path, data, img_size=8, name="cache"):
    args = main_cache.get_args_parser().parse_args([
        "--tokenizer", "pixel", "--img_size", str(img_size), "--data_path", str(data),
        "--cached_path", str(tmp_path / name), "--batch_size", "4", "--num_workers", "0", "--shard_size", "5"])
    main_cache.main(args)
    return tmp_path / name


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=3)  # 6 images -> 3 steps per epoch
    good = make_pixel_cache(tmp_path, data)
    flags = dict(use_cached=True, output_dir=tmp_path / "run", save_last_freq=1)
    run_main(tiny_flags(cached_path=good, epochs=1, **flags))
    before = (tmp_path / "run" / LAST).read_bytes()

    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    for shard in sorted(bad.glob("shard-*[0-9].npy")):
        arr = np.load(shard)
        np.save(shard, np.full_like(arr, np.nan))
    with pytest.raises(FloatingPointError, match=r"at step 4 \(epoch 1, iteration 1\)"):
        run_main(tiny_flags(cached_path=bad, epochs=2, resume=tmp_path / "run", **flags))
    assert (tmp_path / "run" / LAST).read_bytes() == before


# ----------------------------------------------------------------------------- bad input
def expect_startup_error(tmp_path, error, match, **flags):
    out = tmp_path / "out"
    with pytest.raises(error, match=match):
        run_main(tiny_flags(output_dir=out, **flags))
    assert not out.exists(), "nothing may be written when start-up checks fail"


def test_missing_data_path(tmp_path):
    expect_startup_error(tmp_path, FileNotFoundError, "--data_path", data_path=tmp_path / "nowhere")


def test_empty_class_folder(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=2)
    os.makedirs(data / "train" / "class9")
    expect_startup_error(tmp_path, ValueError, r"class9 holds no images.*--data_path", data_path=data)


def test_wrong_vae_path(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=2)
    expect_startup_error(tmp_path, FileNotFoundError, "--vae_path", data_path=data, tokenizer="kl16",
                         img_size=16, patch_size=1, vae_path=tmp_path / "kl16.ckpt")


def test_cache_from_another_image_size(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=2)
    cache = make_pixel_cache(tmp_path, data, img_size=8)
    expect_startup_error(tmp_path, ValueError, "--img_size 8", use_cached=True, cached_path=cache, img_size=16,
                         patch_size=4)


def test_resume_from_another_model_config(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=2)
    run_main(tiny_flags(data_path=data, output_dir=tmp_path / "run", epochs=1))
    expect_startup_error(tmp_path, ValueError, r"--inner_ar_width 16 contradicts .*\(inner_ar_width 32\)",
                         data_path=data, resume=tmp_path / "run", inner_ar_width=16)
    expect_startup_error(tmp_path, ValueError, r"--num_gaussians 2 contradicts .*\(num_gaussians 4\)",
                         data_path=data, resume=tmp_path / "run", num_gaussians=2)


def test_existing_run_is_not_overwritten(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=2)
    run_main(tiny_flags(data_path=data, output_dir=tmp_path / "run", epochs=1))
    before = (tmp_path / "run" / LAST).read_bytes()
    with pytest.raises(ValueError, match="--resume"):
        run_main(tiny_flags(data_path=data, output_dir=tmp_path / "run", epochs=1))
    assert (tmp_path / "run" / LAST).read_bytes() == before


def test_evaluation_flags_checked_at_start_up(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=2)
    expect_startup_error(tmp_path, ValueError, "--num_images", data_path=data, online_eval=True, num_images=5,
                         fid_stats="none")
    expect_startup_error(tmp_path, FileNotFoundError, "--fid_stats", data_path=data, online_eval=True,
                         num_images=4, fid_stats=tmp_path / "stats.npz")
    expect_startup_error(tmp_path, ValueError, "--evaluate needs a checkpoint", evaluate=True, fid_stats="none")


@pytest.mark.parametrize("cuda, precision", [(False, "fp32"), (True, "bf16")])
def test_defaults_follow_the_dataset_and_device(monkeypatch, cuda, precision):
    from main_mar import model_config, resolve_args
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    args = resolve_args(parse(["--dataset", "digits", "--tokenizer", "pixel", "--img_size", "8"]))
    tokens = model_config(args, None)[0].tokens
    assert (model_config(args, None)[0].class_num, tokens.img_channels, args.fid_stats, tokens.vae_stride,
            tokens.vae_embed_dim, args.precision) == (10, 1, "none", 1, 1, precision)
    args = resolve_args(parse([]))
    assert (model_config(args, None)[0].class_num, args.fid_stats, args.precision) == (
        1000, "fid_stats/adm_in256_stats.npz", precision)


def test_cli_reports_bad_input_in_one_line(tmp_path):
    result = run([python(), "main_mar.py", "--tokenizer", "pixel", "--data_path", str(tmp_path / "missing"),
                  "--output_dir", str(tmp_path / "out")])
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--data_path" in lines[0] and "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dtype, kept", [(torch.float64, torch.float64), (torch.bfloat16, torch.float32)])
def test_ema_keeps_float64_and_widens_bf16(dtype, kept):
    """The average is at least float32 and never narrows: one step of rate 0.5 from 1 towards
    1 + 2^-40 lands on 1 + 2^-41 in float64 (float32 would round it to 1)."""
    model = torch.nn.Linear(1, 1, bias=False).to(dtype)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = EMA(model, rate=0.5)
    with torch.no_grad():
        model.weight.fill_(1.0 + 2.0 ** -40 if dtype == torch.float64 else 1.0078125)  # bf16's spacing at 1
    ema.update(model)
    avg = ema.params[0]
    assert avg.dtype == kept
    assert avg.item() == (1.0 + 2.0 ** -41 if dtype == torch.float64 else 1.00390625)  # half a bf16 step
    assert ema.state_dict_for(model)["weight"].dtype == dtype
