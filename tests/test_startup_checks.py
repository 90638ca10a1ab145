"""Start-up validation: every bad training/model flag is one line naming it, before anything is built;
a bad --vae_path file is one line without torch's advice to unpickle it fully."""
import pickle
from unittest import mock

import pytest
import torch

import main_mar
from main_mar import check_args, cli, model_config, resolve_args
from models import PRESETS, TokenConfig
from models.config import all_flag_fields
from tests.pipeline_fixtures import TINY, TINY_PRESET, parse, tiny_flags
from util.io.safe_load import load_weights_only, why_unreadable
from util.io.tokenizers import build_tokenizer

# (flag, a value outside its range); the issue's own examples first
BAD = [("num_gaussians", 0), ("warmup_epochs", -1), ("mask_ratio_min", 1.5), ("label_drop_prob", 2),
       ("mask_ratio_min", 0), ("label_drop_prob", -0.1), ("attn_dropout", 1.5), ("proj_dropout", "nan"),
       ("ema_rate", 1), ("ema_rate", -0.5), ("lr", 0), ("lr", "inf"), ("blr", -1e-4), ("min_lr", -1),
       ("weight_decay", -0.01), ("grad_clip", -1), ("epochs", -1), ("batch_size", 0), ("num_workers", -1),
       ("patch_size", 0), ("enc_dec_depth", 0), ("inner_ar_width", 0), ("inner_ar_depth", 0),
       ("inner_ar_heads", 0), ("buffer_size", 0), ("class_num", 0), ("img_size", 0), ("vae_stride", 0),
       ("vae_embed_dim", 0), ("log_freq", 0), ("save_last_freq", 0), ("save_copy_freq", -1),
       ("save_every_steps", -2), ("eval_freq", 0), ("eval_bsz", 0), ("num_iter", 0), ("num_images", 0),
       ("seed", -1), ("seed", 2 ** 31), ("pixel_levels", 1)]

# the edges of each range, which must still be accepted
GOOD = dict(mask_ratio_min=1.0, label_drop_prob=0, attn_dropout=0, proj_dropout=1, ema_rate=0, grad_clip=0,
            epochs=0, warmup_epochs=0, min_lr=0, weight_decay=0, num_workers=0, seed=0, save_copy_freq=0,
            save_every_steps=0, pixel_levels=0)


def checked(tmp_path, **overrides):
    flags = dict(output_dir=tmp_path / "out")
    flags.update(overrides)
    if {"vae_stride", "vae_embed_dim"} & set(overrides):  # the pixel tokenizer sets these itself
        flags.update(tokenizer="kl16", img_size=16)
    args = resolve_args(parse(tiny_flags(**flags)))
    check_args(args, None)
    with mock.patch.dict(PRESETS, {TINY: TINY_PRESET}):
        model_config(args, None)  # the model flags' ranges are checked by the model config


@pytest.mark.parametrize("flag,value", BAD)
def test_each_bad_flag_is_one_line_naming_it(tmp_path, flag, value):
    with pytest.raises(ValueError) as err:
        checked(tmp_path, **{flag: value})
    message = str(err.value)
    assert message.startswith(f"--{flag} must be") and "\n" not in message, message


def test_every_numeric_flag_is_range_checked_at_start_up(tmp_path):
    """Each int or float flag of main_mar.py (those to come too): a value outside every range (-5, nan) stops
    the run at start-up with one line naming that flag, wherever its check lives (the run's FLAG_RANGES, the
    model config, the sampling settings)."""
    owners = {name: [label for _, label in entries] for name, entries in all_flag_fields().items()}
    numeric = [a for a in main_mar.get_args_parser()._actions if a.type in (int, float)]
    assert len(numeric) > 40
    for action in numeric:
        name = action.option_strings[0][2:]
        labels = owners.get(name, [None])
        context = {}  # a flag of another family or head is checked in a run of that family or head
        if not {None, "--family mar", "--head arinar"} & set(labels):
            kind, owner = labels[0].split()
            context = ({"family": owner, "model": f"{owner}_tiny", "buffer_size": None} if kind == "--family"
                       else {"head": owner, "inner_ar_width": None, "inner_ar_heads": None})
        with pytest.raises(ValueError) as err:
            checked(tmp_path, **context, **{name: -5 if action.type is int else "nan"})
        assert str(err.value).startswith(f"--{name} must be"), str(err.value)


