"""Preemption: a stop signal on any rank -> every rank finishes the step, one step-granular checkpoint,
exit code REQUEUE_EXIT; the same command with --resume continues bit-identically."""
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from torch.utils.data import DataLoader

import engine_mar
import main_mar
from models import PRESETS
from tests.conftest import REPO
from tests.pipeline_fixtures import (TINY, load, make_image_folder, python, subprocess_env, TINY_PRESET, tiny_flags,
                                     torchrun)
from tests.test_checkpoint import assert_same_optimizer, assert_same_tensors
from util.train import state as checkpoint
from util.train.state import LAST
from util.train.preemption import REQUEUE_EXIT, SIGNALS, StopRequest, ignore_stop_signals, start_workers

pytestmark = pytest.mark.usefixtures("one_thread")


def signal_self_at(step, signum):
    """A to_latents that sends `signum` to this process in the middle of optimizer step `step` (1-based)."""
    real, calls = engine_mar.to_latents, {"n": 0}

    def to_latents(*args):
        calls["n"] += 1
        if calls["n"] == step:
            os.kill(os.getpid(), signum)
        return real(*args)
    return to_latents


def main_exit_code(flags, monkeypatch):
    monkeypatch.setitem(PRESETS, TINY, TINY_PRESET)
    return main_mar.main(main_mar.get_args_parser().parse_args(flags))


def assert_same_run(a, b):
    assert a["train_state"]["global_step"] == b["train_state"]["global_step"]
    assert_same_tensors(a["model"], b["model"], "model")
    assert_same_tensors(a["model_ema"], b["model_ema"], "model_ema")
    assert_same_optimizer(a["optimizer"], b["optimizer"])


def test_sigint_saves_at_the_step_and_resume_is_bit_identical(tmp_path, monkeypatch, capsys):
    data = make_image_folder(tmp_path / "data", per_class=5)  # 10 images / batch 2 = 5 steps per epoch
    common = dict(data_path=data, epochs=2, label_drop_prob=0.5)
    assert main_exit_code(tiny_flags(output_dir=tmp_path / "whole", **common), monkeypatch) == 0
    handler = signal.getsignal(signal.SIGINT)

    run = tmp_path / "run"
    flags = tiny_flags(output_dir=run, resume=run, **common)
    with monkeypatch.context() as patch:
        patch.setattr(engine_mar, "to_latents", signal_self_at(7, signal.SIGINT))
        patch.setattr(sys, "argv", ["main_mar.py", *flags])
        assert main_exit_code(flags, monkeypatch) == REQUEUE_EXIT
    stopped = load(run / LAST)["train_state"]
    assert (stopped["global_step"], stopped["epoch"], stopped["step_in_epoch"]) == (7, 1, 2)
    assert signal.getsignal(signal.SIGINT) is handler  # the handlers are put back
    lines = [line for line in capsys.readouterr().err.splitlines() if "SIGINT" in line]
    assert len(lines) == 1 and f"stopped after global step 7 with {run / LAST} saved; exiting with code 75" in lines[0]
    # the command to run, not "the same command": the one given, its --resume moved to the end
    i = flags.index("--resume")
    assert lines[0].endswith(f"to continue: python main_mar.py {shlex.join(flags[:i] + flags[i + 2:])} --resume {run}")

    assert main_exit_code(flags, monkeypatch) == 0
    assert_same_run(load(tmp_path / "whole" / LAST), load(run / LAST))


# One torchrun launch runs the three jobs in turn (starting torchrun costs far more than these steps):
# the uninterrupted run, a run whose rank 1 alone gets SIGTERM during step 2, and its --resume.
def test_a_signal_during_the_epoch_end_save_stops_before_the_next_epoch(tmp_path, monkeypatch):
    data = make_image_folder(tmp_path / "data", per_class=5)  # 5 steps per epoch
    real, saves = checkpoint.atomic_torch_save, []

    def save_then_signal(obj, path):
        saves.append(obj["train_state"]["global_step"])
        real(obj, path)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(checkpoint, "atomic_torch_save", save_then_signal)
    assert main_exit_code(tiny_flags(data_path=data, output_dir=tmp_path / "run", epochs=3), monkeypatch) == \
        REQUEUE_EXIT
    assert saves == [5]  # not one more step, and no second save of the same step
    state = load(tmp_path / "run" / LAST)["train_state"]
    assert (state["epoch"], state["step_in_epoch"]) == (1, 0)



