"""Sharp edges a new user hit (issue 32): unreadable array files, Ctrl-C during evaluation and sample.py,
and a data set with fewer classes than the --class_num default. Each ends in one line naming the flag or
file and what to do; nothing is ever loaded with allow_pickle."""
import argparse
import json
import os
import shlex
import shutil
import signal
import textwrap
from unittest import mock

import numpy as np
import pytest
from torch.utils.data import DataLoader

import main_mar
from tests.conftest import REPO
from models import PRESETS
from tests.pipeline_fixtures import (TINY, load, make_image_folder, python, run, run_main, TINY_PRESET,
                                    tiny_flags)
from tests.test_cache import fake_cache
from util.evaluation import metrics
from util.train.state import LAST
from util.data.datasets import CachedLatents, NpzLatentFolder
from util.train.preemption import INTERRUPT_EXIT, REQUEUE_EXIT

pytestmark = pytest.mark.usefixtures("one_thread")


def assert_one_line(err, *parts):
    text = str(err.value)
    assert "\n" not in text and "allow_pickle" not in text, text
    for part in parts:
        assert str(part) in text, (part, text)


# ----------------------------------------------------------------------------- item 1: array files
def write_bad_npz(path, kind):
    """A file that is not a usable npz of float arrays, as a user might pass one by mistake."""
    if kind == "garbage":
        path.write_bytes(np.random.default_rng(0).bytes(300))
    elif kind == "json":
        path.write_text(json.dumps({"mu": [0.0, 1.0], "sigma": [[1.0, 0.0], [0.0, 1.0]]}))
    elif kind == "object":
        np.savez(path, mu=np.array([0.0, None], dtype=object), sigma=np.eye(2))
    elif kind == "truncated":
        np.savez(path, mu=np.zeros(64), sigma=np.eye(64))
        path.write_bytes(path.read_bytes()[:2000])
    elif kind == "empty":
        path.write_bytes(b"")
    return path


WHY = {"garbage": "not a numpy .npy/.npz file", "json": "not a numpy .npy/.npz file",
       "object": "array of Python objects", "truncated": "corrupt or not a numpy file (BadZipFile",
       "empty": "empty or truncated"}


@pytest.mark.parametrize("kind", sorted(WHY))
def test_bad_fid_stats_file_is_one_line(tmp_path, kind):
    path = write_bad_npz(tmp_path / "stats.npz", kind)
    with pytest.raises(ValueError) as err:
        metrics.load_fid_stats(str(path))
    assert_one_line(err, "--fid_stats", path, WHY[kind])


def test_bad_fid_stats_through_main_mar_is_one_line_naming_the_flag(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(PRESETS, TINY, TINY_PRESET)
    path = write_bad_npz(tmp_path / "stats.npz", "object")
    with pytest.raises(SystemExit) as exit_info:
        main_mar.cli(tiny_flags(data_path=tmp_path, output_dir=tmp_path / "run", online_eval=True,
                                fid_stats=path))
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "allow_pickle" not in err
    assert [line.split("main_mar: ", 1)[1] for line in err.splitlines() if "ERROR" in line] == [
        f"--fid_stats {path} is unreadable: it holds an array of Python objects (dtype object), which is never "
        "unpickled; pass an .npz of arrays 'mu' and 'sigma' (or --fid_stats none)"]


@pytest.mark.parametrize("damage, part, why", [
    ("truncate", "shard-00000.npy", "empty or truncated"),
    ("object", "shard-00000-labels.npy", "array of Python objects"),
    ("garbage", "shard-00000-labels.npy", "not a numpy .npy/.npz file"),
    ("shape", "shard-00000.npy", "not [6, 2, ...] as index.json says"),
])
def test_damaged_cache_shard_stops_at_start_up_with_one_line(tmp_path, damage, part, why):
    root = fake_cache(tmp_path / "cache")
    target = root / part
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:-10])
    elif damage == "object":
        np.save(target, np.array([0, None, 1, 0, 1, 0], dtype=object), allow_pickle=True)  # the file is the attack
    elif damage == "garbage":
        target.write_bytes(b"\x80\x04not an array")
    else:
        np.save(target, np.zeros((5, 2, 4, 2, 2), np.float16))
    with pytest.raises(ValueError) as err:
        CachedLatents(root)
    assert_one_line(err, f"--cached_path {root}", part, why, "delete shard-00000.json and index.json")


