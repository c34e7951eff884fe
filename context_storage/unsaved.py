"""What a task could not write to its row before its process ended, kept in metadata.json until written.

metadata.json's `unsaved` holds up to three things:

- `statistics`: increments never sent;
- `in_flight`: batches of increments that were being sent, each with the operation id it was sent with
  (`operation_id`), when (`sent_at`) and, when known, the row's `updated_at` just before (`row_version`).
  Sending a batch again with its id counts it once, whether or not the first send took effect. An id is
  kept by the database for OPERATION_RETENTION; an older batch is decided by its row instead: a row whose
  `updated_at` moved on took it (only the holder of the task's lock writes the row), one that did not never did;
- `outcome`: the final status (`status`, `error_message`, `completed_at`) of a task that ended while the
  database was away.

Everything is removed from the file only after the database took it. Each function is given the metadata
already read and writes the file only when it changes it.
"""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from context_storage.metadata_file import STATISTICS, read_metadata, write_metadata
from db import TaskRepository
from db.models import OPERATION_RETENTION

logger = logging.getLogger(__name__)


def add_statistics(first: dict[str, int], second: dict[str, int]) -> dict[str, int]:
    return {name: int(first.get(name, 0)) + int(second.get(name, 0)) for name in STATISTICS}


def new_batch(statistics: dict[str, int], row_version: datetime | None = None) -> dict[str, Any]:
    """A batch of increments about to be sent, with the operation id that makes sending it again safe."""
    batch: dict[str, Any] = {
        "statistics": dict(statistics),
        "operation_id": str(uuid.uuid4()),
        "sent_at": datetime.now(UTC).isoformat(),
    }
    if row_version is not None:
        batch["row_version"] = row_version.isoformat()
    return batch


def batches_in_flight(unsaved: dict[str, Any]) -> list[dict[str, Any]]:
    """The batches in flight, as a list (a file written before operation ids holds one, as a dict)."""
    in_flight = unsaved.get("in_flight") or []
    return [in_flight] if isinstance(in_flight, dict) else list(in_flight)


def _store(directory: Path, metadata: dict[str, Any], unsaved: dict[str, Any]) -> None:
    unsaved = {key: value for key, value in unsaved.items() if value}
    if unsaved:
        metadata["unsaved"] = unsaved
    else:
        metadata.pop("unsaved", None)
    write_metadata(directory, metadata)


def keep_unsaved(
    directory: Path,
    statistics: dict[str, int] | None = None,
    outcome: dict[str, Any] | None = None,
    in_flight: dict[str, Any] | None = None,
) -> None:
    """Add `statistics` to those kept for later, `in_flight` to the batches being sent, and record `outcome`;
    durable when this returns."""
    metadata = read_metadata(directory)
    unsaved = dict(metadata.get("unsaved") or {})
    if statistics and any(statistics.values()):
        unsaved["statistics"] = add_statistics(unsaved.get("statistics") or {}, statistics)
    if in_flight is not None:
        unsaved["in_flight"] = [*batches_in_flight(unsaved), in_flight]
    if outcome is not None:
        unsaved["outcome"] = outcome
    if unsaved:
        _store(directory, metadata, unsaved)


def settle_by_row(directory: Path, metadata: dict[str, Any], task_uuid: str, repository: TaskRepository) -> None:
    """Decide the batches in flight that their operation ids can no longer settle (too old, or written before
    ids) by their row: dropped if it moved on, back to the statistics never sent if not. Before anything else
    writes the row."""
    unsaved = dict(metadata.get("unsaved") or {})
    pending = batches_in_flight(unsaved)
    undecided = [batch for batch in pending if not _settled_by_id(batch)]
    if not undecided:
        return
    row = repository.get_by_uuid(task_uuid)
    if row is None:
        return
    statistics = unsaved.get("statistics") or {}
    for batch in undecided:
        version = batch.get("row_version")
        if version is not None and row.updated_at != datetime.fromisoformat(version):
            logger.info("task %s: statistics sent before a crash were written; not sending them again", task_uuid)
            continue
        if version is None:
            logger.warning(
                "task %s: statistics %s were being sent too long ago for their id to tell whether they landed; "
                "sending them again (they may count twice)",
                task_uuid,
                batch["statistics"],
            )
        statistics = add_statistics(statistics, batch["statistics"])
    unsaved["statistics"] = statistics
    unsaved["in_flight"] = [batch for batch in pending if _settled_by_id(batch)]
    _store(directory, metadata, unsaved)


def _settled_by_id(batch: dict[str, Any]) -> bool:
    """Whether the database still knows the batch's operation id, so that sending it again counts it once."""
    sent_at = batch.get("sent_at")
    if batch.get("operation_id") is None or not isinstance(sent_at, str):
        return False
    return datetime.now(UTC) - datetime.fromisoformat(sent_at) < OPERATION_RETENTION


def write_kept_statistics(
    directory: Path, metadata: dict[str, Any], task_uuid: str, repository: TaskRepository
) -> bool:
    """Send what metadata.json keeps: the batches in flight again, each with its id, then the statistics never
    sent as a new batch. True when nothing is left; False when the row is missing. A database failure is
    raised, with what was not written still kept (a batch, once in the file, keeps its id)."""
    settle_by_row(directory, metadata, task_uuid, repository)
    unsaved = dict(metadata.get("unsaved") or {})
    pending = batches_in_flight(unsaved)
    statistics = unsaved.pop("statistics", None)
    if statistics and any(statistics.values()):
        row = repository.get_by_uuid(task_uuid)
        if row is None:
            return False
        pending.append(new_batch(statistics, row.updated_at))
        unsaved["in_flight"] = pending
        _store(directory, metadata, unsaved)
    elif statistics is not None:
        _store(directory, metadata, unsaved)
    # Each batch is safe to send again with its id, so the file is rewritten once, after all of them (or after
    # those that went before a missing row or a failure): one durable write however many there are.
    sent = 0
    try:
        for batch in pending:
            if not send_batch(batch, task_uuid, repository):
                break
            sent += 1
    finally:
        if sent:
            unsaved["in_flight"] = pending[sent:]
            _store(directory, metadata, unsaved)
    return sent == len(pending)


def send_batch(batch: dict[str, Any], task_uuid: str, repository: TaskRepository) -> bool:
    """Send a kept batch again with its operation id: it counts once. False when the row is missing."""
    amounts = [int(batch["statistics"].get(name, 0)) for name in STATISTICS]
    try:
        return repository.update_statistics(task_uuid, *amounts, operation_id=batch["operation_id"])
    except ValueError as exc:
        logger.error("task %s: statistics kept from an earlier run cannot be stored, dropped: %s", task_uuid, exc)
        return True


def drop_outcome(directory: Path, metadata: dict[str, Any]) -> None:
    """Forget a kept outcome (the task was resumed, or the outcome was written)."""
    unsaved = dict(metadata.get("unsaved") or {})
    if unsaved.pop("outcome", None) is not None:
        _store(directory, metadata, unsaved)
