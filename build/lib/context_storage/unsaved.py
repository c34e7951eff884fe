"""What a task could not write to its row before its process ended, kept in metadata.json until written.

metadata.json's `unsaved` holds up to three things:

- `statistics`: increments never sent;
- `in_flight`: increments being sent, with the row's `updated_at` just before (`row_version`). The write
  is guarded by that version, so after a crash the row tells whether it landed: a row whose `updated_at`
  moved on took it (only the holder of the task's lock writes the row), one that did not never did;
- `outcome`: the final status (`status`, `error_message`, `completed_at`) of a task that ended while the
  database was away.

Everything is removed from the file only after the database took it, and written at most once.
"""

from __future__ import annotations

import logging
from datetime import datetime
from pathlib import Path
from typing import Any

from context_storage.metadata_file import STATISTICS, read_metadata, write_metadata
from db import TaskRepository

logger = logging.getLogger(__name__)


def add_statistics(first: dict[str, int], second: dict[str, int]) -> dict[str, int]:
    return {name: int(first.get(name, 0)) + int(second.get(name, 0)) for name in STATISTICS}


def _update_unsaved(directory: Path, change: dict[str, Any], drop: tuple[str, ...] = ()) -> dict[str, Any]:
    metadata = read_metadata(directory)
    unsaved = dict(metadata.get("unsaved") or {})
    unsaved.update(change)
    for key in drop:
        unsaved.pop(key, None)
    if unsaved:
        metadata["unsaved"] = unsaved
    else:
        metadata.pop("unsaved", None)
    write_metadata(directory, metadata)
    return unsaved


def keep_unsaved(
    directory: Path, statistics: dict[str, int] | None = None, outcome: dict[str, Any] | None = None
) -> None:
    """Add `statistics` to those kept for later and record `outcome`; durable when this returns."""
    metadata = read_metadata(directory)
    unsaved = dict(metadata.get("unsaved") or {})
    if statistics and any(statistics.values()):
        unsaved["statistics"] = add_statistics(unsaved.get("statistics") or {}, statistics)
    if outcome is not None:
        unsaved["outcome"] = outcome
    if unsaved:
        metadata["unsaved"] = unsaved
        write_metadata(directory, metadata)


def resolve_in_flight(directory: Path, task_uuid: str, repository: TaskRepository) -> None:
    """Decide, from the row, whether increments being sent when a process ended landed; before anything else
    writes the row. Those that did not go back to `statistics`."""
    unsaved = read_metadata(directory).get("unsaved") or {}
    in_flight = unsaved.get("in_flight")
    if not in_flight:
        return
    row = repository.get_by_uuid(task_uuid)
    landed = row is not None and row.updated_at != datetime.fromisoformat(in_flight["row_version"])
    if landed:
        logger.info("task %s: statistics sent before a crash were written; not sending them again", task_uuid)
        _update_unsaved(directory, {}, drop=("in_flight",))
    else:
        statistics = add_statistics(unsaved.get("statistics") or {}, in_flight["statistics"])
        _update_unsaved(directory, {"statistics": statistics}, drop=("in_flight",))


def write_unsaved_statistics(directory: Path, task_uuid: str, repository: TaskRepository) -> bool:
    """Send the kept increments once; True when none are left. Call `resolve_in_flight` first."""
    unsaved = read_metadata(directory).get("unsaved") or {}
    statistics = unsaved.get("statistics")
    if not statistics or not any(statistics.values()):
        if statistics is not None:
            _update_unsaved(directory, {}, drop=("statistics",))
        return True
    row = repository.get_by_uuid(task_uuid)
    if row is None:
        return False
    in_flight = {"statistics": statistics, "row_version": row.updated_at.isoformat()}
    _update_unsaved(directory, {"in_flight": in_flight}, drop=("statistics",))
    amounts = {name: int(statistics.get(name, 0)) for name in STATISTICS}
    try:
        written = repository.update_statistics(task_uuid, *amounts.values(), if_updated_at=row.updated_at)
    except ValueError as exc:
        logger.error("task %s: statistics kept from an earlier run cannot be stored, dropped: %s", task_uuid, exc)
        _update_unsaved(directory, {}, drop=("in_flight",))
        return True
    if written:
        _update_unsaved(directory, {}, drop=("in_flight",))
        logger.info("task %s: wrote statistics kept from an earlier run: %s", task_uuid, amounts)
        return True
    # The guard did not match, so nothing was added: keep them for the next attempt.
    kept = read_metadata(directory).get("unsaved") or {}
    _update_unsaved(
        directory, {"statistics": add_statistics(kept.get("statistics") or {}, statistics)}, drop=("in_flight",)
    )
    return False


def drop_outcome(directory: Path) -> None:
    """Forget a kept outcome (the task was resumed, or the outcome was written)."""
    if (read_metadata(directory).get("unsaved") or {}).get("outcome") is not None:
        _update_unsaved(directory, {}, drop=("outcome",))
