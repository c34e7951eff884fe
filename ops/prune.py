"""Pruning finished tasks older than a cutoff: their rows, with their tokens kept in usage buckets, and their
directories under completed/, batch by batch, each task with a directory under its lock.

A task's directories are renamed `.pruning-<name>` before its row is deleted and removed after, or renamed back
if the row stayed. An interrupted run leaves such names behind; the next run removes those whose row is gone
and renames the others back, so no directory outlives its row and none is removed while its row remains.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from context_storage.metadata_file import DamagedMetadataError, load_metadata
from context_storage.task_context_manager import PRUNING
from context_storage.task_lock import TaskAlreadyRunningError, TaskLock
from db.repositories.task_repository import TaskRepository
from db.repositories.task_retention import MAX_BATCH, PrunableTask, PruneSummary, TaskRetention

# completed/<uuid>, or completed/<uuid>-<UTC time> for a run finished while completed/<uuid> existed.
_TASK_ENTRY = re.compile(r"([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})(-\d{8}T\d{6}\d*Z)?")
AREAS = ("running", "completed", "locks")


class UnsafeTreeError(ValueError):
    """The task tree cannot be pruned as it is (running/, completed/ or locks/ is a link or not a directory)."""


@dataclass(frozen=True)
class TaskFolders:
    """What is under completed/ and running/, read once: each task's directory names under completed/, the
    tasks with a directory under running/, and the names an interrupted run left."""

    base_dir: Path
    completed: dict[str, list[str]]
    running: frozenset[str]
    leftovers: tuple[str, ...]

    @classmethod
    def scan(cls, base_dir: Path) -> TaskFolders:
        for area in AREAS:
            place = base_dir / area
            if place.is_symlink() or (place.exists() and not place.is_dir()):
                raise UnsafeTreeError(
                    f"{place} is a link or not a directory: nothing outside {base_dir} is pruned; make it a "
                    "directory of its own, or prune without it"
                )
        completed: dict[str, list[str]] = {}
        leftovers: list[str] = []
        for name in _names(base_dir / "completed"):
            if name.startswith(PRUNING) and _TASK_ENTRY.fullmatch(name.removeprefix(PRUNING)):
                # Only a directory can be one that a prune set aside; anything else of that name is not ours.
                if _is_directory(base_dir / "completed" / name):
                    leftovers.append(name)
            elif (found := _TASK_ENTRY.fullmatch(name)) is not None:
                completed.setdefault(found.group(1), []).append(name)
        running = frozenset(name for name in _names(base_dir / "running") if _TASK_ENTRY.fullmatch(name))
        return cls(base_dir, completed, running, tuple(sorted(leftovers)))

    @property
    def completed_dir(self) -> Path:
        return self.base_dir / "completed"

    def problem(self, uuid: str) -> str | None:
        """Why the task's directories cannot be pruned now (read only), or None."""
        if uuid in self.running:
            return "its directory is under running/: `tasks reconcile` puts it in place first"
        for name in self.completed.get(uuid, []):
            path = self.completed_dir / name
            if path.is_symlink() or not path.is_dir():
                return f"completed/{name} is a link or not a directory; left alone"
            try:
                unsaved = load_metadata(path).get("unsaved")
            except DamagedMetadataError as exc:
                return f"completed/{name}/metadata.json {exc}; left alone"
            if unsaved:
                return f"completed/{name} holds statistics not yet written: `tasks reconcile --yes` writes them"
        return None

    def size(self, uuid: str) -> int:
        return sum(tree_bytes(self.completed_dir / name) for name in self.completed.get(uuid, []))


@dataclass(frozen=True)
class PrunePlan:
    """What `prune` would do, found without changing anything."""

    summary: PruneSummary
    directories: int
    bytes: int
    held_back: list[tuple[str, str]]
    first: list[PrunableTask]
    leftovers: int


@dataclass
class PruneResult:
    tasks: int = 0
    directories: int = 0
    bytes: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    leftovers_removed: int = 0


