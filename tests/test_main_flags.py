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


def test_the_run_flags_default_to_mar_s_recipe():
    """The defaults of MAR's main_mar.py (batch 16 per process, 10 workers, seed 1, checkpoint-last every 5 epochs,
    online evaluation every 40, 50,000 images drawn 64 a batch in 64 steps with the linear CFG ramp), the EMA
    weights evaluated, the release's SIR sampler, and 8-bit data's 256 grey levels. Bug: a default edited (no other
    test reads them: the suite passes every flag it relies on)."""
    args = parse([])
    got = {k: getattr(args, k) for k in ("batch_size", "num_workers", "seed", "save_last_freq", "save_copy_freq",
                                         "save_every_steps", "eval_freq", "num_images", "eval_bsz", "num_iter",
                                         "cfg_list", "temperature_list", "cfg_schedule", "cfg_sampler",
                                         "eval_weights", "pixel_levels", "pin_mem")}
    assert got == {"batch_size": 16, "num_workers": 10, "seed": 1, "save_last_freq": 5, "save_copy_freq": 0,
                   "save_every_steps": 0, "eval_freq": 40, "num_images": 50000, "eval_bsz": 64, "num_iter": 64,
                   "cfg_list": [1.0], "temperature_list": [1.0], "cfg_schedule": "linear", "cfg_sampler": "sir",
                   "eval_weights": "ema", "pixel_levels": 256, "pin_mem": True}


def test_an_evaluation_draws_each_point_once_and_tables_only_a_sweep(tmp_path, monkeypatch):
    """The online evaluation's points are (1, T) and (--cfg, T): with the default --cfg 1 that is one point, drawn
    once, and one point is no sweep (no table or plot). Bugs: the repeated point drawn twice (an hour of sampling on
    ImageNet), a one-point "sweep" table."""
    import types
    calls = []

    def fake_evaluate(model, tokenizer, ema, args, epoch, cfg, temperature, **kwargs):
        calls.append((cfg, temperature))
        return {"cfg": cfg, "temperature": temperature, "fid": 5.0 - cfg, "folder": f"eval-{cfg}-{temperature}"}

    monkeypatch.setattr(main_mar, "evaluate", fake_evaluate)
    model = types.SimpleNamespace(sampling_steps=lambda num_iter: num_iter)
    args = types.SimpleNamespace(output_dir=str(tmp_path), num_iter=4, num_images=8, eval_weights="ema")
    results = main_mar.run_evaluations(model, None, None, args, 0, None, [(1.0, 1.0), (1.0, 1.0)], None, None)
    assert calls == [(1.0, 1.0)] and len(results) == 1
    assert list(tmp_path.iterdir()) == []
    main_mar.run_evaluations(model, None, None, args, 0, None, [(1.0, 1.0), (2.0, 1.0)], None, None)
    assert calls == [(1.0, 1.0), (1.0, 1.0), (2.0, 1.0)]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"sweep-ep0-iter4-n8-ema.{ext}" for ext in ("csv", "json",
                                                                                                         "png")]


def test_tensorboard_logs_go_to_the_given_log_dir_else_the_run_folder():
    """Bug: --log_dir overwritten by --output_dir (the logs of every run in one given folder went nowhere near it)."""
    assert main_mar.resolve_args(parse(["--output_dir", "run"])).log_dir == "run"
    assert main_mar.resolve_args(parse(["--output_dir", "run", "--log_dir", "tb/run"])).log_dir == "tb/run"


def test_a_run_folder_holding_another_run_s_checkpoint_is_refused_whatever_is_resumed(tmp_path):
    """--output_dir A already holds checkpoint-last.pth: a fresh run, or one resuming another folder's checkpoint B,
    would overwrite A's; only resuming A itself continues there. Bug: only a fresh run refused (--resume B
    --output_dir A wrote over A's run)."""
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    for run in (run_a, run_b):
        run.mkdir()
        (run / main_mar.LAST).write_bytes(b"ckpt")
    args = main_mar.resolve_args(parse(tiny_flags(output_dir=run_a)))
    for ckpt_file in (None, str(run_b / main_mar.LAST)):
        with pytest.raises(ValueError, match=f"--output_dir {run_a} already holds {main_mar.LAST} from another run"):
            main_mar.check_args(args, ckpt_file)
    main_mar.check_args(args, str(run_a / main_mar.LAST))


