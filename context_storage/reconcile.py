"""Put task directories and rows back in step after crashes and outages (`python main.py tasks reconcile`).

Driven by the directories under `<base_dir>/running` and `<base_dir>/completed`: each task's row is read, and
what disagrees is reported with the fix that `apply()` makes. A task a live manager holds is left alone.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from context_storage.metadata_file import DamagedMetadataError, load_metadata, sync_directory
from context_storage.task_lock import TaskLock
from context_storage.unsaved import add_statistics, batches_in_flight, drop_outcome, write_kept_statistics
from db import Task, TaskRepository
from db.models.types import canonical_uuid

logger = logging.getLogger(__name__)

FINISHED = frozenset({"completed", "failed", "stopped"})


@dataclass(frozen=True)
class Discrepancy:
    """One task whose files and row disagree: what is wrong, and what `apply()` does about it."""

    uuid: str
    problem: str
    fix: str | None
    apply: Callable[[], None] | None = None


def task_directories(base_dir: Path) -> Iterator[tuple[str, Path]]:
    """(uuid, directory) of every task directory under running/ and completed/ (set-aside copies skipped)."""
    for area in ("running", "completed"):
        parent = base_dir / area
        if not parent.is_dir():
            continue
        for directory in sorted(parent.iterdir()):
            try:
                key = canonical_uuid(directory.name)
            except ValueError:
                continue
            if key == directory.name and (directory.is_symlink() or directory.is_dir()):
                yield key, directory


def find_discrepancies(base_dir: Path, repository: TaskRepository) -> list[Discrepancy]:
    """Every task whose directory, metadata.json and row disagree. Reads only, and changes nothing (not even a
    lock file); a damaged folder is reported and the others are checked all the same. Nothing outside base_dir
    is read or written: running/, completed/ or locks/ that is a link is left alone, with every task."""
    linked = [area for area in ("running", "completed", "locks") if (base_dir / area).is_symlink()]
    if linked:
        # Any task could be read from, moved into or locked in the linked area: none is looked at.
        return [
            Discrepancy("-", f"{area}/ is a link out of {base_dir}; nothing in it is checked", None) for area in linked
        ]
    found: list[Discrepancy] = []
    for key, directory in task_directories(base_dir):
        where = f"{directory.parent.name}/{key}"
        if directory.is_symlink():
            found.append(Discrepancy(key, f"{where} is a link, not a task directory; left alone", None))
            continue
        try:
            if TaskLock(base_dir, key).held_elsewhere():
                continue  # a live manager keeps it in step itself
        except OSError as exc:
            found.append(Discrepancy(key, f"locks/{key}.lock is not a lock file ({exc.strerror}); left alone", None))
            continue
        try:
            metadata = load_metadata(directory)
        except DamagedMetadataError as exc:
            found.append(Discrepancy(key, f"{where}/metadata.json {exc}; left alone", None))
            continue
        found.extend(_check(base_dir, key, directory, metadata, repository))
    return found


def _check(
    base_dir: Path, key: str, directory: Path, metadata: dict[str, Any], repository: TaskRepository
) -> list[Discrepancy]:
    row = repository.get_by_uuid(key)
    if row is None:
        return [Discrepancy(key, f"{directory.parent.name}/{key} has no row in the tasks table", None)]
    unsaved = metadata.get("unsaved") or {}
    found: list[Discrepancy] = []
    if unsaved.get("statistics") or unsaved.get("in_flight"):
        kept = unsaved.get("statistics") or {}
        for batch in batches_in_flight(unsaved):
            kept = add_statistics(kept, batch["statistics"])
        found.append(
            Discrepancy(
                key,
                f"statistics {kept} kept in metadata.json were never written",
                "write them (once)",
                lambda: _locked(base_dir, key, lambda: _write_statistics(key, directory, repository)),
            )
        )
    outcome = unsaved.get("outcome") or _finished_in_metadata(metadata, row)
    if outcome is not None and row.status != outcome["status"]:
        found.append(
            Discrepancy(
                key,
                f"the row says {row.status}, the task ended {outcome['status']}",
                f"set the row to {outcome['status']}",
                lambda: _locked(base_dir, key, lambda: _write_outcome(key, directory, outcome, repository)),
            )
        )
    elif unsaved.get("outcome") is not None:
        found.append(
            Discrepancy(
                key,
                "an outcome kept in metadata.json is already in the row",
                "forget it",
                lambda: _locked(base_dir, key, lambda: drop_outcome(directory, load_metadata(directory))),
            )
        )
    finished = (outcome or {}).get("status") or row.status
    if directory.parent.name == "running" and finished in FINISHED:
        target = base_dir / "completed" / key
        if target.exists():
            found.append(Discrepancy(key, f"finished as {finished} but in running/, and completed/{key} exists", None))
        else:
            found.append(
                Discrepancy(
                    key,
                    f"finished as {finished} but its directory is in running/",
                    f"move it to completed/{key}",
                    lambda: _locked(base_dir, key, lambda: _move(directory, target)),
                )
            )
    return found


def _finished_in_metadata(metadata: dict[str, Any], row: Task) -> dict[str, object] | None:
    """The outcome metadata.json records when the row still says running (a crash before the row was written)."""
    status = metadata.get("status")
    if row.status == "running" and status in FINISHED:
        return {
            "status": status,
            "error_message": metadata.get("error_message"),
            "completed_at": metadata.get("completed_at"),
        }
    return None


def _locked(base_dir: Path, key: str, action: Callable[[], None]) -> None:
    lock = TaskLock(base_dir, key)
    lock.acquire()
    try:
        action()
    finally:
        lock.release()


def _write_statistics(key: str, directory: Path, repository: TaskRepository) -> None:
    write_kept_statistics(directory, load_metadata(directory), key, repository)


def _write_outcome(key: str, directory: Path, outcome: dict[str, object], repository: TaskRepository) -> None:
    # Statistics kept beside the outcome go first: batches too old for their ids are decided by the row, which
    # the outcome would move on.
    if not write_kept_statistics(directory, load_metadata(directory), key, repository):
        raise ValueError(f"the statistics kept for task {key} could not be written first; the outcome waits")
    values: dict[str, object] = {"status": outcome["status"]}
    if outcome.get("error_message") is not None:
        values["error_message"] = outcome["error_message"]
    completed_at = outcome.get("completed_at")
    if isinstance(completed_at, str):
        values["completed_at"] = datetime.fromisoformat(completed_at)
    if repository.update(key, values) is not None:
        drop_outcome(directory, load_metadata(directory))


def _move(directory: Path, target: Path) -> None:
    shutil.move(directory, target)
    sync_directory(target.parent)
