"""The run folder: one live run at a time, --resume typos, fresh first launches, changed settings on
resume, stale temp files of killed saves, and files that honour the umask."""
import os
import stat

import pytest

from tests.pipeline_fixtures import load, make_image_folder, run_main, tiny_flags
from util.train.state import LAST
from util.io.files import atomic_write
from util.train.run_folder import FolderInUse, RunLock

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def umask():
    """Set the process umask for a test and put the old one back."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_written_files_honour_the_umask(tmp_path, umask):
    for mask, expected in ((0o027, 0o640), (0o002, 0o664)):
        umask(mask)
        path = tmp_path / f"file-{mask:o}"
        atomic_write(path, lambda f: f.write(b"x"))
        assert mode(path) == expected  # mkstemp alone would give 0600


def test_a_live_run_locks_its_folder_and_stale_temp_files_go(tmp_path, umask, capsys):
    data = make_image_folder(tmp_path / "data", per_class=2)
    run = tmp_path / "run"
    run.mkdir()
    stale = run / (LAST + ".k3j_9x2a.tmp")  # what atomic_write leaves when killed while saving
    stale.write_bytes(b"half a checkpoint")
    (run / "notes.tmp").write_text("not ours")
    (run / ".lock").write_text("process 1 on a machine that died\n")  # a lock file nobody holds

    other = RunLock(str(run))
    assert other.acquire()  # a live run (here: this test) holds the folder
    try:
        with pytest.raises(FolderInUse, match=f"--output_dir {run} is in use by a live run \\(process {os.getpid()}"):
            run_main(tiny_flags(data_path=data, output_dir=run, epochs=1))
        assert stale.exists() and not (run / "log.txt").exists()  # the refused run touched nothing
    finally:
        other.release()

    umask(0o002)
    run_main(tiny_flags(data_path=data, output_dir=run, epochs=1))
    assert not stale.exists() and (run / "notes.tmp").read_text() == "not ours"
    assert "removed 1 temp file(s) of a run killed while saving: " + stale.name in capsys.readouterr().err
    assert mode(run / LAST) == 0o664
    assert RunLock(str(run)).acquire()  # released when the run ended


def test_resume_typo_fresh_first_launch_and_changed_settings(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", per_class=2)
    run = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match=f"--resume {tmp_path / 'rnu'}: no such"):
        run_main(tiny_flags(data_path=data, output_dir=run, resume=tmp_path / "rnu", epochs=1))
    assert not run.exists()

    # the README's command passes --resume OUTPUT_DIR from the first launch on
    run_main(tiny_flags(data_path=data, output_dir=run, resume=run, epochs=1))
    assert f"--resume {run} holds no {LAST} yet: starting a fresh run" in capsys.readouterr().err
    assert load(run / LAST)["epoch"] == 0

    empty = tmp_path / "empty"
    empty.mkdir()
    run_main(tiny_flags(data_path=data, output_dir=tmp_path / "other", resume=empty, epochs=1))
    assert f"--resume {empty} holds no {LAST} yet: starting a fresh run" in capsys.readouterr().err

    lr = load(run / LAST)["args"]["lr"]
    run_main(tiny_flags(data_path=data, output_dir=run, resume=run, epochs=2, lr=0.001, ema_rate=0.99))
    warnings = [line for line in capsys.readouterr().err.splitlines() if "changed training settings" in line]
    assert len(warnings) == 1
    assert f"--lr 0.001 (was {lr})" in warnings[0] and "--ema_rate 0.99 (was 0.9999)" in warnings[0]
    assert "--epochs 2 (was 1)" in warnings[0] and "label_drop_prob" not in warnings[0]
