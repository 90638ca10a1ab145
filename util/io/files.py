"""Files written atomically: a crash at any moment leaves either the old file or the complete new one.

Temp files live beside the target (same file system, so the rename is atomic) and get the process
umask's permissions (a team shares run folders and caches).
"""
import errno
import os
import re
import shutil
import tempfile

import torch

# full disk or quota, read-only file system, no permission: the user's storage to fix, not a bug
STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)
# atomic_write's temp names: the target's name, a dot, mkstemp's 8 random characters, ".tmp"
TEMP_NAME = re.compile(r".+\.[a-z0-9_]{8}\.tmp")


def atomic_write(path, write):
    """Call write(f) on a temp file beside `path`, fsync it, then rename it over `path`.

    A crash at any moment leaves either the old file or the complete new one, never a truncated one.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes 0600; a team shares runs and caches
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fsync_dir(folder)


def current_umask():
    # Python < 3.13 can only read the umask by setting it; it is put back at once
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def remove_stale_temps(folder):
    """Delete atomic_write temp files (of a run killed while saving) directly in `folder`; returns their names.

    Only call it while holding the folder's run lock: a live writer's temp file looks the same.
    """
    names = sorted(n for n in os.listdir(folder) if TEMP_NAME.fullmatch(n)
                   and os.path.isfile(os.path.join(folder, n)))
    for name in names:
        os.remove(os.path.join(folder, name))
    return names


def atomic_torch_save(obj, path):
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_copy(src, dst):
    """Copy a file so that `dst` is either absent/old or complete."""
    def write(out):
        with open(src, "rb") as inp:
            shutil.copyfileobj(inp, out, 16 << 20)
    atomic_write(dst, write)


def fsync_dir(folder):
    """Make a rename durable (not available on every platform, hence best effort)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def storage_error(err):
    """The storage OSError behind `err`, else None. A failed write inside torch.save surfaces next to a
    RuntimeError from torch's zip writer ("unexpected pos ..."), either way round, so the chain is searched."""
    while err is not None:
        if isinstance(err, OSError) and err.errno in STORAGE_ERRNOS:
            return err
        err = err.__cause__ or err.__context__
    return None
