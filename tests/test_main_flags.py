"""main_mar.py's start-up: what a data set implies, flags that would do nothing, the class count taken from
the data before the evaluation checks, log.txt (timestamps and the start-up lines), the resume command."""
import re
from unittest import mock

import pytest

import main_mar
from models import PRESETS
from tests.pipeline_fixtures import TINY_PRESETS, make_image_folder, parse, run_main, tiny_flags


def new_config(argv):
    with mock.patch.dict(PRESETS, TINY_PRESETS):
        return main_mar.model_config(main_mar.resolve_args(main_mar.get_args_parser().parse_args(argv)), None)[0]


def test_the_digits_imply_their_own_token_settings():
    """8x8 grey digits at a preset's 256 px would be 65,536 pixel tokens an image (tens of GB)."""
    tokens = new_config(["--dataset", "digits", "--model", "mar_tiny"]).tokens
    assert (tokens.tokenizer, tokens.img_size, tokens.patch_size, tokens.img_channels) == ("pixel", 8, 2, 1)
    assert new_config(["--dataset", "digits", "--model", "mar_tiny"]).class_num == 10
    assert new_config(["--dataset", "digits", "--model", "mar_tiny", "--img_size", "16"]).tokens.img_size == 16
    assert new_config(["--model", "mar_tiny"]).tokens.img_size == 256  # imagenet: the preset's


@pytest.mark.parametrize("flag", ["--compile", "--cuda_graphs", "--no-cuda_graphs"])
def test_backend_flags_on_a_run_that_draws_no_image_are_refused(flag, tmp_path):
    args = main_mar.resolve_args(parse(tiny_flags(output_dir=tmp_path / "run") + [flag]))
    with pytest.raises(ValueError, match=f"{flag.replace('no-', '')} sets how this run draws images, and it "
                                         "draws none: add --online_eval"):
        main_mar.check_args(args, None)
    args.online_eval = True
    main_mar.check_args(args, None)  # drawing images: make_backend judges the flag against the device


def test_online_eval_counts_classes_from_the_data_first(tmp_path):
    """3 classes in the folder, no --class_num: --num_images 6 is 2 per class, not a multiple of the
    default 1000; 7 is refused once the count is known."""
    data = make_image_folder(tmp_path / "data", classes=3, per_class=2)
    flags = tiny_flags(data_path=data, epochs=1, class_num=None, online_eval=True, fid_stats="none",
                       num_images=6, eval_bsz=6, num_iter=2)
    run_main(flags + ["--output_dir", str(tmp_path / "run")])
    assert (tmp_path / "run" / main_mar.LAST).exists()
    bad = flags + ["--output_dir", str(tmp_path / "bad"), "--num_images", "7"]
    with pytest.raises(ValueError, match="--num_images 7 must be a multiple of --class_num 3"):
        run_main(bad)


def test_log_file_has_timestamps_and_the_start_up_lines(tmp_path):
    data = make_image_folder(tmp_path / "data", classes=3, per_class=2)
    run = tmp_path / "run"
    flags = tiny_flags(data_path=data, output_dir=run, class_num=None, epochs=1)
    run_main(flags)
    run_main(flags + ["--resume", str(run), "--epochs", "2", "--lr", "1e-3"])
    run_main(flags + ["--resume", str(run), "--epochs", "2"])
    log = (run / "log.txt").read_text().splitlines()
    assert all(re.match(r"\d\d:\d\d:\d\d (INFO|WARNING|ERROR) ", line) for line in log), log[:3]
    # logged before the run folder is claimed, kept in log.txt too
    assert any("the data set has 3 classes: --class_num set to 3" in line for line in log)
    assert sum("INFO main_mar: resuming " in line for line in log) == 2
    assert any(" WARNING " in line and "resuming with changed training settings: --lr" in line for line in log)
    assert any("already trained 2 of --epochs 2: nothing to train (raise --epochs to go on)" in line for line in log)


def test_resume_command_adds_or_replaces_resume():
    assert main_mar.resume_command(["--epochs", "3", "--output_dir", "out dir"], "out dir") == \
        "python main_mar.py --epochs 3 --output_dir 'out dir' --resume 'out dir'"
    assert main_mar.resume_command(["--resume", "old", "--epochs", "3"], "run") == \
        "python main_mar.py --epochs 3 --resume run"
    assert main_mar.resume_command(["--resume=old", "--lr", "1"], "run") == "python main_mar.py --lr 1 --resume run"


def test_a_command_under_torchrun_is_named_as_such(monkeypatch):
    """One of several processes cannot know torchrun's own options: the line says to give the same ones.
    Bug caught: `python main_mar.py` named for a multi-process run (a one-process restart of an 8-GPU job)."""
    from util import distributed
    monkeypatch.setattr(distributed, "get_world_size", lambda: 2)
    assert main_mar.resume_command(["--lr", "1"], "run") == "torchrun [the same options] main_mar.py --lr 1 --resume run"
    monkeypatch.setattr(distributed, "get_world_size", lambda: 1)
    assert distributed.launch_command("main_cache.py", ["--cached_path", "a b"]) == \
        "python main_cache.py --cached_path 'a b'"


