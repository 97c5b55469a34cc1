"""One run per run dir: an exclusive lock that names its holder's PID.

The lock is an ``flock`` on ``<run_dir>/.lock``, which holds the PID and host of the process that took
it. The kernel drops an flock when its process dies, so the lock of a killed run is stale by
construction: the next run takes it over and says whose it was. On a file system shared by several
nodes (NFS, Lustre mounted with ``flock``) the lock holds across nodes; a run takes it once, on its global
rank 0. Where the file system has no locks (Lustre without the ``flock`` mount option), the run goes on
unlocked and says so.
"""
from __future__ import annotations

import errno
import fcntl
import os
import socket
from pathlib import Path

from ssm_tread.errors import UserError


class RunDirError(UserError, RuntimeError):
    """A run dir that cannot be used now; the message names the problem and the fix."""


def unwritable(run_dir: Path, error: OSError) -> RunDirError:
    reason = {errno.EROFS: "is on a read-only file system", errno.EACCES: "is not writable (permission denied)",
              errno.EPERM: "is not writable (permission denied)",
              errno.ENOSPC: "is on a full disk (no space left on device)"}.get(error.errno, f"fails: {error.strerror}")
    return RunDirError(f"run dir {run_dir} {reason}; choose a writable train.run_dir"
                       + (" or free some space" if error.errno == errno.ENOSPC else ""))


class RunLock:
    """``with RunLock(run_dir): ...`` creates ``run_dir`` and holds its lock; a second holder fails at once."""

    def __init__(self, run_dir: str | os.PathLike, say=print):
        self.run_dir, self.path, self.say, self.fd = Path(run_dir), Path(run_dir) / ".lock", say, None

    def __enter__(self) -> RunLock:
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise unwritable(self.run_dir, e) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "an unknown process"
            os.close(fd)
            raise RunDirError(f"run dir {self.run_dir} is in use by {holder} (lock {self.path}); wait for that run "
                              f"to end or stop it, or choose another train.run_dir") from None
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP):  # a file system without locks
                raise unwritable(self.run_dir, e) from None
            self.say(f"warning: the file system of run dir {self.run_dir} has no locks ({e.strerror}): nothing "
                     f"stops a second run from using it at the same time")
            return self
        previous = os.read(fd, 200).decode(errors="replace").strip()
        if previous:
            self.say(f"taking over the stale lock of {previous} in {self.run_dir} (that process is gone)")
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"PID {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        except OSError as e:
            os.close(fd)
            raise unwritable(self.run_dir, e) from None
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is None:  # unlocked
            return
        os.ftruncate(self.fd, 0)  # an empty lock file: nobody to report as a stale holder
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None
