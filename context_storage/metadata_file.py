"""metadata.json of a task: written durably, read without ever losing the task over a damaged file."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from db.private_files import open_private

logger = logging.getLogger(__name__)

METADATA = "metadata.json"


def read_metadata(directory: Path) -> dict[str, Any]:
    """The task's metadata, or {} when there is none. A file that is empty, torn or not a JSON object (a
    crash before its data reached the disk) is set aside as `metadata.json.damaged-<UTC time>` and {}
    returned, so that the task can go on and the file can still be looked at."""
    path = directory / METADATA
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        value = None
    if isinstance(value, dict):
        return value
    aside = path.with_name(f"{METADATA}.damaged-{datetime.now(UTC):%Y%m%dT%H%M%S%fZ}")
    os.replace(path, aside)
    logger.error("%s is damaged (%d bytes); set aside as %s and started afresh", path, len(raw), aside.name)
    return {}


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