def test_a_run_is_evaluated_on_its_own_data_set(tmp_path):
    """--evaluate --resume of a digits run without --dataset scores the digits (its stored --dataset), where
    the imagenet default would ask for FID statistics and then compute nothing."""
    run = tmp_path / "run"
    with mock.patch.dict(PRESETS, TINY_PRESETS):
        main_mar.main(parse(["--dataset", "digits", "--model", "test_tiny", "--inner_ar_width", "32",
                             "--inner_ar_heads", "2", "--buffer_size", "4", "--epochs", "1", "--batch_size", "128",
                             "--num_workers", "0", "--output_dir", str(run)]))
        args = parse(["--evaluate", "--resume", str(run), "--num_images", "10", "--eval_bsz", "10", "--num_iter", "2",
                      "--output_dir", str(tmp_path / "eval")])
        main_mar.main(args)
    assert args.dataset == "digits" and args.fid_stats == "none"
    log = (tmp_path / "eval" / "log.txt").read_text()
    assert re.search(r"evaluation .* accuracy \d\.\d+", log)
    assert "no metric will be computed" not in log
    assert main_mar.resolve_args(parse(["--dataset", "imagenet"]), {"dataset": "digits"}).dataset == "imagenet"


def test_an_evaluation_without_any_metric_says_so(tmp_path, caplog):
    args = main_mar.resolve_args(parse(tiny_flags(fid_stats="none", num_images=2)))
    main_mar.check_eval_args(args, new_config(tiny_flags(num_images=2)))
    assert "no metric will be computed (--fid_stats none, no --ref_batch" in caplog.text


def test_the_run_s_own_sampling_point_is_the_first_of_each_list():
    """--cfg 2 3 --temperature 0.9 1.1: generate() and the online evaluation draw at the first values, (2, 0.9)
    (bug: the last ones); the sweep keeps every point in the order given."""
    args = main_mar.resolve_args(parse(["--cfg", "2", "3", "--temperature", "0.9", "1.1"]))
    assert (args.cfg, args.temperature) == (2.0, 0.9)
    assert main_mar.sweep_points(args) == [(2.0, 0.9), (2.0, 1.1), (3.0, 0.9), (3.0, 1.1)]


def test_training_starts_from_the_rank_s_own_seeded_streams(tmp_path, monkeypatch):
    """The initial weights come from --seed; then each rank's torch, numpy and Python streams are re-seeded with
    --seed + rank (rank 0 here) before training (bug: the re-seed of torch left out: training would continue the
    weight-init stream, the same on every rank, so all ranks drew the same masks and label drops)."""
    import random
    import numpy as np
    import torch
    seen = {}

    def fake_train(*args, **kwargs):
        seen.update(torch=torch.get_rng_state(), numpy=np.random.get_state()[1].copy(), python=random.getstate())
        return 0

    monkeypatch.setattr(main_mar, "train", fake_train)
    data = make_image_folder(tmp_path / "data", per_class=1)
    run_main(tiny_flags(data_path=data, output_dir=tmp_path / "run", seed=7))
    assert torch.equal(seen["torch"], torch.manual_seed(7).get_state())
    np.random.seed(7)
    random.seed(7)
    assert np.array_equal(seen["numpy"], np.random.get_state()[1]) and seen["python"] == random.getstate()


def test_the_default_lr_scales_with_the_global_batch(monkeypatch):
    """--lr defaults to --blr x (processes x --batch_size) / 256: 1e-4 x 4 x 32 / 256 = 5e-5 on 4 processes
    (bug: the process count left out, which trains a multi-GPU run at a fraction of the recipe's lr)."""
    monkeypatch.setattr(main_mar.distributed, "get_world_size", lambda: 4)
    args = main_mar.resolve_args(parse(["--blr", "1e-4", "--batch_size", "32"]))
    assert args.lr == pytest.approx(5e-5, rel=1e-12)
    assert main_mar.resolve_args(parse(["--lr", "0.5", "--batch_size", "32"])).lr == 0.5  # a given lr is kept


def test_a_resumed_run_keeps_its_class_count_over_the_data_s(tmp_path):
    """Only a new run without --class_num takes the class count from the data; a resumed run keeps its
    checkpoint's (3 here, trained on a 2-class folder; bug: 2 taken from the data, and the resume fails on the
    class embedding's shape)."""
    from tests.pipeline_fixtures import load
    data = make_image_folder(tmp_path / "data", classes=2, per_class=1)
    run = tmp_path / "run"
    run_main(tiny_flags(data_path=data, output_dir=run, class_num=3, epochs=1))
    run_main(tiny_flags(data_path=data, output_dir=run, class_num=None, resume=run, epochs=2))
    ckpt = load(run / "checkpoint-last.pth")
    assert ckpt["epoch"] == 1 and ckpt["config"]["class_num"] == 3
