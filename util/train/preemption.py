"""Stopping cleanly when a scheduler preempts the job.

SIGTERM (SLURM, Kubernetes), SIGUSR1 (SLURM's `--signal`) and SIGINT (Ctrl-C) only set a flag here;
the training loop folds the flag into its per-step all-reduce, so when any rank was signalled every
rank finishes the same step, they save one step-granular checkpoint together and the process exits
with REQUEUE_EXIT. Repeated signals are ignored (a terminal's Ctrl-C reaches torchrun and the workers,
and torchrun forwards it once more), so the save is never cut short by the signal that asked for it.
"""
import signal

import torch

from util import distributed

# EX_TEMPFAIL from sysexits.h, "temporary failure, try again": distinct from an error (1), a timeout(1)
# kill (124) and a death by signal (128 + n), so a job script can tell "saved, requeue me" apart.
REQUEUE_EXIT = 75
# Ctrl-C during evaluation or sample.py: the shell's own code for a death by SIGINT (128 + 2), after one
# line saying what was kept and the command that resumes (evaluation) or starts over (sample.py)
INTERRUPT_EXIT = 130
SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopRequest:
    """`with StopRequest() as stop:` catches SIGNALS while training; the previous handlers come back after."""

    def __init__(self):
        self.signal = None    # the first signal this process received
        self.agreed = False   # set by the training loop once all ranks know that one of them was signalled
        self._previous = {}

    @property
    def requested(self):
        return self.signal is not None

    @property
    def name(self):
        return signal.Signals(self.signal).name if self.requested else "a stop signal on another rank"

    def agree(self, device):
        """Collective: whether any rank was signalled (sets `agreed` on every rank alike)."""
        flag = distributed.all_reduce_sum(torch.tensor(float(self.requested), device=device))
        self.agreed = bool(flag.item())
        return self.agreed

    def _handle(self, signum, frame):
        if self.signal is None:
            self.signal = signum

    def __enter__(self):
        self._previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


def ignore_stop_signals(worker_id=None):
    """DataLoader worker_init_fn: a signal sent to the whole process group (SLURM's scancel, `timeout`,
    Ctrl-C) stops only the main process, which finishes the step, saves and shuts its workers down. torch's
    own SIGTERM handler in a worker would otherwise kill it, and the main process would die of "DataLoader
    worker exited unexpectedly" before it could save. A worker absorbs one SIGTERM only: the next one (the
    loader's own terminate() of a worker that did not exit) ends it as before."""
    for sig in SIGNALS:
        signal.signal(sig, _absorb_once if sig == signal.SIGTERM else signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)  # held since the fork (start_workers): now absorbed


def start_workers(loader):
    """iter(loader), its worker processes forked with the stop signals held. A worker inherits them held, so
    a group signal that arrives before its worker_init_fn (ignore_stop_signals) has run waits for it rather than
    killing the worker through torch's handler. This process gets such a signal once the workers are started."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        return iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def _absorb_once(signum, frame):
    signal.signal(signum, signal.SIG_DFL)