def test_a_missing_init_outer_from_is_one_line_before_anything_is_built(tmp_path):
    """Bug: the check dropped (the run failed after building the data set and model, on the file's open)."""
    args = main_mar.resolve_args(parse(tiny_flags(output_dir=tmp_path / "run",
                                                  init_outer_from=tmp_path / "none.pth")))
    with pytest.raises(FileNotFoundError, match=r"^--init_outer_from .*none\.pth: no such checkpoint$"):
        main_mar.check_args(args, None)


@pytest.mark.parametrize("img_size", [128, 512])
def test_imagenet_s_fid_statistics_are_refused_at_any_other_size(tmp_path, img_size):
    """The default reference statistics are of 256-px ImageNet: FID against them at 128 or 512 px means nothing.
    Bug: only smaller sizes refused."""
    args = main_mar.resolve_args(parse(tiny_flags(num_images=2)))
    assert args.fid_stats == main_mar.DATASETS["imagenet"].fid_stats
    config = new_config(tiny_flags(num_images=2, img_size=img_size))
    with pytest.raises(ValueError, match=f"is for 256px images; pass --fid_stats for --img_size {img_size}"):
        main_mar.check_eval_args(args, config)


def test_an_inception_path_must_be_a_file(tmp_path, monkeypatch):
    """Bug: any existing path accepted (a folder failed only later, once the Inception weights were read)."""
    from util.evaluation import metrics
    monkeypatch.setattr(metrics, "load_fid_stats", lambda path: None)
    args = main_mar.resolve_args(parse(tiny_flags(num_images=2, fid_stats=tmp_path / "stats.npz",
                                                  inception_path=tmp_path)))
    config = new_config(tiny_flags(num_images=2))
    with pytest.raises(FileNotFoundError, match=f"^--inception_path {tmp_path}: no such file$"):
        main_mar.check_eval_args(args, config)
    (tmp_path / "inception.pth").write_bytes(b"weights")
    args.inception_path = str(tmp_path / "inception.pth")
    main_mar.check_eval_args(args, config)


def test_a_data_set_with_more_classes_than_class_num_is_refused(tmp_path):
    """3 class folders, --class_num 2: the third class's label is no class of the model. Bug: an off-by-one let one
    class too many through."""
    data = make_image_folder(tmp_path / "data", classes=3, per_class=1)
    with pytest.raises(ValueError, match=r"^the data set has 3 classes but --class_num is 2$"):
        run_main(tiny_flags(data_path=data, output_dir=tmp_path / "run", class_num=2, epochs=1))
    assert not (tmp_path / "run" / main_mar.LAST).exists()


def test_online_evaluation_draws_cfg_1_and_the_run_s_point_every_eval_freq_epochs_and_at_the_end(tmp_path,
                                                                                                 monkeypatch):
    """--online_eval --eval_freq 2 over 2 epochs: epochs 0 (MAR's epoch % eval_freq == 0) and 1 (the last), each at
    cfg 1 and at the run's (--cfg 3, --temperature 0.9). Bugs: the unguided point left out; every eval_freq-th epoch
    counted from 1 (epoch 1 alone)."""
    seen = []
    monkeypatch.setattr(main_mar, "run_evaluations",
                        lambda model, tokenizer, ema, args, epoch, writer, points, *rest: seen.append((epoch, points))
                        or [])
    data = make_image_folder(tmp_path / "data", per_class=1)
    run_main(tiny_flags(data_path=data, output_dir=tmp_path / "run", epochs=2, online_eval=True, eval_freq=2,
                        fid_stats="none", num_images=2, eval_bsz=2, num_iter=2)
             + ["--cfg", "3", "--temperature", "0.9"])
    assert seen == [(0, [(1.0, 0.9), (3.0, 0.9)]), (1, [(1.0, 0.9), (3.0, 0.9)])]


def test_use_cached_without_cached_path_is_one_line(tmp_path):
    """Bug: the check dropped (the run went on to read latents from an empty --cached_path)."""
    args = main_mar.resolve_args(parse(tiny_flags(output_dir=tmp_path / "run", use_cached=True)))
    with pytest.raises(ValueError, match=r"^--use_cached needs --cached_path \(latents written by main_cache\.py\)$"):
        main_mar.check_args(args, None)
    args.cached_path = str(tmp_path / "cache")
    main_mar.check_args(args, None)