def test_a_signal_during_the_last_epoch_s_save_still_ends_the_finished_run_with_0(tmp_path, monkeypatch):
    """Every epoch trained and saved: a signal arriving in the final save is no reason to requeue (bug: asking
    the ranks to agree on a stop after the last epoch too, which returns REQUEUE_EXIT for a finished run)."""
    data = make_image_folder(tmp_path / "data", per_class=1)  # 1 step per epoch
    real, saves = checkpoint.atomic_torch_save, []

    def save_then_signal(obj, path):
        saves.append(obj["train_state"]["global_step"])
        real(obj, path)
        if len(saves) == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(checkpoint, "atomic_torch_save", save_then_signal)
    assert main_exit_code(tiny_flags(data_path=data, output_dir=tmp_path / "run", epochs=2, save_last_freq=1),
                          monkeypatch) == 0
    assert saves == [1, 2]
    assert load(tmp_path / "run" / LAST)["train_state"]["epoch"] == 2


LAUNCHER = textwrap.dedent(f"""
    import os, signal, sys
    sys.path.insert(0, {str(REPO)!r})
    from tests.pipeline_fixtures import TINY, TINY_PRESET
    from tests.test_preemption import signal_self_at
    from models import PRESETS
    PRESETS[TINY] = TINY_PRESET
    import engine_mar, main_mar
    from util import distributed
    distributed.cleanup_distributed = distributed.barrier  # one process group for the three jobs
    real = engine_mar.to_latents
    codes = []
    for job, flags in zip(("whole", "stopped", "resumed"), sys.argv[1].split(" -- ")):
        signalled = job == "stopped" and os.environ["RANK"] == "1"
        engine_mar.to_latents = signal_self_at(2, signal.SIGTERM) if signalled else real
        codes.append(str(main_mar.main(main_mar.get_args_parser().parse_args(flags.split()))))
    with open(os.path.join(sys.argv[2], "exit-codes-rank" + os.environ["RANK"]), "w") as f:
        f.write(" ".join(codes))
    # what main_mar's cleanup would have done: a group left to the interpreter's exit can abort a rank (SIGABRT)
    import torch.distributed as dist
    dist.barrier()
    dist.destroy_process_group()
""")


