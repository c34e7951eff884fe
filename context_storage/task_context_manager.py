"""TaskContextManager: a task's files under <base_dir>/running|completed/<uuid>, and its row via TaskRepository."""

from __future__ import annotations

import functools
import logging
import os
import shutil
import socket
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from context_storage.message_store import MessageStore
from context_storage.metadata_file import (
    STATISTICS,
    DamagedMetadataError,
    load_metadata,
    read_metadata,
    sync_directory,
    write_metadata,
)
from context_storage.summary_store import SummaryStore
from context_storage.task_key import SupportsToDict, as_task_key
from context_storage.task_lock import TaskLock
from context_storage.tool_store import ToolStore
from context_storage.unsaved import add_statistics, keep_unsaved, new_batch, settle_by_row, write_kept_statistics
from db import DatabaseConnection, DatabaseError, Task, TaskAlreadyExistsError, TaskLiveness, TaskRepository
from db.models import INT_MAX, NO_SIGN_OF_LIFE
from db.models.types import canonical_uuid
from db.repositories.task_repository import PREVIOUS_STATUSES
from db.startup import start_database
from private_files import make_private_dirs

logger = logging.getLogger(__name__)

# After the database failed (it would not start, or a write lost it), writes keep their statistics in memory
# for this long before trying again, so that calls do not each wait out a retry.
START_AGAIN_AFTER_SECONDS = 60.0
# A live manager shows a sign of life this often (context_storage.heartbeat), also while its agent waits.
HEARTBEAT_SECONDS = 60
FINISHED = ("completed", "failed", "stopped")
# A finished task's directory is renamed with this prefix while `tasks prune` removes its row (ops/prune.py).
PRUNING = ".pruning-"


