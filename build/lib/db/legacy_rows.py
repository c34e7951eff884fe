"""Every value of an old SQLite tasks table, checked and carried over the same way by adoption and migrate-data.

A row is read as the bytes SQLite holds (so text that is not UTF-8 is found, not raised on) and turned into the
values of today's schema, or into problems naming the task, the column, the value and the fix. What has a way
through is carried over, and documented (docs/upgrading.md):

- a uuid in upper case, or with braces, becomes its canonical lower-case form; rows that then share a uuid are
  merged when they are identical, and refused otherwise;
- an id that is not a UUID (`test-uuid-123`) becomes the deterministic `uuid5(LEGACY_NAMESPACE, id)`; the
  mapping is written out beside the file;
- a status in another case (`RUNNING`) becomes its canonical form;
- NUL in text becomes `␀` and a lone surrogate `�`, as every write through the repository does;
- a number stored as text or as an integral float (`'12'`, `12.0`) in an integer column becomes that integer;
  a NULL counter becomes 0; date-times in any ISO-8601 form become the same instant in UTC.

Everything else (text that is not UTF-8, an unknown status, a counter out of range or fractional, a string
longer than its column, a missing required value, a date-time that is not one) is refused.
"""

from __future__ import annotations

import math
import sqlite3
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from db.models import COUNTER_COLUMNS, INT_MAX, Task, TaskStatus
from db.models.task import INT_MIN, storable_text
from db.models.types import parse_stored_datetime

# Fixed forever: the uuid a non-UUID id becomes must be the same in every run and on every machine.
LEGACY_NAMESPACE = uuid.UUID("6f1d3c2e-8a4b-5c7d-9e0f-1a2b3c4d5e6f")
COLUMNS = tuple(column.key for column in Task.__table__.columns)
REQUIRED_TEXT = ("task_source", "owner", "repo", "task_type", "task_id")
DATETIMES = ("created_at", "started_at", "completed_at", "updated_at")
UPDATED_FALLBACK = ("completed_at", "started_at", "created_at")
INTEGERS = ("process_id", "context_length", *COUNTER_COLUMNS)
LENGTHS: dict[str, int] = {
    column.key: column.type.length  # type: ignore[attr-defined]
    for column in Task.__table__.columns
    if getattr(column.type, "length", None) and column.key != "uuid"
}
STATUS_BY_LOWER = {status.value: status.value for status in TaskStatus}
SHOWN = 60


@dataclass(frozen=True)
class Problem:
    """A value that cannot be carried over: where it is, what it is, and what to do about it."""

    task: str
    column: str
    value: str
    fix: str

    def __str__(self) -> str:
        return f"task {self.task}: {self.column} {self.value}: {self.fix}"


@dataclass
class Checked:
    """The outcome of checking every row: problems, merged duplicates, and ids that changed."""

    rows: int = 0
    problems: list[Problem] = field(default_factory=list)
    renamed: dict[str, str] = field(default_factory=dict)
    merged: int = 0
    # Rows carried over with a value other than the one stored (beyond date-times and NULL counters).
    transformed: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self, shown: int = 20) -> str:
        lines = [str(problem) for problem in self.problems[:shown]]
        if len(self.problems) > shown:
            lines.append(f"... and {len(self.problems) - shown} more")
        return "\n".join(lines)


def _shown(value: object) -> str:
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            return f"{value[:SHOWN]!r} (not UTF-8)"
    text = repr(value)
    return text if len(text) <= SHOWN else text[: SHOWN - 3] + "..."


def _text(raw: object) -> str | None:
    """Raw SQLite value as text, or None when it is not UTF-8 text (numbers become their text)."""
    if raw is None:
        return None
    if isinstance(raw, bytes):
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return None
    return str(raw)


def new_uuid(old: str) -> str:
    """The canonical uuid an old id is carried over as."""
    try:
        return str(uuid.UUID(old.strip()))
    except ValueError:
        return str(uuid.uuid5(LEGACY_NAMESPACE, old))