def test_sigterm_on_one_rank_of_two_stops_both_and_resume_is_bit_identical(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=6)  # 12 images / (2 x batch 2) = 3 steps per epoch
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER)
    jobs = [" ".join(tiny_flags(data_path=data, epochs=2, label_drop_prob=0.5, output_dir=out, resume=out))
            for out in (tmp_path / "whole", tmp_path / "run", tmp_path / "run")]
    result = subprocess.run(torchrun() + ["--standalone", "--nproc_per_node=2", str(launcher), " -- ".join(jobs),
                                          str(tmp_path)],
                            cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    # rank 0 was not signalled, yet it stopped with rank 1 (else the two would hang or diverge)
    for rank in (0, 1):
        assert (tmp_path / f"exit-codes-rank{rank}").read_text() == f"0 {REQUEUE_EXIT} 0"
    assert "a stop signal on another rank: stopped after global step 2" in result.stderr
    assert f"resuming {tmp_path / 'run' / LAST} at epoch 0 step 2" in result.stderr
    assert_same_run(load(tmp_path / "whole" / LAST), load(tmp_path / "run" / LAST))


GROUP_LAUNCHER = textwrap.dedent(f"""
    import sys
    sys.path.insert(0, {str(REPO)!r})
    from tests.pipeline_fixtures import TINY, TINY_PRESET
    from models import PRESETS
    PRESETS[TINY] = TINY_PRESET
    import main_mar
    sys.argv[0] = "main_mar.py"
    main_mar.cli()
""")


def test_sigterm_to_the_process_group_with_loader_workers_saves_and_exits_75(tmp_path):
    """SLURM's scancel and `timeout` signal every process of the job, DataLoader workers included: the
    workers must leave the stop to the main process (torch's worker SIGTERM handler kills them, and the
    main process then died of "DataLoader worker exited unexpectedly" with exit 1 and no save)."""
    # 40 steps an epoch: the loader forks its worker once an epoch, and a signal in the instant between torch's
    # own worker handlers and the worker_init_fn would still kill it; long epochs make that instant rare
    data = make_image_folder(tmp_path / "data", per_class=40)
    run = tmp_path / "run"
    launcher = tmp_path / "launch.py"
    launcher.write_text(GROUP_LAUNCHER)
    flags = tiny_flags(data_path=data, output_dir=run, epochs=100000, num_workers=1)
    proc = subprocess.Popen([python(), str(launcher), *flags], cwd=REPO, env=subprocess_env(),
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        lines = []
        for line in proc.stderr:  # wait until a few steps ran with their worker
            lines.append(line)
            if "epoch 1 step" in line:
                break
        assert proc.poll() is None, "".join(lines)[-3000:]  # (it did not end before the signal)
        time.sleep(0.3)
        os.killpg(proc.pid, signal.SIGTERM)
        err = "".join(lines) + proc.stderr.read()
        assert proc.wait(timeout=60) == REQUEUE_EXIT, err[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "SIGTERM: stopped after global step" in err and "Traceback" not in err, err[-3000:]
    assert load(run / LAST)["train_state"]["global_step"] > 5


def test_a_worker_absorbs_one_sigterm_and_the_next_ends_it():
    """The group's SIGTERM leaves a loader worker alive (the main process stops it); a second one, as the
    loader's terminate() of a worker that did not exit sends, ends it: nothing hangs on a stuck worker."""
    code = ("import sys, time; sys.path.insert(0, sys.argv[1]); from util.train.preemption import ignore_stop_signals;"
            "ignore_stop_signals(0); print('ready', flush=True); time.sleep(60)")
    proc = subprocess.Popen([python(), "-c", code, str(REPO)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert proc.poll() is None  # absorbed
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == -signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()


class ItemAndHeldSignals(torch.utils.data.Dataset):
    """Item i: (i, how many stop signals the worker process that loads it holds)."""

    def __len__(self):
        return 8

    def __getitem__(self, i):
        return i, len(signal.pthread_sigmask(signal.SIG_BLOCK, []) & set(SIGNALS))


def signalled_before_init(worker_id):
    """A worker_init_fn that a group SIGTERM reaches just before it installs the workers' handlers."""
    os.kill(os.getpid(), signal.SIGTERM)
    ignore_stop_signals(worker_id)


def test_a_signal_before_a_workers_init_does_not_kill_it():
    """Workers are forked with the stop signals held (start_workers): one that arrives between the fork and
    ignore_stop_signals waits, and is absorbed, instead of killing the worker (and then the run, of "DataLoader
    worker exited unexpectedly") through torch's handler."""
    loader = DataLoader(ItemAndHeldSignals(), batch_size=2, num_workers=1, worker_init_fn=signalled_before_init)
    batches = [(items.tolist(), held.tolist()) for items, held in start_workers(loader)]
    # the worker lives, and holds no signal once started (a held SIGTERM would not let the loader stop it)
    assert batches == [([0, 1], [0, 0]), ([2, 3], [0, 0]), ([4, 5], [0, 0]), ([6, 7], [0, 0])]
    assert not signal.pthread_sigmask(signal.SIG_BLOCK, []) & set(SIGNALS)  # nor does this process


def test_the_first_signal_is_the_one_named_and_errors_pass_through():
    """Bugs caught: a repeated signal overwriting the first one's name, and __exit__ swallowing an exception
    raised inside the block (a crash would read as a clean end of training)."""
    handler = signal.getsignal(signal.SIGUSR1)
    with pytest.raises(RuntimeError, match="boom"):
        with StopRequest() as stop:
            signal.raise_signal(signal.SIGUSR1)
            signal.raise_signal(signal.SIGTERM)
            assert (stop.requested, stop.name) == (True, "SIGUSR1")
            raise RuntimeError("boom")
    assert signal.getsignal(signal.SIGUSR1) is handler


def test_a_rank_not_signalled_agrees_to_stop_when_another_rank_was(monkeypatch):
    """agree() returns what the all-reduce says, not this rank's own flag. Bug caught: the reduced flag ignored, so
    an unsignalled rank trained on while the signalled one saved (and the next collective hung)."""
    from util.train import preemption
    seen = []
    monkeypatch.setattr(preemption.distributed, "all_reduce_sum",
                        lambda t: seen.append(float(t)) or torch.tensor(1.0))  # the other rank's 1 + our 0
    stop = StopRequest()
    assert stop.agree("cpu") is True and stop.agreed and not stop.requested
    assert seen == [0.0]


def test_start_workers_puts_back_the_signal_mask_it_found():
    """A stop signal the caller held blocked stays blocked after start_workers. Bug caught: the stop signals
    unblocked afterwards instead of the previous mask restored."""
    before = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    try:
        assert list(start_workers([1, 2])) == [1, 2]
        assert signal.SIGUSR1 in signal.pthread_sigmask(signal.SIG_BLOCK, set())
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)