def plan_prune(base_dir: Path, retention: TaskRetention, cutoff: datetime, *, shown: int = 20) -> PrunePlan:
    """Tasks, directories and bytes a prune at `cutoff` would remove, and the tasks it would hold back."""
    folders = TaskFolders.scan(base_dir)
    summary = retention.summary(cutoff)
    directories = size = 0
    held_back: list[tuple[str, str]] = []
    first: list[PrunableTask] = []
    for task in _all_prunable(retention, cutoff, MAX_BATCH):
        problem = folders.problem(task.uuid) or _held(folders, task.uuid)
        if problem is not None:
            held_back.append((task.uuid, problem))
            continue
        if len(first) < shown:
            first.append(task)
        directories += len(folders.completed.get(task.uuid, []))
        size += folders.size(task.uuid)
    return PrunePlan(summary, directories, size, held_back, first, len(folders.leftovers))


# On SQLite, a prune waits as long again after each batch, so that agents' writes waiting on the file get in.
SQLITE_YIELD = 1.0


def prune(
    base_dir: Path,
    retention: TaskRetention,
    repository: TaskRepository,
    cutoff: datetime,
    *,
    batch_size: int = 200,
    progress: Callable[[int], None] | None = None,
    yield_to_writers: float = 0.0,
) -> PruneResult:
    """Remove the finished tasks of before `cutoff` and their directories, `batch_size` at a time (each batch
    one short transaction); first finish what an interrupted run left. `yield_to_writers`: after each batch,
    wait that many times as long as it took, so that writers waiting for a lock get it (SQLite, whose waiting
    writers only look again now and then, needs it; PostgreSQL queues them)."""
    folders = TaskFolders.scan(base_dir)
    result = PruneResult()
    if folders.leftovers:
        _finish_leftovers(folders, repository, result)
        folders = TaskFolders.scan(base_dir)
    after: PrunableTask | None = None
    while batch := retention.prunable(cutoff, after=after, limit=batch_size):
        after = batch[-1]
        started = time.monotonic()
        _prune_batch(folders, retention, cutoff, batch, result)
        if progress is not None:
            progress(len(batch))
        if yield_to_writers:
            time.sleep(yield_to_writers * (time.monotonic() - started))
    return result


def _prune_batch(
    folders: TaskFolders, retention: TaskRetention, cutoff: datetime, batch: list[PrunableTask], result: PruneResult
) -> None:
    claimed: dict[str, tuple[TaskLock, list[str]]] = {}
    ready: list[str] = []
    try:
        for task in batch:
            names = folders.completed.get(task.uuid, [])
            # A task with directories is looked at under its lock, once; one without has only running/ to check.
            problem = _claim(folders, task.uuid, names, claimed) if names else folders.problem(task.uuid)
            if problem is not None:
                result.skipped.append((task.uuid, problem))
                continue
            ready.append(task.uuid)
        # Should this fail (the database, Ctrl-C), whether the batch went is not known: its directories keep
        # their `.pruning-` names, which the next prune settles by their rows, and an agent resuming such a
        # task takes its directory back from.
        deleted = set(retention.prune(ready, cutoff)) if ready else set()
        result.tasks += len(deleted)
        for uuid in ready:
            if uuid not in deleted:
                result.skipped.append((uuid, "changed meanwhile (resumed, or held by another transaction); kept"))
        for uuid, (_, names) in claimed.items():
            for name in names if uuid in deleted else ():
                aside = folders.completed_dir / f"{PRUNING}{name}"
                size = tree_bytes(aside)
                try:
                    shutil.rmtree(aside)
                except OSError as exc:
                    result.skipped.append(
                        (uuid, f"row pruned, completed/{aside.name} not removed ({exc}); the next prune removes it")
                    )
                    continue
                result.bytes += size
                result.directories += 1
        _put_back(folders, {uuid: claim for uuid, claim in claimed.items() if uuid not in deleted}, result)
    finally:
        for lock, _ in claimed.values():
            lock.release()


def _why_not_now(folders: TaskFolders, uuid: str, names: list[str]) -> str | None:
    """Under the task's lock (an agent may have resumed it since the scan): why its directories cannot be set
    aside now, or None."""
    if (folders.base_dir / "running" / uuid).exists():
        return "resumed meanwhile; kept"
    taken = [name for name in names if os.path.lexists(folders.completed_dir / f"{PRUNING}{name}")]
    if taken:
        return f"completed/{PRUNING}{taken[0]} exists already (left by a prune?); kept"
    return folders.problem(uuid)


