"""metadata.json of a task: written durably, read without ever losing the task over a damaged file."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from db.models import INT_MAX
from private_files import open_private

logger = logging.getLogger(__name__)

METADATA = "metadata.json"


# metadata.json is small; an error message of 10 MB kept in it is the largest thing it holds.
MAX_METADATA_BYTES = 64 * 1024 * 1024
STATISTICS = ("llm_calls", "tool_calls", "tokens", "compressions")
FINISHED = frozenset({"completed", "failed", "stopped"})


class DamagedMetadataError(ValueError):
    """metadata.json cannot be used as it is: the message says why (never what it holds)."""


def load_metadata(directory: Path) -> dict[str, Any]:
    """The task's metadata, or {} when there is none; DamagedMetadataError when it cannot be used. Reads only a
    regular file of bounded size, never through a link, and changes nothing."""
    raw = _read_regular_file(directory / METADATA)
    if raw is None:
        return {}
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        raise DamagedMetadataError("is not JSON (empty, torn or nested too deep)") from None
    if not isinstance(value, dict):
        raise DamagedMetadataError(f"holds a JSON {type(value).__name__}, not an object")
    check_metadata(value)
    return value


def read_metadata(directory: Path) -> dict[str, Any]:
    """The task's metadata, or {} when there is none. A file that cannot be used (empty, torn, not a JSON
    object, values of the wrong kind, not a regular file) is set aside as `metadata.json.damaged-<UTC time>`
    and {} returned, so that the task can go on and the file can still be looked at. For the holder of the
    task's directory only: `load_metadata` is the reading that changes nothing."""
    try:
        return load_metadata(directory)
    except DamagedMetadataError as exc:
        path = directory / METADATA
        aside = path.with_name(f"{METADATA}.damaged-{datetime.now(UTC):%Y%m%dT%H%M%S%fZ}")
        os.replace(path, aside)
        logger.error("%s %s; set aside as %s and started afresh", path, exc, aside.name)
        return {}


def _read_regular_file(path: Path) -> bytes | None:
    try:
        # O_NOFOLLOW: a link is refused, not followed out of the tree; O_NONBLOCK: a FIFO does not hang the open.
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise DamagedMetadataError(f"cannot be opened ({exc.strerror}; a link?)") from None
    try:
        info = os.fstat(descriptor)
        if not stat.S_ISREG(info.st_mode):
            raise DamagedMetadataError("is not a regular file")
        if info.st_size > MAX_METADATA_BYTES:
            raise DamagedMetadataError(f"is larger than {MAX_METADATA_BYTES} bytes")
        chunks = []
        left = MAX_METADATA_BYTES + 1
        while left > 0 and (chunk := os.read(descriptor, min(left, 1 << 20))):
            chunks.append(chunk)
            left -= len(chunk)
    except OSError as exc:
        raise DamagedMetadataError(f"cannot be read ({exc.strerror})") from None
    finally:
        os.close(descriptor)
    if left <= 0:
        raise DamagedMetadataError(f"is larger than {MAX_METADATA_BYTES} bytes")
    return b"".join(chunks)


def check_metadata(metadata: dict[str, Any]) -> None:
    """DamagedMetadataError unless every part this code reads has the kind it expects."""
    for name in ("status", "error_message", "completed_at", "hostname"):
        if metadata.get(name) is not None and not isinstance(metadata[name], str):
            raise DamagedMetadataError(f"has a {name} that is not text")
    if metadata.get("status") in FINISHED and metadata.get("completed_at") is not None:
        _instant(metadata["completed_at"], "completed_at")
    unsaved = metadata.get("unsaved")
    if unsaved is None:
        return
    if not isinstance(unsaved, dict) or not unsaved.keys() <= {"statistics", "in_flight", "outcome"}:
        raise DamagedMetadataError("has an unsaved part that is not statistics, in_flight and outcome")
    if unsaved.get("statistics") is not None:
        _check_statistics(unsaved["statistics"], "unsaved statistics")
    _check_in_flight(unsaved.get("in_flight"))
    outcome = unsaved.get("outcome")
    if outcome is not None:
        if not isinstance(outcome, dict) or outcome.get("status") not in FINISHED:
            raise DamagedMetadataError("has a kept outcome that is not completed, failed or stopped")
        if outcome.get("error_message") is not None and not isinstance(outcome["error_message"], str):
            raise DamagedMetadataError("has a kept outcome whose error_message is not text")
        if outcome.get("completed_at") is not None:
            _instant(outcome["completed_at"], "kept outcome's completed_at")