def write_mar_cache(root, bad_index=None):
    """MAR's per-image cache, <class>/<name>.npz; file number `bad_index` holds object arrays."""
    for i in range(4):
        folder = root / f"n0{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        moments = np.full((32, 1, 1), float(i), np.float32)
        if i == bad_index:
            moments = np.array([moments, None], dtype=object)
        np.savez(folder / f"x{i}.npz", moments=moments, moments_flip=moments)
    return root


def test_bad_mar_npz_cache_file_is_one_line_naming_it(tmp_path):
    root = write_mar_cache(tmp_path / "first", bad_index=0)
    with pytest.raises(ValueError) as err:
        NpzLatentFolder(root).moments_shape()
    assert_one_line(err, f"--cached_path {root}", root / "n00" / "x0.npz", "array of Python objects")

    # a later file fails when it is read, inside a DataLoader worker: main_mar prints the worker's line only
    dataset = NpzLatentFolder(write_mar_cache(tmp_path / "later", bad_index=3))
    with pytest.raises(ValueError) as err:
        list(DataLoader(dataset, batch_size=4, num_workers=1))
    assert "\n" in str(err.value)  # torch wraps it in the worker's traceback
    line = main_mar.one_line(err.value)
    assert line.startswith(f"--cached_path {dataset.root}: {dataset.samples[3][0]} is unusable: it holds an array "
                           "of Python objects") and "\n" not in line


# ----------------------------------------------------------------------------- item 2: Ctrl-C
# The process sends SIGINT to itself during generation call STOP_AT (as tests/test_preemption.py does for
# training): the batches before it are finished, that one is cut short.
LAUNCHER = textwrap.dedent(f"""
    import os, signal, sys
    sys.path.insert(0, {str(REPO)!r})
    from tests.pipeline_fixtures import TINY, TINY_PRESET
    from models import PRESETS
    PRESETS[TINY] = TINY_PRESET
    import engine_mar, main_mar, sample
    module, stop_at, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    # a shell without job control starts background commands (`cmd &`, nohup) with SIGINT ignored, and
    # Python then installs no KeyboardInterrupt handler: restore the one a terminal would give
    signal.signal(signal.SIGINT, signal.default_int_handler)
    owner = engine_mar if module == "main_mar" else sample
    real, calls = owner.generate, []

    def generate(*args, **kwargs):
        calls.append(1)
        if len(calls) == stop_at:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    owner.generate = generate
    main_mar.cli(argv) if module == "main_mar" else sample.main(argv)
""")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tiny_run")
    run_main(tiny_flags(data_path=make_image_folder(tmp / "data", per_class=2), output_dir=tmp / "run", epochs=1))
    (tmp / "launch.py").write_text(LAUNCHER)
    return tmp


def interrupted(tiny_run, module, stop_at, argv):
    result = run([python(), str(tiny_run / "launch.py"), module, str(stop_at), *argv], timeout=120)
    assert result.returncode == INTERRUPT_EXIT, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if "interrupted (Ctrl-C)" in line]
    assert len(lines) == 1, result.stderr[-2000:]
    return lines[0]


