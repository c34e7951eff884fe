"""One live TaskContextManager per task: an exclusive lock that the operating system drops with its holder."""

from __future__ import annotations

import contextlib
import fcntl
import os
import weakref
from pathlib import Path

from private_files import make_private_dirs, open_private


class TaskAlreadyRunningError(RuntimeError):
    """Another live TaskContextManager (in this process or another on this host) holds the task."""


class TaskLock:
    """`<base_dir>/locks/<uuid>.lock`, held with flock for as long as a manager works on the task.

    The lock file stays outside the task's directory, which moves. It exists only while the lock is held: the
    holder removes it as it lets go, and a taker checks after locking that the file it locked still has the
    path's name (else another holder removed it meanwhile, and it locks the new one), so two holders can never
    lock two different files. A process that dies, however it dies, releases the lock; a lock object that is
    garbage-collected releases it too.
    """

    def __init__(self, base_dir: Path, task_uuid: str) -> None:
        self.path = base_dir / "locks" / f"{task_uuid}.lock"
        self._release: weakref.finalize[[Path, int, int], TaskLock] | None = None

    @property
    def held(self) -> bool:
        return self._release is not None and self._release.alive

    def acquire(self, describe_holder: str = "") -> None:
        """Take the lock at once, or raise TaskAlreadyRunningError."""
        if self.held:
            return
        make_private_dirs(self.path.parent)
        while True:
            try:
                # Never through a link: a lock file is a file of its own under locks/.
                descriptor = open_private(self.path, os.O_RDWR | os.O_NOFOLLOW)
            except FileNotFoundError:
                continue  # its holder removed it between our two opens: the name is free again
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(descriptor)
                holder = f" ({describe_holder})" if describe_holder else ""
                raise TaskAlreadyRunningError(
                    f"task {self.path.stem} is already being worked on{holder}; it can be taken over once that "
                    "process has ended or its manager is closed"
                ) from None
            if _names(self.path, descriptor):
                break
            os.close(descriptor)
        self._release = weakref.finalize(self, _let_go, self.path, descriptor, os.getpid())

    def held_elsewhere(self) -> bool:
        """Whether another holder has the lock now; creates nothing (a file without a holder is left as is)."""
        if self.held:
            return False
        try:
            descriptor = os.open(self.path, os.O_RDWR | os.O_NOFOLLOW)
        except FileNotFoundError:
            return False  # holders keep the file while they hold it
        # Anything else (a directory, a link in its place) is the caller's to report: OSError.
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(descriptor)
        return False

    def release(self) -> None:
        if self._release is not None:
            self._release()
            self._release = None


def _names(path: Path, descriptor: int) -> bool:
    """True if `path` still names the file open at `descriptor`."""
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(descriptor)
    return (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)


def _let_go(path: Path, descriptor: int, owner_pid: int) -> None:
    # A forked child inherits the descriptor but not the lock's ownership: only the process that took it
    # removes the file (while still holding it, so that nobody locks the name in between).
    if os.getpid() == owner_pid:
        with contextlib.suppress(OSError):
            path.unlink()
    with contextlib.suppress(OSError):
        os.close(descriptor)
