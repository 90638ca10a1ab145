"""One live training run per output folder, and the debris of a dead one cleaned up.

Rank 0 holds an advisory lock (flock) on OUTPUT_DIR/.lock for the whole run. The kernel releases it
when the process ends however it ends (even by SIGKILL), so a leftover .lock file never blocks a
later run, and a temp file found while holding the lock can only come from a run that is gone.
"""
import errno
import fcntl
import logging
import os
import socket

from util import distributed
from util.io.files import remove_stale_temps

logger = logging.getLogger(__name__)

LOCK = ".lock"
# flock on some network file systems (e.g. Lustre without -o flock) fails with one of these
UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class FolderInUse(RuntimeError):
    """Another live run holds the output folder's lock."""


class RunLock:
    def __init__(self, folder):
        self.path = os.path.join(folder, LOCK)
        self.file = None

    def acquire(self):
        """Take the lock; returns False where the file system has no locks. Raises FolderInUse."""
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            self.file.seek(0)
            holder = self.file.read().strip() or "an unknown process"
            self.release()
            if err.errno in UNSUPPORTED:
                logger.warning("%s: this file system has no file locks, so a second run in the same "
                               "--output_dir would not be noticed", self.path)
                return False
            folder = os.path.dirname(self.path)
            raise FolderInUse(f"--output_dir {folder} is in use by a live run ({holder} holds {self.path}); "
                              "wait for it to end or choose another --output_dir") from None
        self.file.truncate(0)
        self.file.write(f"process {os.getpid()} on {socket.gethostname()}\n")
        self.file.flush()
        return True

    def release(self):
        if self.file is not None:
            self.file.close()  # closing drops the flock
            self.file = None


def claim_run_folder(folder):
    """Collective: rank 0 creates `folder`, locks it and removes stale temp files of a killed run.

    Every rank raises FolderInUse when another live run holds the folder. Returns the RunLock to
    release at the end (None on other ranks).
    """
    lock, refusal = None, None
    if distributed.is_main_process():
        os.makedirs(folder, exist_ok=True)
        lock = RunLock(folder)
        try:
            if lock.acquire():
                removed = remove_stale_temps(folder)
                if removed:
                    logger.info("removed %d temp file(s) of a run killed while saving: %s", len(removed),
                                ", ".join(removed))
        except FolderInUse as err:
            refusal = str(err)
    refusal = distributed.broadcast_object(refusal)
    if refusal:
        raise FolderInUse(refusal)
    return lock
