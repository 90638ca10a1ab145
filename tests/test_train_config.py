"""The typed training settings: main_mar.py's flags are derived from TrainConfig, and a resumed run names
every setting it changes."""
import dataclasses

import pytest

import main_mar
from util.train.config import TrainConfig


def parse(*argv):
    return main_mar.get_args_parser().parse_args(list(argv))


def test_the_flags_default_to_the_dataclass_and_each_sets_its_field():
    assert TrainConfig.from_args(parse()) == TrainConfig()
    assert TrainConfig() == TrainConfig(epochs=400, warmup_epochs=100, blr=1e-4, lr=None, min_lr=0.0,
                                        lr_schedule="constant", weight_decay=0.02, grad_clip=3.0, ema_rate=0.9999,
                                        precision=None, grad_checkpointing=False, use_cached=False,
                                        max_skipped_steps=10, log_freq=20)  # MAR's defaults
    given = TrainConfig.from_args(parse("--epochs", "7", "--warmup_epochs", "0.5", "--blr", "2e-4", "--lr", "3e-4",
                                        "--min_lr", "1e-6", "--lr_schedule", "cosine", "--weight_decay", "0.1",
                                        "--grad_clip", "0", "--ema_rate", "0.99", "--precision", "fp16",
                                        "--grad_checkpointing", "--use_cached", "--max_skipped_steps", "2",
                                        "--log_freq", "5"))
    assert given == TrainConfig(7, 0.5, 2e-4, 3e-4, 1e-6, "cosine", 0.1, 0.0, 0.99, "fp16", True, True, 2, 5)
    assert isinstance(given.epochs, int) and isinstance(given.warmup_epochs, float)


@pytest.mark.parametrize("flag,value", [("lr_schedule", "linear"), ("precision", "fp8")])
def test_a_setting_with_choices_refuses_others(flag, value, capsys):
    with pytest.raises(SystemExit):
        parse(f"--{flag}", value)
    assert f"--{flag}: invalid choice: '{value}'" in capsys.readouterr().err


def test_a_resumed_run_names_each_changed_setting_against_the_checkpoint():
    saved = {"epochs": 400, "lr": 2e-3, "grad_clip": 1.0, "ema_rate": 0.9999, "use_cached": False, "seed": 1,
             "label_drop_prob": 0.5}  # no precision: a setting the file does not record is not compared
    now = TrainConfig(lr=1e-3, precision="bf16", use_cached=True)
    assert now.changed_settings(saved) == ["--lr 0.001 (was 0.002)", "--grad_clip 3.0 (was 1.0)",
                                           "--use_cached True (was False)"]
    assert dataclasses.replace(now, lr=2e-3, grad_clip=1.0, use_cached=False).changed_settings(saved) == []