def _put_back(folders: TaskFolders, claimed: dict[str, tuple[TaskLock, list[str]]], result: PruneResult) -> None:
    for uuid, (_, names) in claimed.items():
        for name in names:
            try:
                os.rename(folders.completed_dir / f"{PRUNING}{name}", folders.completed_dir / name)
            except OSError as exc:
                result.skipped.append((uuid, f"completed/{PRUNING}{name} not put back ({exc}); the next prune does"))


def _claim(
    folders: TaskFolders, uuid: str, names: list[str], claimed: dict[str, tuple[TaskLock, list[str]]]
) -> str | None:
    """Lock the task and set its directories aside; the reason it cannot be, or None."""
    lock = TaskLock(folders.base_dir, uuid)
    try:
        lock.acquire()
    except TaskAlreadyRunningError:
        return "being worked on; kept"
    except OSError as exc:
        return f"locks/{uuid}.lock cannot be taken ({exc.strerror}); kept"
    problem = _why_not_now(folders, uuid, names)
    if problem is not None:
        lock.release()
        return problem
    moved: list[str] = []
    try:
        for name in names:
            os.rename(folders.completed_dir / name, folders.completed_dir / f"{PRUNING}{name}")
            moved.append(name)
    except OSError as exc:
        for name in moved:
            os.rename(folders.completed_dir / f"{PRUNING}{name}", folders.completed_dir / name)
        lock.release()
        return f"cannot set completed/{name} aside ({exc.strerror}); kept"
    claimed[uuid] = (lock, names)
    return None


def _finish_leftovers(folders: TaskFolders, repository: TaskRepository, result: PruneResult) -> None:
    """Directories an interrupted run set aside: removed if their row is gone, else put back."""
    for name in folders.leftovers:
        original = name.removeprefix(PRUNING)
        uuid = original[:36]
        lock = TaskLock(folders.base_dir, uuid)
        try:
            lock.acquire()
        except (TaskAlreadyRunningError, OSError) as exc:
            result.skipped.append((uuid, f"completed/{name} left by an interrupted prune, not finished now: {exc}"))
            continue
        try:
            aside = folders.completed_dir / name
            if repository.get_by_uuid(uuid) is None:
                size = tree_bytes(aside)
                shutil.rmtree(aside)
                result.bytes += size
                result.leftovers_removed += 1
            elif (folders.completed_dir / original).exists():
                result.skipped.append((uuid, f"completed/{name} cannot be put back: completed/{original} exists"))
            else:
                os.rename(aside, folders.completed_dir / original)
        except OSError as exc:
            result.skipped.append((uuid, f"completed/{name} left by an interrupted prune, not finished now: {exc}"))
        finally:
            lock.release()


def _held(folders: TaskFolders, uuid: str) -> str | None:
    """Whether a live process holds the task (read only: no lock taken, no file made)."""
    if not folders.completed.get(uuid):
        return None
    try:
        return "being worked on; kept" if TaskLock(folders.base_dir, uuid).held_elsewhere() else None
    except OSError as exc:
        return f"locks/{uuid}.lock is not a lock file ({exc.strerror}); kept"


def _all_prunable(retention: TaskRetention, cutoff: datetime, page: int) -> Iterator[PrunableTask]:
    after: PrunableTask | None = None
    while batch := retention.prunable(cutoff, after=after, limit=page):
        yield from batch
        after = batch[-1]


def _names(directory: Path) -> list[str]:
    try:
        with os.scandir(directory) as entries:
            return [entry.name for entry in entries]
    except (FileNotFoundError, NotADirectoryError):
        return []


def _is_directory(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def tree_bytes(path: Path) -> int:
    """Bytes of the files under `path`, links counted as themselves and never followed."""
    if not _is_directory(path):
        return 0
    total = 0
    stack = [path]
    while stack:
        current = stack.pop()
        try:
            with os.scandir(current) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(Path(entry.path))
                    else:
                        total += entry.stat(follow_symlinks=False).st_size
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            continue
    return total