def _check_in_flight(in_flight: object) -> None:
    if in_flight is not None and not isinstance(in_flight, dict | list):
        raise DamagedMetadataError("has in-flight statistics that are not a list of batches")
    # A list of batches; a file written before operation ids holds one batch, with its row_version.
    batches = [in_flight] if isinstance(in_flight, dict) else in_flight or []
    for batch in batches:
        _check_batch(batch)
    ids = [str(uuid.UUID(batch["operation_id"])) for batch in batches if "operation_id" in batch]
    if len(set(ids)) != len(ids):
        # Two batches under one id would count as one: which of them was sent cannot be told.
        raise DamagedMetadataError("has in-flight batches that share an operation_id")


def _check_batch(batch: object) -> None:
    if not isinstance(batch, dict) or "statistics" not in batch:
        raise DamagedMetadataError("has in-flight statistics that are not an object")
    _check_statistics(batch["statistics"], "in-flight statistics")
    if "operation_id" not in batch:
        _instant(batch.get("row_version"), "in-flight row_version")
        return
    try:
        uuid.UUID(batch["operation_id"])
    except (TypeError, ValueError, AttributeError):
        raise DamagedMetadataError("has in-flight statistics whose operation_id is not a UUID") from None
    _instant(batch.get("sent_at"), "in-flight sent_at")
    if batch.get("row_version") is not None:
        _instant(batch["row_version"], "in-flight row_version")


def _check_statistics(value: object, what: str) -> None:
    if not isinstance(value, dict) or not value.keys() <= set(STATISTICS):
        raise DamagedMetadataError(f"has {what} that are not {', '.join(STATISTICS)}")
    for amount in value.values():
        if isinstance(amount, bool) or not isinstance(amount, int) or not 0 <= amount <= INT_MAX:
            raise DamagedMetadataError(f"has {what} that are not whole numbers in 0..{INT_MAX}")


def _instant(value: object, what: str) -> None:
    try:
        parsed = datetime.fromisoformat(value) if isinstance(value, str) else None
        # An instant the database can hold: in UTC, within years 1..9999.
        in_utc = parsed.astimezone(UTC) if parsed is not None and parsed.utcoffset() is not None else None
    except (ValueError, OverflowError):
        in_utc = None
    if in_utc is None:
        raise DamagedMetadataError(f"has a {what} that is not an ISO date-time with its offset")


def write_metadata(directory: Path, metadata: dict[str, Any]) -> None:
    """Replace metadata.json atomically and durably: the new file's data and the rename reach the disk
    before this returns, so a crash leaves either the old file or the new one, whole."""
    path = directory / METADATA
    temporary = path.with_name(f"{METADATA}.{os.getpid()}.tmp")
    # backslashreplace: a lone surrogate (say, in an error message) is kept as its JSON escape.
    data = json.dumps(metadata, ensure_ascii=False, indent=2).encode("utf-8", "backslashreplace")
    descriptor = open_private(temporary, os.O_WRONLY | os.O_TRUNC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(descriptor, view) :]
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    os.replace(temporary, path)
    sync_directory(directory)


def sync_directory(directory: Path) -> None:
    """Flush a directory's entries (a rename, a new file) to the disk."""
    with contextlib.suppress(OSError):
        descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