def test_range_edges_are_accepted(tmp_path):
    checked(tmp_path, **GOOD)


def test_grid_and_head_divisibility(tmp_path):
    with pytest.raises(ValueError, match=r"^--img_size 9 must be a multiple of --vae_stride x --patch_size = 2"):
        checked(tmp_path, img_size=9, patch_size=2)
    with pytest.raises(ValueError, match=r"^--inner_ar_width 30 must be a multiple of --inner_ar_heads 4"):
        checked(tmp_path, inner_ar_width=30, inner_ar_heads=4)


def test_cli_bad_flag_is_one_line_and_writes_nothing(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        cli(["--tokenizer", "pixel", "--num_gaussians", "0", "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert stop.value.code == 1 and len(lines) == 1 and "--num_gaussians must be >= 1" in lines[0], err
    assert not (tmp_path / "out").exists()


class Plant:
    """Unpickling this with full pickle would create the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.mark.parametrize("content", ["garbage", "pickle", "plant"])
def test_bad_vae_file_is_one_line_without_weights_only_advice(tmp_path, content):
    path, marker = tmp_path / "kl16.ckpt", tmp_path / "marker"
    if content == "garbage":
        path.write_bytes(b"\x00not a checkpoint at all")
    elif content == "pickle":
        path.write_bytes(pickle.dumps({"model": 3}))
    else:
        torch.save({"model": Plant(marker)}, path)
    with pytest.raises(ValueError) as err, torch.device("meta"):  # meta: the file is refused before any weight counts
        build_tokenizer(TokenConfig(), vae_path=str(path))
    message = str(err.value)
    assert message.startswith(f"--vae_path {path}") and "\n" not in message, message
    assert "weights_only" not in message and "file an issue" not in message, message
    assert not marker.exists()


@pytest.mark.parametrize("native, emulated, want", [(True, True, "bf16"), (False, True, "fp32"), (False, False, "fp32")])
def test_default_precision_is_bf16_only_on_bf16_tensor_cores(monkeypatch, native, emulated, want):
    """A V100 or T4 emulates bf16 (torch's is_bf16_supported() says yes unless asked otherwise), slower
    than fp32 there."""
    from sampling import default_precision
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True:
                        native or (including_emulation and emulated))
    assert default_precision("cuda") == want
    assert default_precision("cpu") == "fp32"


def test_an_unreadable_weight_path_stays_an_os_error(tmp_path):
    """Bug caught: a missing file or a folder reported as a corrupt weight file (the fix is the path, not the file)."""
    with pytest.raises(FileNotFoundError):
        load_weights_only(tmp_path / "missing.ckpt", "--vae_path")
    with pytest.raises(IsADirectoryError):
        load_weights_only(tmp_path, "--vae_path")


def test_a_loader_error_is_summed_up_by_its_first_informative_line():
    """Bug caught: the last line of torch's message kept (a detail) instead of the first (the reason)."""
    err = pickle.UnpicklingError("Weights only load failed. This file can still be loaded, to do so you have two "
                                 "options\n\ninvalid load key, '\\x00'.\n  at byte 12\n"
                                 "Check the documentation of torch.load to learn more.")
    assert why_unreadable(err) == "corrupt, truncated or not a torch/safetensors file (UnpicklingError: invalid " \
                                  "load key, '\\x00'.)"


def test_an_error_in_a_data_loader_worker_is_its_own_last_line():
    """torch re-raises a worker's error with the worker's traceback: the one line is that traceback's last, without
    its exception name. Bug: the first line taken ("Caught ValueError in DataLoader worker process 0.")."""
    from main_mar import one_line
    text = ("Caught ValueError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
            '  File "worker.py", line 1, in _worker_loop\n    data = fetcher.fetch(index)\n'
            "ValueError: data/train/a/x.png: cannot identify image file\n")
    assert one_line(ValueError(text)) == "data/train/a/x.png: cannot identify image file"
    assert one_line(ValueError("--lr must be > 0; got 0")) == "--lr must be > 0; got 0"