def test_ctrl_c_during_evaluate_keeps_the_images_and_names_the_resume_command(tiny_run, tmp_path):
    flags = dict(resume=tiny_run / "run", evaluate=True, num_images=8, eval_bsz=2, num_iter=2, fid_stats="none")
    argv = tiny_flags(output_dir=tmp_path / "eval", **flags)
    line = interrupted(tiny_run, "main_mar", 3, argv)  # batches 0 and 1 are done, batch 2 is cut short
    folder = next((tmp_path / "eval").glob("eval-*"))
    assert f"4 of 8 images are finished and kept in {folder}" in line
    assert line.endswith(f"(exit code {INTERRUPT_EXIT}): python main_mar.py {shlex.join(argv)}")
    assert sorted(p.name for p in (folder / "images").glob("*.png")) == [f"{i:06d}.png" for i in range(4)]

    # the command it names resumes: the 4 kept images are reused, and all 8 equal an uninterrupted run's
    run_main(argv)
    resumed = json.loads((folder / "metrics.json").read_text())
    assert (resumed["images_kept"], resumed["images_drawn"]) == (4, 4)
    run_main(tiny_flags(output_dir=tmp_path / "whole", **flags))
    whole = next((tmp_path / "whole").glob("eval-*"))
    assert whole.name == folder.name
    assert {p.name: p.read_bytes() for p in (folder / "images").glob("*.png")} == \
        {p.name: p.read_bytes() for p in (whole / "images").glob("*.png")}


def test_ctrl_c_during_sample_py_is_one_line_and_writes_nothing(tiny_run, tmp_path):
    argv = ["--ckpt", str(tiny_run / "run"), "--classes", "0", "1", "--num_per_class", "2", "--batch_size", "1",
            "--num_iter", "2", "--cfg", "1", "--device", "cpu", "--out", str(tmp_path / "grid.png"),
            "--save_dir", str(tmp_path / "each")]
    line = interrupted(tiny_run, "sample", 2, argv)
    assert "nothing was written" in line
    assert line.endswith(f"(exit code {INTERRUPT_EXIT}): python sample.py {shlex.join(argv)}")
    assert list(tmp_path.iterdir()) == []


def cli_exit(argv, capsys):
    """main_mar.cli(argv) with the tiny models registered: its exit code and its lines on stderr."""
    with mock.patch.dict(PRESETS, {TINY: TINY_PRESET}), pytest.raises(SystemExit) as stop:
        main_mar.cli(argv)
    return stop.value.code, capsys.readouterr().err


def test_ctrl_c_before_the_training_loop_is_one_line_naming_the_command(tiny_run, tmp_path, monkeypatch, capsys):
    """Ctrl-C while the data set is read (minutes for ImageNet) ended in a traceback. Bugs caught: the line
    missing, the resume command where no checkpoint exists, and the wrong run folder resumed."""
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(main_mar, "build_dataset", interrupt)
    data = tiny_run / "data"
    argv = tiny_flags(data_path=data, output_dir=tmp_path / "fresh", epochs=2)
    code, err = cli_exit(argv, capsys)
    lines = [line for line in err.splitlines() if "interrupted (Ctrl-C)" in line]
    assert code == INTERRUPT_EXIT and "Traceback" not in err and len(lines) == 1, err
    assert lines[0].endswith("interrupted (Ctrl-C) before the first checkpoint: none was written; the same command "
                             f"starts again (exit code {INTERRUPT_EXIT}): python main_mar.py {shlex.join(argv)}")
    assert not (tmp_path / "fresh").exists()

    trained = tmp_path / "trained"
    shutil.copytree(tiny_run / "run", trained)
    before = (trained / LAST).read_bytes()
    argv = tiny_flags(data_path=data, output_dir=trained, epochs=2) + ["--resume", str(trained)]
    code, err = cli_exit(argv, capsys)
    lines = [line for line in err.splitlines() if "interrupted (Ctrl-C)" in line]
    assert code == INTERRUPT_EXIT and len(lines) == 1, err
    assert lines[0].endswith(f"interrupted (Ctrl-C) outside the training loop: {trained / LAST} is as it was; to "
                             f"continue (exit code {INTERRUPT_EXIT}): python main_mar.py {shlex.join(argv)}")
    assert (trained / LAST).read_bytes() == before


