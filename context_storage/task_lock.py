"""One live TaskContextManager per task: an exclusive lock that the operating system drops with its holder."""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from db.private_files import make_private_dirs, open_private


class TaskAlreadyRunningError(RuntimeError):
    """Another live TaskContextManager (in this process or another on this host) holds the task."""


class TaskLock:
    """`<base_dir>/locks/<uuid>.lock`, held with flock for as long as a manager works on the task.

    The lock file stays outside the task's directory, which moves; it is never removed (removing it could
    let two holders lock two different files). A process that dies, however it dies, releases it.
    """

    def __init__(self, base_dir: Path, task_uuid: str) -> None:
        self.path = base_dir / "locks" / f"{task_uuid}.lock"
        self._descriptor: int | None = None

    @property
    def held(self) -> bool:
        return self._descriptor is not None

    def acquire(self, describe_holder: str = "") -> None:
        """Take the lock at once, or raise TaskAlreadyRunningError."""
        if self._descriptor is not None:
            return
        make_private_dirs(self.path.parent)
        descriptor = open_private(self.path, os.O_RDWR)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            holder = f" ({describe_holder})" if describe_holder else ""
            raise TaskAlreadyRunningError(
                f"task {self.path.stem} is already being worked on{holder}; it can be taken over once that "
                "process has ended"
            ) from None
        self._descriptor = descriptor

    def release(self) -> None:
        if self._descriptor is not None:
            with contextlib.suppress(OSError):
                os.close(self._descriptor)
            self._descriptor = None
