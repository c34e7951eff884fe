"""An append-only JSONL file whose records carry a sequence number starting at 1.

Appending reads only the file's tail (to find the last number), so the 100,000th append costs what the first
did. A line torn by a crash is skipped when reading and never glued to the next record.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from private_files import open_private

TAIL_CHUNK = 64 * 1024


def encode_line(record: dict[str, Any]) -> bytes:
    """One JSON line, UTF-8. A lone surrogate (text decoded with surrogateescape) is written as its JSON
    escape, which reads back as the same string, instead of making the write fail."""
    return (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8", "backslashreplace")


def append_line(path: Path, build: Callable[[], bytes]) -> int:
    """Append the line `build()` returns, holding an exclusive lock on the file from before `build` runs
    until the line is written. A torn last line (a crash mid-write) is first cut off and set apart in
    `<name>.torn`, so that it never glues onto the new line. Return the file's new size."""
    descriptor = open_private(path, os.O_RDWR | os.O_APPEND)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        size = _cut_torn_tail(descriptor, path)
        line = build()
        view = memoryview(line)
        while view:
            view = view[os.write(descriptor, view) :]
        return size + len(line)
    finally:
        os.close(descriptor)  # also releases the lock


def _cut_torn_tail(descriptor: int, path: Path) -> int:
    """Truncate the file after its last newline, keeping what follows in `<name>.torn`; the new size."""
    size = os.fstat(descriptor).st_size
    if size == 0 or os.pread(descriptor, 1, size - 1) == b"\n":
        return size
    end = size
    while end > 0:
        start = max(0, end - TAIL_CHUNK)
        found = os.pread(descriptor, end - start, start).rfind(b"\n")
        if found >= 0:
            end = start + found + 1
            break
        end = start
    torn = os.pread(descriptor, size - end, end)
    aside = open_private(path.with_name(path.name + ".torn"), os.O_WRONLY | os.O_APPEND)
    try:
        os.write(aside, torn + b"\n")
    finally:
        os.close(aside)
    os.ftruncate(descriptor, end)
    return end


class JsonlLog:
    """Records in `path`, one JSON object a line; `key` names the sequence field (`seq` or `id`).

    Safe to share between threads, and between processes appending to the same file: an append holds an
    exclusive lock on the file while it numbers and writes its record.
    """

    def __init__(self, path: Path, key: str = "seq") -> None:
        self.path = path
        self.key = key
        self._lock = threading.Lock()
        self._cached_size = -1
        self._cached_last = 0

    def append(self, record: dict[str, Any]) -> int:
        """Write `record` with the next sequence number first in it; return that number."""
        numbered: list[int] = []

        def build() -> bytes:
            numbered.append(self._last_number_locked() + 1)
            return encode_line({self.key: numbered[0], **record})

        with self._lock:
            size = append_line(self.path, build)
            self._cached_size, self._cached_last = size, numbered[0]
        return numbered[0]

    def last_number(self) -> int:
        """The sequence number of the last complete record, 0 for an empty or missing file."""
        with self._lock:
            return self._last_number_locked()

    def _last_number_locked(self) -> int:
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return 0
        if size != self._cached_size:
            last = self.last_record()
            self._cached_size = size
            self._cached_last = int(last[self.key]) if last else 0
        return self._cached_last

    def last_record(self) -> dict[str, Any] | None:
        """The last complete record, or None."""
        for record in self.reversed_records():
            return record
        return None

    def tail(self, count: int) -> list[dict[str, Any]]:
        """The last `count` records, oldest first."""
        records: list[dict[str, Any]] = []
        if count <= 0:
            return records
        for record in self.reversed_records():
            records.append(record)
            if len(records) == count:
                break
        records.reverse()
        return records

    def records(self) -> Iterator[dict[str, Any]]:
        """Every complete record, oldest first."""
        try:
            handle = self.path.open("rb")
        except FileNotFoundError:
            return
        with handle:
            for line in handle:
                record = _parse(line)
                if record is not None:
                    yield record

    def reversed_records(self) -> Iterator[dict[str, Any]]:
        """Complete records from the last to the first, reading the file backwards in chunks."""
        for line in _reversed_lines(self.path):
            record = _parse(line)
            if record is not None:
                yield record


def _parse(line: bytes) -> dict[str, Any] | None:
    if not line.strip():
        return None
    try:
        value = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


def _reversed_lines(path: Path) -> Iterator[bytes]:
    """The file's non-empty lines, last first; each byte is read once, however long the lines."""
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        return
    with handle:
        position = handle.seek(0, os.SEEK_END)
        pending: list[bytes] = []  # pieces of the line being put together, the last piece first
        while position > 0:
            step = min(TAIL_CHUNK, position)
            position -= step
            handle.seek(position)
            pieces = handle.read(step).split(b"\n")
            pending.append(pieces[-1])
            if len(pieces) == 1:
                continue
            line = b"".join(reversed(pending))
            if line:
                yield line
            for piece in reversed(pieces[1:-1]):
                if piece:
                    yield piece
            pending = [pieces[0]]
        line = b"".join(reversed(pending))
        if line:
            yield line
