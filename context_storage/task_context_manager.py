"""TaskContextManager: a task's files under <base_dir>/running|completed/<uuid>, and its row via TaskRepository."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from context_storage.message_store import MessageStore
from context_storage.summary_store import SummaryStore
from context_storage.task_key import TaskKey
from context_storage.tool_store import ToolStore
from db import DatabaseError, TaskAlreadyExistsError, TaskRepository
from db.models.types import canonical_uuid
from db.private_files import make_private_dirs, open_private
from db.startup import start_database

logger = logging.getLogger(__name__)

STATISTICS = ("llm_calls", "tool_calls", "tokens", "compressions")
# After a failed database start, writes keep their statistics in memory for this long before trying again.
START_AGAIN_AFTER_SECONDS = 60.0


class TaskContextManager:
    """Owns one task's context directory and keeps its database row in step.

    The database is never allowed to stop the task's file work: a failed write is logged, and statistics
    that could not be written are kept and added at the next successful write, finalisation included.
    """

    def __init__(
        self,
        task_key: TaskKey,
        task_uuid: str,
        config: dict[str, Any],
        user: str | None = None,
        is_resumed: bool = False,
        repository: TaskRepository | None = None,
    ) -> None:
        # Checked before any file is touched: the uuid names the task's directory.
        self.uuid = canonical_uuid(task_uuid)
        self.task_key = task_key
        self.config = config
        self.user = user
        self.is_resumed = is_resumed
        self.base_dir = Path((config.get("context_storage") or {}).get("base_dir", "contexts"))
        self.running_dir = self.base_dir / "running"
        self.completed_dir = self.base_dir / "completed"
        self.context_dir = self.running_dir / self.uuid
        # One thread at a time changes the counters, the row, metadata.json or where the directory is.
        self._lock = threading.RLock()
        for directory in (self.running_dir, self.completed_dir):
            make_private_dirs(directory)
        finished_dir = self.completed_dir / self.uuid
        if is_resumed and not self.context_dir.exists() and finished_dir.exists():
            shutil.move(finished_dir, self.context_dir)
        make_private_dirs(self.context_dir)
        self._open_stores()
        self._repository = repository
        self._pending = dict.fromkeys(STATISTICS, 0)
        self._registered = False
        self._start_again_at = 0.0
        # Increments an earlier run of this task could not write before it ended are taken over.
        unsaved = self._write_metadata(drop=("unsaved",)).get("unsaved") or {}
        for name, amount in (unsaved.get("statistics") or {}).items():
            if name in self._pending:
                self._pending[name] += int(amount)
        self._register_or_update_task()
        if any(self._pending.values()):
            self._write("update_statistics", None)

    def get_message_store(self) -> MessageStore:
        return self.message_store

    def get_summary_store(self) -> SummaryStore:
        return self.summary_store

    def get_tool_store(self) -> ToolStore:
        return self.tool_store

    def update_status(self, status: str, error_message: str | None = None) -> None:
        """Record a status change (and any statistics still pending)."""
        with self._lock:
            self._write("update_status", lambda repo: repo.update_status(self.uuid, status, error_message))

    def update_statistics(
        self, llm_calls: int = 0, tool_calls: int = 0, tokens: int = 0, compressions: int = 0
    ) -> None:
        """Add to the task's counters; kept in memory until the database takes them."""
        amounts = dict(zip(STATISTICS, (llm_calls, tool_calls, tokens, compressions), strict=True))
        for name, amount in amounts.items():
            if isinstance(amount, bool) or not isinstance(amount, int) or amount < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {amount!r}")
        with self._lock:
            for name, amount in amounts.items():
                self._pending[name] += amount
            self._write("update_statistics", None)

    @property
    def pending_statistics(self) -> dict[str, int]:
        """Increments not yet written to the database."""
        with self._lock:
            return dict(self._pending)

    def complete(self) -> None:
        """Mark the task completed and move its directory to completed/."""
        self._finish("completed", None, lambda repo: repo.complete(self.uuid))

    def stop(self) -> None:
        """Mark the task stopped by the user and move its directory to completed/."""
        self._finish("stopped", None, lambda repo: repo.update_status(self.uuid, "stopped"))

    def fail(self, error_message: str) -> None:
        """Mark the task failed with its error and move its directory to completed/."""
        self._finish("failed", error_message, lambda repo: repo.fail(self.uuid, error_message))

    def _open_stores(self) -> None:
        self.message_store = MessageStore(self.context_dir, self.config)
        self.summary_store = SummaryStore(self.context_dir)
        self.tool_store = ToolStore(self.context_dir)

    def _llm_settings(self) -> dict[str, Any]:
        llm = self.config.get("llm") or {}
        provider = llm.get("provider")
        provider_config = (llm.get(provider) or {}) if provider else {}
        return {
            "llm_provider": provider,
            "model": provider_config.get("model"),
            "context_length": provider_config.get("context_length"),
        }

    def _write_metadata(self, drop: tuple[str, ...] = (), **changes: Any) -> dict[str, Any]:
        """Create or update metadata.json (this process, `changes`, without `drop`); return what it held."""
        path = self.context_dir / "metadata.json"
        previous: dict[str, Any] = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
        metadata = previous.copy() or {
            "uuid": self.uuid,
            "task_key": self.task_key.to_dict(),
            "created_at": datetime.now(UTC).isoformat(),
            "user": self.user,
            "config": self._llm_settings(),
        }
        metadata.update(process_id=os.getpid(), hostname=socket.gethostname(), **changes)
        for key in drop:
            metadata.pop(key, None)
        temporary = path.with_name("metadata.json.tmp")
        descriptor = open_private(temporary, os.O_WRONLY | os.O_TRUNC)
        with os.fdopen(descriptor, "wb") as handle:
            # backslashreplace: a lone surrogate in an error message is kept as its JSON escape.
            handle.write(json.dumps(metadata, ensure_ascii=False, indent=2).encode("utf-8", "backslashreplace"))
        os.replace(temporary, path)
        return previous

    def _register_or_update_task(self, force: bool = False) -> None:
        now = datetime.now(UTC)
        resumed = {
            "status": "running",
            "started_at": now,
            "completed_at": None,
            "process_id": os.getpid(),
            "hostname": socket.gethostname(),
        }
        new = {
            "uuid": self.uuid,
            **self.task_key.task_fields(),
            **resumed,
            "created_at": now,
            "user": self.user,
            **self._llm_settings(),
        }
        del new["completed_at"]

        def register(repo: TaskRepository) -> None:
            if self.is_resumed and repo.update(self.uuid, resumed) is not None:
                return
            try:
                repo.create(new)
            except TaskAlreadyExistsError:
                repo.update(self.uuid, resumed)

        repository = self._repository_or_none(force)
        if repository is not None and self._attempt("register", lambda: register(repository)):
            self._registered = True

    def _write(self, operation: str, action: Callable[[TaskRepository], object] | None, *, force: bool = False) -> bool:
        """Register if that is still pending, write pending statistics, then do `action`; True if all landed.

        `force`: try to reach the database even within the pause after a failed start (the task is ending).
        """
        if not self._registered:
            self._register_or_update_task(force)
        repository = self._repository_or_none(force) if self._registered else None
        if repository is None:
            logger.error("%s of task %s not written: the database is unavailable", operation, self.uuid)
            return False
        if any(self._pending.values()):
            amounts = dict(self._pending)
            if not self._attempt("update_statistics", lambda: repository.update_statistics(self.uuid, **amounts)):
                return False
            for name, amount in amounts.items():
                self._pending[name] -= amount
        return action is None or self._attempt(operation, lambda: action(repository))

    def _attempt(self, operation: str, call: Callable[[], object]) -> bool:
        """False when the database failed or refused the values, or the row was missing (the repository
        said False): the task goes on either way."""
        try:
            return call() is not False
        except (DatabaseError, ValueError) as exc:
            logger.error("%s of task %s failed, the task goes on: %s", operation, self.uuid, exc)
            return False

    def _repository_or_none(self, force: bool = False) -> TaskRepository | None:
        if self._repository is None:
            if not force and time.monotonic() < self._start_again_at:
                return None  # a start just failed: do not make every call wait out the start-up retry again
            try:
                self._repository = TaskRepository(start_database(self.config))
            except DatabaseError as exc:
                self._start_again_at = time.monotonic() + START_AGAIN_AFTER_SECONDS
                logger.error("database unavailable for task %s, the task goes on: %s", self.uuid, exc)
                return None
        return self._repository

    def _finish(self, status: str, error_message: str | None, action: Callable[[TaskRepository], object]) -> None:
        with self._lock:
            self._finish_locked(status, error_message, action)

    def _finish_locked(
        self, status: str, error_message: str | None, action: Callable[[TaskRepository], object]
    ) -> None:
        self._write(status, action, force=True)
        changes: dict[str, Any] = {"status": status, "completed_at": datetime.now(UTC).isoformat()}
        if error_message is not None:
            changes["error_message"] = error_message
        if any(self._pending.values()):
            # Kept on disk so that resuming the task writes them; the process may end right after this.
            changes["unsaved"] = {"statistics": dict(self._pending)}
        self._write_metadata(**changes)
        target = self.completed_dir / self.uuid
        if target.exists():
            target = self.completed_dir / f"{self.uuid}-{datetime.now(UTC):%Y%m%dT%H%M%S%f}"
            logger.warning("completed/%s exists; moving task %s to %s", self.uuid, self.uuid, target)
        if self.context_dir.exists():
            shutil.move(self.context_dir, target)
        self.context_dir = target
        self._open_stores()