def test_the_stop_line_of_cli_argv_names_that_command_line(tiny_run, tmp_path, monkeypatch, capsys):
    """main_mar.cli(argv) called from Python: the "to continue" line is argv's command, not sys.argv's
    (pytest's own command line, here)."""
    import engine_mar
    real, calls = engine_mar.to_latents, []

    def to_latents(*args):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args)

    monkeypatch.setattr(engine_mar, "to_latents", to_latents)
    argv = tiny_flags(data_path=tiny_run / "data", output_dir=tmp_path / "run", epochs=2)
    code, err = cli_exit(argv, capsys)
    lines = [line for line in err.splitlines() if "SIGINT: stopped after global step 2" in line]
    assert code == REQUEUE_EXIT and len(lines) == 1, err
    assert lines[0].endswith(f"to continue: python main_mar.py {shlex.join(argv)} --resume {tmp_path / 'run'}")


# ----------------------------------------------------------------------------- item 5: --class_num
def test_fewer_classes_than_the_default_class_num_sets_it_and_says_so(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", classes=2, per_class=2)
    run_main(tiny_flags(data_path=data, output_dir=tmp_path / "auto", epochs=1, class_num=None))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "the data set has" in line]
    assert len(lines) == 1 and lines[0].endswith("the data set has 2 classes: --class_num set to 2 (the --dataset "
                                                 "imagenet default is 1000; pass --class_num to choose)")
    assert '"class_num": 2,' in err  # the logged model config
    ckpt = load(tmp_path / "auto" / LAST)
    assert ckpt["config"]["class_num"] == 2 and ckpt["model"]["class_emb.weight"].shape == (2, 32)

    # given explicitly, --class_num is the user's choice (more slots than classes) and nothing is said
    run_main(tiny_flags(data_path=data, output_dir=tmp_path / "given", epochs=1, class_num=5))
    assert "--class_num set to" not in capsys.readouterr().err
    assert load(tmp_path / "given" / LAST)["model"]["class_emb.weight"].shape == (5, 32)
    with pytest.raises(ValueError, match="the data set has 2 classes but --class_num is 1"):
        run_main(tiny_flags(data_path=data, output_dir=tmp_path / "fewer", epochs=1, class_num=1))


def test_no_allow_pickle_anywhere():
    """The fixes above never reach for numpy's unsafe switch (this file is the only one that names it)."""
    offenders = [str(p.relative_to(REPO)) for p in REPO.rglob("*.py") if ".venv" not in p.parts
                 and p.name != "test_sharp_edges.py" and "allow_pickle=True" in p.read_text()]
    assert offenders == []


def test_interrupt_exit_code_is_documented():
    assert INTERRUPT_EXIT == 128 + 2  # the shell's code for a death by SIGINT
    assert f"exits with code **{INTERRUPT_EXIT}**" in (REPO / "README.md").read_text()


def test_the_ctrl_c_line_counts_the_images_of_this_runs_newest_evaluation(tmp_path):
    """Bugs caught: the oldest evaluation folder counted instead of the newest, and an earlier run's folder
    counted as this run's."""
    def evaluation(name, images, mtime):
        folder = tmp_path / name / "images"
        folder.mkdir(parents=True)
        for i in range(images):
            (folder / f"{i:06d}.png").write_bytes(b"")
        os.utime(folder, (mtime, mtime))

    args = argparse.Namespace(output_dir=str(tmp_path), num_images=8)
    evaluation("eval-earlier-run", 5, 1000)
    line = main_mar.interrupted_evaluation(args, ["--evaluate"], since=2000)
    assert line.startswith("interrupted (Ctrl-C): this run had written no image yet; ")
    evaluation("eval-a", 3, 2010)
    evaluation("eval-b", 2, 2020)
    line = main_mar.interrupted_evaluation(args, ["--evaluate"], since=2000)
    assert line == (f"interrupted (Ctrl-C): 2 of 8 images are finished and kept in {tmp_path / 'eval-b'}; the same "
                    "command resumes, drawing only the unfinished batches (exit code 130): python main_mar.py --evaluate")