class RowChecker:
    """Turns raw rows (values as SQLite holds them, text as bytes) into today's values, collecting problems."""

    def __init__(self, present: Sequence[str]) -> None:
        self.present = tuple(present)
        self.checked = Checked()
        self._changed = False
        # uuid -> (the id it came from, a fingerprint of its values): enough to tell true duplicates.
        self._first_seen: dict[str, tuple[str, int]] = {}

    def row(self, raw: dict[str, Any]) -> dict[str, Any] | None:
        """Today's values for one raw row, or None when it has a problem or merges into an earlier row."""
        self.checked.rows += 1
        problems = self.checked.problems
        before = len(problems)
        old_id = _text(raw.get("uuid"))
        label = old_id if old_id is not None else _shown(raw.get("uuid"))
        self._changed = False
        if old_id is None or not old_id.strip():
            problems.append(Problem(label, "uuid", _shown(raw.get("uuid")), "give the row a uuid (or delete it)"))
            return None
        key = new_uuid(old_id)
        values: dict[str, Any] = {"uuid": key}
        for name in COLUMNS:
            if name in ("uuid", "updated_at"):
                continue
            values[name] = self._value(label, name, raw.get(name) if name in self.present else None)
        updated = self._value(label, "updated_at", raw.get("updated_at")) if "updated_at" in self.present else None
        values["updated_at"] = updated or next((values[name] for name in UPDATED_FALLBACK if values.get(name)), None)
        if len(problems) > before:
            return None
        if key != old_id:
            self.checked.renamed[old_id] = key
        if key != old_id or self._changed:
            self.checked.transformed += 1
        fingerprint = hash(tuple(values[name] for name in COLUMNS))
        earlier = self._first_seen.get(key)
        if earlier is not None:
            if earlier[1] == fingerprint:
                self.checked.merged += 1
                return None
            problems.append(
                Problem(
                    label,
                    "uuid",
                    f"{old_id!r} (the same task as {earlier[0]!r}, with other values)",
                    "delete or correct one of the two rows",
                )
            )
            return None
        self._first_seen[key] = (old_id, fingerprint)
        return values

    def _value(self, task: str, name: str, raw: object) -> Any:
        if name in DATETIMES:
            return self._datetime(task, name, raw)
        if name in INTEGERS:
            return self._integer(task, name, raw)
        if name == "status":
            return self._status(task, raw)
        return self._string(task, name, raw)

    def _refuse(self, task: str, name: str, raw: object, fix: str, described: str | None = None) -> None:
        self.checked.problems.append(Problem(task, name, described or _shown(raw), fix))

    def _datetime(self, task: str, name: str, raw: object) -> datetime | None:
        text = _text(raw)
        if raw is None or (text is not None and not text.strip() and name != "created_at"):
            if name == "created_at":
                self._refuse(task, name, raw, "set the time the task was created (ISO-8601)")
            return None
        try:
            if text is None or not text[:1].isdigit():
                raise ValueError(text)
            return parse_stored_datetime(text.strip()).astimezone(UTC)
        except (ValueError, OverflowError):
            self._refuse(task, name, raw, "write it as an ISO-8601 date-time, e.g. 2025-11-30T12:34:56+00:00")
            return None

    def _integer(self, task: str, name: str, raw: object) -> int | None:
        if raw is None:
            return 0 if name in COUNTER_COLUMNS else None
        number: object = raw
        if isinstance(raw, bytes):
            text = _text(raw)
            try:
                number = int(text.strip()) if text is not None else None
            except ValueError:
                number = None
        elif isinstance(raw, float) and math.isfinite(raw) and raw.is_integer():
            number = int(raw)
        self._changed |= number is not raw
        low = 0 if name in COUNTER_COLUMNS else INT_MIN
        if isinstance(number, int) and not isinstance(number, bool) and low <= number <= INT_MAX:
            return number
        self._refuse(task, name, raw, f"make it a whole number in {low}..{INT_MAX}")
        return None

    def _status(self, task: str, raw: object) -> str | None:
        text = _text(raw)
        status = STATUS_BY_LOWER.get(text.strip().lower()) if text is not None else None
        self._changed |= status != text
        if status is None:
            allowed = ", ".join(STATUS_BY_LOWER)
            self._refuse(task, "status", raw, f"set one of {allowed} with an UPDATE of the old file")
        return status

    def _string(self, task: str, name: str, raw: object) -> str | None:
        if raw is None:
            if name in REQUIRED_TEXT:
                self._refuse(task, name, raw, "give it a value ('' for an empty one)")
            return None
        text = _text(raw)
        if text is None:
            self._refuse(task, name, raw, "the text is not UTF-8: correct it (or set it to NULL)")
            return None
        stored = storable_text(text)
        self._changed |= stored != text or not isinstance(raw, bytes)
        text = stored
        limit = LENGTHS.get(name)
        if limit is not None and len(text) > limit:
            self._refuse(task, name, raw, f"shorten it to at most {limit}", f"of {len(text)} characters")
            return None
        return text


def raw_rows(connection: sqlite3.Connection, present: Sequence[str], batch: int = 10_000) -> Iterator[dict[str, Any]]:
    """The rows of `tasks` with every value as SQLite holds it (text as bytes)."""
    previous = connection.text_factory
    connection.text_factory = bytes
    try:
        names = ", ".join(f'"{name}"' for name in present)
        cursor = connection.execute(f"SELECT {names} FROM tasks")  # noqa: S608
        while rows := cursor.fetchmany(batch):
            for row in rows:
                yield dict(zip(present, row, strict=True))
    finally:
        connection.text_factory = previous


def check_all(connection: sqlite3.Connection, present: Sequence[str]) -> Checked:
    """Check every row (nothing is kept but the outcome)."""
    checker = RowChecker(present)
    for raw in raw_rows(connection, present):
        checker.row(raw)
    return checker.checked


def carried_rows(
    connection: sqlite3.Connection, present: Sequence[str], batch: int = 10_000
) -> Iterator[list[dict[str, Any]]]:
    """The rows as they will be stored, a batch at a time; `check_all` must have found no problem."""
    checker = RowChecker(present)
    rows: list[dict[str, Any]] = []
    for raw in raw_rows(connection, present, batch):
        row = checker.row(raw)
        if checker.checked.problems:
            raise ValueError(f"the tasks table changed while it was copied: {checker.checked.problems[0]}")
        if row is not None:
            rows.append(row)
            if len(rows) == batch:
                yield rows
                rows = []
    if rows:
        yield rows
