"""The run folder: one live run at a time, --resume typos, fresh first launches, changed settings on
resume, stale temp files of killed saves, and files that honour the umask."""
import errno
import os
import stat

import pytest

from tests.pipeline_fixtures import load, make_image_folder, run_main, tiny_flags
from util.train.state import LAST
from util.io.files import atomic_write, remove_stale_temps
from util.train import run_folder
from util.train.run_folder import FolderInUse, RunLock, claim_run_folder

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


def test_atomic_write_fsyncs_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    """Bugs caught: the file's fsync dropped (a crash after the rename can leave an empty file), or the folder's."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", stat.S_ISDIR(os.fstat(fd).st_mode))),
                                                real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", None)), real_replace(a, b)))
    atomic_write(tmp_path / "f", lambda f: f.write(b"x"))
    assert events == [("fsync", False), ("replace", None), ("fsync", True)]


def test_a_failed_atomic_write_keeps_the_old_file_and_leaves_no_temp(tmp_path, umask):
    """Bugs caught: the temp file left behind when write() raises; the process umask changed by reading it."""
    umask(0o027)
    path = tmp_path / "f"
    path.write_bytes(b"old")

    def write(f):
        f.write(b"half")
        raise RuntimeError("disk on fire")
    with pytest.raises(RuntimeError, match="disk on fire"):
        atomic_write(path, write)
    assert os.listdir(tmp_path) == ["f"] and path.read_bytes() == b"old"
    atomic_write(path, lambda f: f.write(b"new"))
    assert os.umask(0o027) == 0o027  # still the one set above


def test_only_atomic_write_temps_are_stale(tmp_path):
    """Bugs caught: the temp-name pattern loosened (a user's notes.v2.tmp deleted), a folder named like a temp
    passed to os.remove (the run dies at start)."""
    stale = "checkpoint-last.pth.k3j_9x2a.tmp"
    keep = ["notes.v2.tmp", "a.abcdefghi.tmp", "a.abcdefg.tmp", "a.ABCDEFGH.tmp", "a.abcdefgh.tmp.keep"]
    for name in [stale, *keep]:
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "dir.abcdefgh.tmp").mkdir()
    assert remove_stale_temps(tmp_path) == [stale]
    assert sorted(os.listdir(tmp_path)) == sorted(keep + ["dir.abcdefgh.tmp"])


def test_without_file_locks_temp_files_are_kept(tmp_path, monkeypatch, caplog):
    """Bug caught: stale temps removed although flock is unsupported (a live run's temp file looks the same)."""
    temp = tmp_path / (LAST + ".k3j_9x2a.tmp")
    temp.write_bytes(b"maybe a live run's")

    def flock(f, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
    monkeypatch.setattr(run_folder.fcntl, "flock", flock)
    lock = claim_run_folder(str(tmp_path))
    lock.release()
    assert temp.read_bytes() == b"maybe a live run's"
    assert "this file system has no file locks" in caplog.text


def test_a_refused_lock_closes_its_file_and_a_released_one_can_be_taken_again(tmp_path):
    """Bugs caught: the refused RunLock kept its file open (one leaked descriptor per refusal), and release() not
    closing the file (the flock held until the process ended, so the folder stayed in use)."""
    first = RunLock(str(tmp_path))
    assert first.acquire()
    refused = RunLock(str(tmp_path))
    with pytest.raises(FolderInUse):
        refused.acquire()
    assert refused.file is None
    first.release()
    assert first.file is None
    again = RunLock(str(tmp_path))
    assert again.acquire()  # the kernel dropped the first lock when release() closed its file
    again.release()


def test_every_rank_refuses_a_folder_in_use_that_rank_0_found(tmp_path, monkeypatch):
    """A rank other than 0 takes rank 0's refusal from the broadcast and raises too. Bug caught: the broadcast
    dropped, so only rank 0 stopped and the other ranks waited for it in their first collective."""
    monkeypatch.setattr(run_folder.distributed, "is_main_process", lambda: False)
    monkeypatch.setattr(run_folder.distributed, "broadcast_object", lambda obj: "--output_dir x is in use")
    with pytest.raises(FolderInUse, match="--output_dir x is in use"):
        claim_run_folder(str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()  # only rank 0 creates and locks the folder