class TaskContextManager:
    """Owns one task's context directory and keeps its database row in step.

    The database is never allowed to stop the task's file work: a failed write is logged, and what could not
    be written (statistics, the final outcome) is kept, in memory and then in metadata.json, until it is.
    One manager per task at a time: a second one for the same uuid, in any process on the host, is refused
    with TaskAlreadyRunningError while the first is alive.
    """

    def __init__(
        self,
        task_key: SupportsToDict,
        task_uuid: str,
        config: dict[str, Any],
        user: str | None = None,
        is_resumed: bool = False,
        repository: TaskRepository | None = None,
    ) -> None:
        # Checked before any file is touched: the uuid names the task's directory.
        self.uuid = canonical_uuid(task_uuid)
        self.task_key = as_task_key(task_key)
        self.config = config
        self.user = user
        self.is_resumed = is_resumed
        storage = config.get("context_storage") or {}
        self.base_dir = Path(storage.get("base_dir", "contexts"))
        heartbeat = storage.get("heartbeat", HEARTBEAT_SECONDS)
        if isinstance(heartbeat, bool) or not isinstance(heartbeat, int | float) or not 0 < heartbeat <= 86400:
            raise ValueError(f"context_storage.heartbeat must be a number of seconds in (0, 86400], got {heartbeat!r}")
        self.running_dir = self.base_dir / "running"
        self.completed_dir = self.base_dir / "completed"
        self.context_dir = self.running_dir / self.uuid
        for place in (self.context_dir, self.completed_dir / self.uuid):
            if place.is_symlink():
                raise ValueError(
                    f"{place} is a link: a task's files stay in a directory of its own under {self.base_dir}"
                )
        # One thread at a time changes the counters, the row, metadata.json or where the directory is.
        self._lock = threading.RLock()
        for directory in (self.running_dir, self.completed_dir):
            make_private_dirs(directory)
        task_lock = TaskLock(self.base_dir, self.uuid)
        task_lock.acquire(self._holder())
        self._claim = _Claim(task_lock, dict.fromkeys(STATISTICS, 0), self.context_dir)
        self._pending = self._claim.pending
        self._repository = repository
        self._registered = False
        self._finished: str | None = None
        self._closed = False
        self._start_again_at = 0.0
        self._start_failed = False
        self._row_touched = False
        try:
            self._start()
        except BaseException:
            self._claim.let_go()
            raise
        # A manager dropped without finishing or closing (an agent's pause path) lets go of its task.
        self._abandoned = weakref.finalize(self, self._claim.let_go)
        self._claim.heartbeat = _Heartbeat(self.uuid, float(heartbeat))

    def _start(self) -> None:
        finished_dir = self.completed_dir / self.uuid
        set_aside = self.completed_dir / f"{PRUNING}{self.uuid}"
        if not finished_dir.exists() and set_aside.is_dir() and not set_aside.is_symlink():
            # A prune that failed before it knew whether the row went left the directory under this name.
            finished_dir = set_aside
        brought_back = self.is_resumed and not self.context_dir.exists() and finished_dir.exists()
        if brought_back:
            shutil.move(finished_dir, self.context_dir)
        created = not self.context_dir.exists()
        earlier = None if created else read_metadata(self.context_dir)
        try:
            make_private_dirs(self.context_dir)
            self._open_stores()
            self._begin()
        except BaseException:
            # A task that never reached its row leaves its files as they were: none, or the earlier run's. One
            # that did leaves them as the row has them, as a crash at that point would (`tasks reconcile`).
            if not self._row_touched:
                self._put_back(created, earlier, finished_dir if brought_back else None)
            raise

    def _put_back(self, created: bool, earlier: dict[str, Any] | None, finished_dir: Path | None) -> None:
        if created:
            shutil.rmtree(self.context_dir, ignore_errors=True)
            return
        if earlier:
            write_metadata(self.context_dir, earlier)
        else:
            (self.context_dir / "metadata.json").unlink(missing_ok=True)
        if finished_dir is not None:
            shutil.move(self.context_dir, finished_dir)

    def _begin(self) -> None:
        metadata = read_metadata(self.context_dir)
        # Statistics an earlier run could not write wait on disk until the database takes them.
        self._unsaved_on_disk = bool((metadata.get("unsaved") or {}).keys() - {"outcome"})
        self._write_metadata(starting=True)
        self._register_or_update_task(force=False)
        if self._registered and self._unsaved_on_disk:
            self._write("write kept statistics", None)

    def _holder(self) -> str:
        """Who last worked on the task, from its metadata.json (read only: the lock is not ours yet)."""
        for directory in (self.context_dir, self.completed_dir / self.uuid):
            try:
                metadata = load_metadata(directory)
            except DamagedMetadataError:
                continue
            if metadata.get("process_id"):
                return f"process {metadata['process_id']} on {metadata.get('hostname')}"
        return ""

    def get_message_store(self) -> MessageStore:
        self._refuse_if_closed("get_message_store")
        return self.message_store

    def get_summary_store(self) -> SummaryStore:
        self._refuse_if_closed("get_summary_store")
        return self.summary_store

    def get_tool_store(self) -> ToolStore:
        self._refuse_if_closed("get_tool_store")
        return self.tool_store

    def update_status(self, status: str, error_message: str | None = None) -> None:
        """Record a status change (and any statistics still pending)."""
        with self._lock:
            self._refuse_if_closed("update_status")
            self._write("update_status", lambda repo: repo.update_status(self.uuid, status, error_message))

    def update_statistics(
        self, llm_calls: int = 0, tool_calls: int = 0, tokens: int = 0, compressions: int = 0
    ) -> None:
        """Add to the task's counters; kept in memory until the database takes them.

        An amount the counters cannot hold (past 2,147,483,647) is refused with ValueError at this call, and
        nothing of it is kept: the task goes on counting.
        """
        amounts = dict(zip(STATISTICS, (llm_calls, tool_calls, tokens, compressions), strict=True))
        for name, amount in amounts.items():
            if isinstance(amount, bool) or not isinstance(amount, int) or not 0 <= amount <= INT_MAX:
                raise ValueError(f"{name} must be an integer in 0..{INT_MAX}, got {amount!r}")
        with self._lock:
            self._refuse_if_closed("update_statistics")
            for name, amount in amounts.items():
                self._pending[name] += amount
            if self._write("update_statistics", None) is _REFUSED:
                for name, amount in amounts.items():
                    self._pending[name] -= amount
                raise ValueError(f"task {self.uuid}: the counters cannot take {amounts}; they were not counted")

    @property
    def pending_statistics(self) -> dict[str, int]:
        """Increments not yet written to the database."""
        with self._lock:
            return add_statistics(self._pending, (self._claim.in_flight or {}).get("statistics") or {})

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
        self.open_extra_stores()

    # Extension points: a subclass adds its own stores, a finishing step, and reads earlier runs.

    def open_extra_stores(self) -> None:
        """Create more stores under `self.context_dir` (a subclass's planning history, say). Called when the
        manager starts and again whenever the directory moves (finish, resume), so that stores always point at
        where their files are; files under the directory move with it."""

    def before_finish(self, status: str, error_message: str | None) -> None:
        """Runs when the task finishes (complete, stop, fail), before its row is written and its directory
        moves: the place for a final summary. Statistics it adds are written with the outcome. An exception
        here is logged and never stops the finishing."""

    def previous_runs(
        self, expiry_days: float | None = None, limit: int = 10, statuses: Sequence[str] = PREVIOUS_STATUSES
    ) -> list[PreviousRun]:
        """Earlier runs of this task's issue or merge request (this run excluded), most recently completed
        first, each with the directory holding its files (None if it is gone). `expiry_days`: only runs
        completed within that many days. Empty, with a logged error, while the database is unavailable."""
        self._refuse_if_closed("previous_runs")
        repository = self._repository_or_none()
        if repository is None:
            logger.error("earlier runs of task %s not looked up: the database is unavailable", self.uuid)
            return []
        since = datetime.now(UTC) - timedelta(days=expiry_days) if expiry_days is not None else None
        try:
            runs = repository.find_previous(self.task_key, statuses=statuses, since=since, limit=limit + 1)
        except DatabaseError as exc:
            logger.error("earlier runs of task %s not looked up: %s", self.uuid, str(exc))
            return []
        found = []
        for task in runs:
            if task.uuid == self.uuid:
                continue
            directory = self.completed_dir / task.uuid
            found.append(PreviousRun(task, directory if directory.is_dir() else None))
        return found[:limit]

    def _llm_settings(self) -> dict[str, Any]:
        llm = self.config.get("llm") or {}
        provider = llm.get("provider")
        provider_config = (llm.get(provider) or {}) if provider else {}
        return {
            "llm_provider": provider,
            "model": provider_config.get("model"),
            "context_length": provider_config.get("context_length"),
        }

    def _write_metadata(self, *, starting: bool, **changes: Any) -> None:
        """Create or update metadata.json with this process and `changes`; a start clears the old outcome."""
        metadata = read_metadata(self.context_dir) or {
            "uuid": self.uuid,
            "task_key": self.task_key.to_dict(),
            "created_at": datetime.now(UTC).isoformat(),
            "user": self.user,
            "config": self._llm_settings(),
        }
        if starting:
            # The task runs (again, resumed or not): an outcome recorded or kept for the database is no longer
            # its outcome, and `tasks reconcile` must not write it over this run's.
            metadata["status"] = "running"
            for key in ("completed_at", "error_message"):
                metadata.pop(key, None)
            unsaved = {key: value for key, value in (metadata.pop("unsaved", None) or {}).items() if key != "outcome"}
            if unsaved:
                metadata["unsaved"] = unsaved
        metadata.update(process_id=os.getpid(), hostname=socket.gethostname(), **changes)
        write_metadata(self.context_dir, metadata)

    def _register_or_update_task(self, *, force: bool) -> None:
        now = datetime.now(UTC)
        resumed = {
            "status": "running",
            "started_at": now,
            "completed_at": None,
            "error_message": None,
            "process_id": os.getpid(),
            "hostname": socket.gethostname(),
        }
        new = {
            "uuid": self.uuid,
            **self.task_key.task_fields(),
            **{key: value for key, value in resumed.items() if value is not None},
            "created_at": now,
            "user": self.user,
            **self._llm_settings(),
        }

        def register(repo: TaskRepository) -> None:
            self._row_touched = True
            if self._unsaved_on_disk:
                # Before this run writes the row, which decides batches too old for their operation ids.
                settle_by_row(self.context_dir, read_metadata(self.context_dir), self.uuid, repo)
            if self.is_resumed and repo.update(self.uuid, resumed) is not None:
                return
            try:
                repo.create(new)
            except TaskAlreadyExistsError:
                repo.update(self.uuid, resumed)

        repository = self._repository_or_none(force)
        if repository is not None and self._attempt("register", lambda: register(repository)) is True:
            self._registered = True

    def _write(
        self, operation: str, action: Callable[[TaskRepository], object] | None, *, force: bool = False
    ) -> object:
        """Register if that is still pending, write what is kept, then do `action`.

        True if everything landed, False if the database was unavailable or failed (or the row is missing),
        _REFUSED if the counters refused the pending increments (which are then no longer pending).
        `force`: try to reach the database even within the pause after a failure (the task is ending).
        """
        if not self._registered:
            self._register_or_update_task(force=force)
        repository = self._repository_or_none(force) if self._registered else None
        if repository is None:
            logger.error("%s of task %s not written: the database is unavailable", operation, self.uuid)
            return False
        if self._unsaved_on_disk:
            settled = self._attempt("write kept statistics", lambda: self._write_kept(repository))
            self._unsaved_on_disk = settled is not True
            if settled is not True and settled is not _REFUSED:
                return False
        claim = self._claim
        while claim.unwritten():
            if claim.in_flight is None:
                # The batch keeps its operation id until the database took it: sent again, it counts once.
                claim.in_flight = new_batch(self._pending)
                self._pending.update(dict.fromkeys(STATISTICS, 0))
            batch = claim.in_flight
            written = self._attempt("update_statistics", functools.partial(self._send, repository, batch))
            if written is not True and written is not _REFUSED:
                return False
            claim.in_flight = None
            if written is _REFUSED:
                if operation == "update_statistics":
                    # Back to pending: the caller takes out what its own call added.
                    for name in STATISTICS:
                        self._pending[name] += batch["statistics"][name]
                    return _REFUSED
                logger.error("task %s: the counters cannot take %s; dropped", self.uuid, batch["statistics"])
        return True if action is None else self._attempt(operation, lambda: action(repository))

    def _send(self, repository: TaskRepository, batch: dict[str, Any]) -> bool:
        amounts = [batch["statistics"][name] for name in STATISTICS]
        return repository.update_statistics(self.uuid, *amounts, operation_id=batch["operation_id"])

    def _write_kept(self, repository: TaskRepository) -> bool:
        return write_kept_statistics(self.context_dir, read_metadata(self.context_dir), self.uuid, repository)

    def _attempt(self, operation: str, call: Callable[[], object]) -> object:
        """True when the call succeeded; False when the database failed or the row was missing (the
        repository said False); _REFUSED when the values were refused. The task goes on in every case."""
        # Errors are logged as text: a handler that keeps records would keep an exception's traceback, its
        # frames and this manager alive, and a dropped manager must let go of its task.
        try:
            return call() is not False
        except ValueError as exc:
            logger.error("%s of task %s refused: %s", operation, self.uuid, str(exc))
            return _REFUSED
        except DatabaseError as exc:
            # A lost database: do not make every following call wait out the retry again.
            self._start_again_at = time.monotonic() + START_AGAIN_AFTER_SECONDS
            logger.error("%s of task %s failed, the task goes on: %s", operation, self.uuid, str(exc))
            return False

    def _repository_or_none(self, force: bool = False) -> TaskRepository | None:
        paused = time.monotonic() < self._start_again_at
        if self._repository is None:
            if paused and not force:
                return None
            try:
                # Only the first start waits out DATABASE_STARTUP_TIMEOUT; after a failed one, one attempt.
                wait = 0.0 if self._start_failed else None
                self._repository = TaskRepository(start_database(self.config, startup_timeout=wait))
            except DatabaseError as exc:
                self._start_failed = True
                self._start_again_at = time.monotonic() + START_AGAIN_AFTER_SECONDS
                logger.error("database unavailable for task %s, the task goes on: %s", self.uuid, str(exc))
                return None
            return self._repository
        if paused and not (force and self._repository.ping()):
            return None
        return self._repository

    def close(self) -> None:
        """Let go of the task without finishing it (an agent pausing it, say): statistics still pending are
        written (one quick check of the database) or kept in metadata.json, the lock is released so that a new
        manager can resume the task, and the status stays as it is. Closing again, or after a finish, does
        nothing more; a write, a store or a lookup asked of a closed manager raises RuntimeError."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._finished is None and self._claim.unwritten():
                self._write("update_statistics", None, force=True)
            self._abandoned.detach()
            self._claim.let_go()

    def __enter__(self) -> TaskContextManager:
        return self

    def __exit__(self, *_exc_info: object) -> None:
        self.close()

    def _refuse_if_closed(self, called: str) -> None:
        if self._closed:
            raise RuntimeError(f"task {self.uuid}: {called}() on a closed manager; start a new one to go on")

    def _finish(self, status: str, error_message: str | None, action: Callable[[TaskRepository], object]) -> None:
        with self._lock:
            self._refuse_if_closed(_CALLED_AS[status])
            if self._finished is not None:
                # A second finish (say, complete() in a finally after fail()): the first outcome stands and the
                # directory stays where it is; statistics still pending are written.
                logger.warning(
                    "task %s already finished as %s; %s() leaves that outcome and the directory as they are",
                    self.uuid,
                    self._finished,
                    _CALLED_AS[status],
                )
                if self._write("update_statistics", None, force=True) is not True and self._claim.unwritten():
                    self._claim.keep(self.context_dir)
                return
            if self._claim.heartbeat is not None:
                # Before the outcome is written: a beat must not take this finish for a task marked failed.
                self._claim.heartbeat.stop()
            try:
                self._finish_locked(status, error_message, action)
            finally:
                self._claim.lock.release()

    def _finish_locked(
        self, status: str, error_message: str | None, action: Callable[[TaskRepository], object]
    ) -> None:
        try:
            self.before_finish(status, error_message)
        except Exception:
            logger.exception("the finishing step of task %s failed; the task finishes as %s", self.uuid, status)
        written = self._write(_CALLED_AS[status], action, force=True)
        completed_at = datetime.now(UTC).isoformat()
        changes: dict[str, Any] = {"status": status, "completed_at": completed_at}
        if error_message is not None:
            changes["error_message"] = error_message
        self._write_metadata(starting=False, **changes)
        # Kept on disk so that a resume or `tasks reconcile` writes them; the process may end right after this.
        outcome = None
        if written is not True:
            outcome = {"status": status, "error_message": error_message, "completed_at": completed_at}
        if outcome is not None or self._claim.unwritten():
            self._claim.keep(self.context_dir, outcome)
        target = self.completed_dir / self.uuid
        if target.exists():
            target = self.completed_dir / f"{self.uuid}-{datetime.now(UTC):%Y%m%dT%H%M%S%fZ}"
            logger.warning("completed/%s exists; moving task %s to %s", self.uuid, self.uuid, target)
        if self.context_dir.exists():
            shutil.move(self.context_dir, target)
            sync_directory(self.completed_dir)
        self.context_dir = self._claim.context_dir = target
        self._finished = status
        self._open_stores()


@dataclass
class _Claim:
    """What a manager holds until it finishes or lets go: the task's lock, and the statistics not yet written
    with the directory they belong to. Apart from the manager, so that letting go needs no manager (it may be
    being garbage-collected)."""

    lock: TaskLock
    pending: dict[str, int]
    context_dir: Path
    # The batch being sent, with its operation id, until the database took it.
    in_flight: dict[str, Any] | None = None
    heartbeat: _Heartbeat | None = None
    owner_pid: int = field(default_factory=os.getpid)

    def unwritten(self) -> bool:
        return self.in_flight is not None or any(self.pending.values())

    def keep(self, directory: Path, outcome: dict[str, Any] | None = None) -> None:
        """Move what is not written into metadata.json in `directory`."""
        keep_unsaved(directory, statistics=self.pending, outcome=outcome, in_flight=self.in_flight)
        self.pending.update(dict.fromkeys(STATISTICS, 0))
        self.in_flight = None

    def let_go(self) -> None:
        """Keep what is pending in metadata.json, wherever the task's directory now is (an agent pausing a task
        moves it beside running/), or say what is lost; then unlock. Only in the process that holds the claim:
        a forked child exiting lets go of nothing."""
        if os.getpid() != self.owner_pid:
            return
        if self.heartbeat is not None:
            self.heartbeat.stop()
        if self.unwritten():
            directory = self._where_the_files_are()
            if directory is not None:
                self.keep(directory)
                logger.warning("task %s let go with statistics not written; kept in %s", self.lock.path.stem, directory)
            else:
                logger.error(
                    "task %s let go with statistics %s not written and its directory %s gone; they are lost",
                    self.lock.path.stem,
                    add_statistics(self.pending, (self.in_flight or {}).get("statistics") or {}),
                    self.context_dir,
                )
                self.pending.update(dict.fromkeys(STATISTICS, 0))
                self.in_flight = None
        self.lock.release()

    def _where_the_files_are(self) -> Path | None:
        task_uuid = self.lock.path.stem
        candidates = [self.context_dir, *sorted(self.context_dir.parent.parent.glob(f"*/{task_uuid}"))]
        for directory in candidates:
            try:
                if not directory.is_symlink() and load_metadata(directory).get("uuid") == task_uuid:
                    return directory
            except DamagedMetadataError:
                continue
        return None


@dataclass(frozen=True)
class PreviousRun:
    """An earlier run of the same issue or merge request: its row, and the directory of its files."""

    task: Task
    context_dir: Path | None


# The method that finishes a task as each final status, which names its write in the log.
_CALLED_AS = {"completed": "complete", "stopped": "stop", "failed": "fail"}

# What a write returns when the database refused the values (a counter would pass INTEGER): not worth retrying.
_REFUSED = object()


class _Heartbeat:
    """A daemon thread that records a sign of life of the task every `interval` seconds, whatever the agent is
    doing. Holds no reference to its manager, so that a dropped manager is still collected. A task marked
    failed for want of a sign of life while its agent lived is set running again, with that recorded."""

    def __init__(self, task_uuid: str, interval: float) -> None:
        self.task_uuid = task_uuid
        self.interval = interval
        self._stopped = threading.Event()
        self._failing = False
        self._owner_pid = os.getpid()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{task_uuid}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()

    def _run(self) -> None:
        while not self._stopped.wait(self.interval):
            if os.getpid() != self._owner_pid:
                return
            self.beat()

    def beat(self) -> None:
        """One sign of life; a database that cannot take it is logged once until it can again."""
        if not DatabaseConnection.is_initialized():
            return
        try:
            liveness = TaskLiveness()
            seen = liveness.beat(self.task_uuid, socket.gethostname(), os.getpid())
            if seen is not None and not self._stopped.is_set():
                status, message = seen
                if status == "failed" and message is not None and message.startswith(NO_SIGN_OF_LIFE):
                    logger.warning(
                        "task %s was marked failed while its agent lived (%s); it goes on, recorded in the row",
                        self.task_uuid,
                        message,
                    )
                    liveness.revive(self.task_uuid, message)
        except Exception as exc:
            if not self._failing:
                logger.warning("task %s: no sign of life recorded, the task goes on: %s", self.task_uuid, str(exc))
            self._failing = True
            return
        self._failing = False
