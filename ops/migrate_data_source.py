"""A SQLite tasks.db as the source of a data migration: opened read-only, checked, read, summarised.

Every value is checked and carried over by db/legacy_rows.py, exactly as the in-place upgrade does; when no
row needs more than date-times and NULL counters normalised, PostgreSQL's COPY input is formatted by SQLite.
"""

from __future__ import annotations

import csv
import fcntl
import io
import os
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, inspect
from sqlalchemy.engine import make_url
from sqlalchemy.pool import QueuePool

from db.errors import DatabaseError
from db.legacy_rows import (
    COLUMNS,
    DATETIMES,
    INTEGERS,
    LENGTHS,
    UPDATED_FALLBACK,
    Checked,
    carried_rows,
    check_all,
)
from db.models import COUNTER_COLUMNS, bucket_start
from db.models.task import storable_text
from db.models.types import parse_stored_datetime
from db.unit_of_work import is_sqlite_busy
from private_files import connect_sqlite

BUCKETS = "token_usage_buckets"
BUCKETS_KIND = "SELECT type FROM sqlite_master WHERE lower(name) = 'token_usage_buckets'"
BUCKET_COLUMNS = ("id", "user", "bucket_start", "tokens")
# All buckets together: a quarter of what a sum can hold, so that adding every task's tokens to them (each at
# most 2**31 - 1) cannot overflow a 64-bit sum.
MAX_BUCKET_TOKENS = 2**61
EARLIEST_BUCKET = datetime(1970, 1, 1, tzinfo=UTC)
LATEST_BUCKET = datetime(9999, 1, 1, tzinfo=UTC)
REQUIRED = ("uuid", "task_source", "owner", "repo", "task_type", "task_id", "status", "created_at")
STRINGS = (*LENGTHS, "error_message")


class DataMigrationError(DatabaseError):
    """The source cannot be copied; nothing was written."""


@dataclass
class Aggregates:
    """Row count and, per column, non-null count and a sum (numbers, string lengths) or min/max (date-times)."""

    rows: int = 0
    non_null: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COLUMNS, 0))
    sums: dict[str, int] = field(default_factory=lambda: dict.fromkeys((*INTEGERS, *STRINGS), 0))
    earliest: dict[str, datetime | None] = field(default_factory=lambda: dict.fromkeys(DATETIMES, None))
    latest: dict[str, datetime | None] = field(default_factory=lambda: dict.fromkeys(DATETIMES, None))

    def differences(self, other: Aggregates) -> list[str]:
        """What differs from `other`, one line per figure; empty when they agree."""
        found = [] if self.rows == other.rows else [f"rows: source {self.rows}, target {other.rows}"]
        for label, mine, theirs in (
            ("non-null", self.non_null, other.non_null),
            ("sum", self.sums, other.sums),
            ("min", self.earliest, other.earliest),
            ("max", self.latest, other.latest),
        ):
            found.extend(
                f"{name} {label}: source {mine[name]}, target {theirs[name]}"
                for name in mine
                if mine[name] != theirs[name]
            )
        return found


_BUSY = (
    "{path} is busy: another process is writing it (an agent still running on it?); try again in a moment, "
    "or once it has stopped"
)


# SQLite's RESERVED lock: a byte a writer locks for as long as its write transaction lasts.
_RESERVED_BYTE = 0x40000001


def _being_written(path: Path) -> bool:
    """Whether a live writer holds the file's RESERVED lock (its journal then is its own, not left by a crash).
    Checked before this process opens the file in SQLite, whose POSIX locks closing this descriptor would drop."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.lockf(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB, 1, _RESERVED_BYTE)
    except OSError:
        return True
    else:
        fcntl.lockf(descriptor, fcntl.LOCK_UN, 1, _RESERVED_BYTE)
        return False
    finally:
        os.close(descriptor)


def _quoted(name: str) -> str:
    return f'"{name}"'


class TaskSource:
    """The tasks table of a SQLite file named by a path or a sqlite:/// URL, never written to."""

    def __init__(self, source: str, leave_behind: Sequence[str] = ()) -> None:
        self.path = path = _source_path(source)
        self.leave_behind = frozenset(leave_behind)
        journal = path.with_name(path.name + "-journal")
        if journal.is_file() and journal.stat().st_size > 0 and not _being_written(path):
            raise DataMigrationError(
                f"{path} has an unfinished write ({journal.name} beside it): open it once with sqlite3 where it can be "
                "written (or copy it together with its journal to such a place), then copy from there"
            )
        self.checked: Checked | None = None

        def connect() -> sqlite3.Connection:
            # Read from worker threads too, one thread per connection at a time.
            return connect_sqlite(path, read_only=True, check_same_thread=False)

        self.engine: Engine = create_engine("sqlite://", creator=connect, poolclass=QueuePool)
        try:
            self.columns = self._columns()
        except BaseException:
            self.engine.dispose()
            raise

    def close(self) -> None:
        self.engine.dispose()

    def is_same_file(self, other: str | os.PathLike[str]) -> bool:
        return Path(other).exists() and os.path.samefile(other, self.path)

    def _columns(self) -> set[str]:
        try:
            inspector = inspect(self.engine)
            columns = (
                {column["name"] for column in inspector.get_columns("tasks")} if inspector.has_table("tasks") else set()
            )
        except Exception as exc:
            if is_sqlite_busy(exc):
                raise DataMigrationError(_BUSY.format(path=self.path)) from None
            raise DataMigrationError(f"{self.path} is not a SQLite database") from None
        missing = [name for name in REQUIRED if name not in columns]
        if missing:
            raise DataMigrationError(
                f"{self.path} is not a task database: it has no tasks table with the columns {', '.join(missing)}"
            )
        extra = sorted(columns - set(COLUMNS) - self.leave_behind)
        if extra:
            raise DataMigrationError(
                f"{self.path}: the tasks table has columns the target does not keep: {', '.join(extra)}; their data "
                f"would be lost. Keep it elsewhere first, then leave them behind with "
                f"{' '.join(f'--leave-behind {name}' for name in extra)}"
            )
        return columns & set(COLUMNS)

    def check(self) -> Checked:
        """Check every value of every row (db/legacy_rows.py); raise naming every one that cannot be carried."""
        raw = self.engine.raw_connection()
        try:
            driver = raw.driver_connection
            assert isinstance(driver, sqlite3.Connection)
            checked = check_all(driver, self._present_columns())
        except sqlite3.OperationalError as exc:
            if is_sqlite_busy(exc):
                raise DataMigrationError(_BUSY.format(path=self.path)) from None
            raise
        finally:
            raw.close()
        if not checked.ok:
            raise DataMigrationError(
                f"{len(checked.problems)} values of {self.path} cannot be carried over; nothing was written:\n"
                + checked.summary()
            )
        self.checked = checked
        return checked

    @property
    def reshaped(self) -> bool:
        """Whether some rows are carried with other values than stored (ids, case, merged duplicates)."""
        return self.checked is not None and bool(self.checked.transformed or self.checked.merged)

    def _present_columns(self) -> list[str]:
        return [name for name in COLUMNS if name in self.columns]

    def _carried(self, batch_size: int) -> Iterator[list[dict[str, Any]]]:
        raw = self.engine.raw_connection()
        try:
            driver = raw.driver_connection
            assert isinstance(driver, sqlite3.Connection)
            yield from carried_rows(driver, self._present_columns(), batch_size)
        finally:
            raw.close()

    def _query(self, sql: str, batch_size: int = 10_000) -> Iterator[Sequence[Any]]:
        raw = self.engine.raw_connection()
        try:
            cursor = raw.cursor()
            cursor.execute(sql)
            while rows := cursor.fetchmany(batch_size):
                yield rows
        finally:
            raw.close()

    def _first(self, sql: str) -> tuple[Any, ...] | None:
        for rows in self._query(sql, 1):
            return tuple(rows[0])
        return None

    def usage_buckets(self) -> dict[tuple[str | None, datetime], int] | None:
        """The tokens of the source's pruned tasks by user and bucket (None for a file made before buckets), each
        value checked, read a batch at a time; DataMigrationError naming the first that cannot be carried."""
        try:
            kinds = [row[0] for rows in self._query(BUCKETS_KIND) for row in rows]
            if not kinds:
                return None
            if kinds != ["table"]:
                raise DataMigrationError(f"{self.path}: its {BUCKETS} is not a table; nothing was written")
            columns = sorted(row[1] for rows in self._query(f"PRAGMA table_info({BUCKETS})") for row in rows)
            if columns != sorted(BUCKET_COLUMNS):
                raise DataMigrationError(
                    f"{self.path}: its {BUCKETS} table has the columns {', '.join(columns)[:200]}, not "
                    f"{', '.join(sorted(BUCKET_COLUMNS))}; nothing was written"
                )
            sums: dict[tuple[str | None, datetime], int] = {}
            total = 0
            for rows in self._query(f'SELECT "user", bucket_start, tokens FROM {BUCKETS}'):  # noqa: S608
                for user, start, tokens in rows:
                    key = (_bucket_user(user, self.path), _bucket_start(start, self.path))
                    if isinstance(tokens, bool) or not isinstance(tokens, int) or not 0 <= tokens <= MAX_BUCKET_TOKENS:
                        raise DataMigrationError(f"{self.path}: a usage bucket holds {str(tokens)[:40]!r} tokens")
                    total += tokens
                    if total > MAX_BUCKET_TOKENS:
                        raise DataMigrationError(
                            f"{self.path}: its usage buckets hold more than {MAX_BUCKET_TOKENS:,} tokens in all"
                        )
                    sums[key] = sums.get(key, 0) + tokens
        except DataMigrationError:
            raise
        except Exception as exc:
            if is_sqlite_busy(exc):
                raise DataMigrationError(_BUSY.format(path=self.path)) from None
            raise DataMigrationError(f"{self.path}: its {BUCKETS} table cannot be read") from None
        return sums

    def rows(self, batch_size: int) -> Iterator[list[dict[str, Any]]]:
        """The rows as they will be stored (every model column), a batch at a time; `check` comes first."""
        yield from self._carried(batch_size)

    def copy_chunks(self, batch_size: int) -> Iterator[str]:
        """The normalised rows as CSV for `COPY ... (FORMAT csv)`, formatted by SQLite itself.

        In that CSV an unquoted empty field is NULL and every text value is quoted, so "" is an empty string.
        Rows carried with other values than stored are formatted here instead, from `rows`.
        """
        if self.reshaped:
            for batch in self.rows(batch_size):
                yield _csv(batch)
            return
        naive = self._naive_datetime_columns()
        line = " || ',' || ".join(self._copy_field(name, naive) for name in COLUMNS)
        for rows in self._query(f"SELECT {line} FROM tasks", batch_size):  # noqa: S608
            yield "\n".join(row[0] for row in rows) + "\n"

    def _naive_datetime_columns(self) -> set[str]:
        """Date-time columns holding text without an offset, found in one scan (the others go out as they are)."""
        present = [name for name in DATETIMES if name in self.columns]
        checks = [f"coalesce(max({_quoted(name)} IS NOT NULL AND NOT ({_has_offset(name)})), 0)" for name in present]
        flags = self._first(f"SELECT {', '.join(checks)} FROM tasks")  # noqa: S608
        assert flags is not None
        return {name for name, flag in zip(present, flags, strict=True) if flag}

    def _copy_field(self, name: str, naive: set[str]) -> str:
        if name == "updated_at":
            sources = [column for column in ("updated_at", *UPDATED_FALLBACK) if column in self.columns]
            return f"coalesce({', '.join(_copy_datetime(column, column in naive) for column in sources)})"
        if name not in self.columns:
            return "'0'" if name in COUNTER_COLUMNS else "''"
        quoted = _quoted(name)
        if name in COUNTER_COLUMNS:
            return f"CAST(coalesce({quoted}, 0) AS TEXT)"
        if name in DATETIMES:
            return f"coalesce({_copy_datetime(name, name in naive)}, '')"
        if name in INTEGERS:
            return f"coalesce(CAST({quoted} AS TEXT), '')"
        return f"""coalesce('"' || replace(CAST({quoted} AS TEXT), '"', '""') || '"', '')"""

    def aggregates(self) -> Aggregates:
        if self.reshaped:
            return _aggregate(row for rows in self.rows(20_000) for row in rows)
        return self._source_aggregates()

    def _source_aggregates(self) -> Aggregates:
        """The figures verification compares, from one scan of the source.

        Values the schema would refuse were named by `check` before. Date-time columns whose text is all
        canonical UTC sort as text; the others are parsed in Python.
        """
        figures: dict[str, str] = {"rows": "count(*)"}
        for name in COLUMNS:
            always = name in COUNTER_COLUMNS or name == "updated_at"
            figures[f"non_null {name}"] = "count(*)" if always else self._present(f"count({_quoted(name)})", name)
        for name in INTEGERS:
            figures[f"sum {name}"] = self._present(f"coalesce(sum({_quoted(name)}), 0)", name)
        for name in STRINGS:
            figures[f"sum {name}"] = self._present(f"coalesce(sum(length({_quoted(name)})), 0)", name)
        for name in DATETIMES:
            expression = self._datetime_expression(name)
            figures[f"min {name}"] = f"min({expression})"
            figures[f"max {name}"] = f"max({expression})"
            figures[f"odd {name}"] = f"coalesce(sum({expression} IS NOT NULL AND NOT ({_canonical(expression)})), 0)"
        row = self._first(f"SELECT {', '.join(figures.values())} FROM tasks")  # noqa: S608
        assert row is not None
        values = dict(zip(figures, row, strict=True))
        result = Aggregates(rows=int(values["rows"]))
        for name in COLUMNS:
            result.non_null[name] = int(values[f"non_null {name}"])
        for name in (*INTEGERS, *STRINGS):
            result.sums[name] = int(values[f"sum {name}"])
        odd = {name for name in DATETIMES if values[f"odd {name}"]}
        for name in set(DATETIMES) - odd:
            result.earliest[name] = _instant(None, name, values[f"min {name}"])
            result.latest[name] = _instant(None, name, values[f"max {name}"])
        if odd:
            self._datetime_extremes(result, odd)
        return result

    def _present(self, expression: str, name: str | None = None) -> str:
        return expression if name is None or name in self.columns else "0"

    def _datetime_expression(self, name: str) -> str:
        if name == "updated_at":
            sources = [column for column in ("updated_at", *UPDATED_FALLBACK) if column in self.columns]
            return f"coalesce({', '.join(map(_quoted, sources))})"
        return _quoted(name) if name in self.columns else "NULL"

    def _datetime_extremes(self, result: Aggregates, names: set[str]) -> None:
        present = [name for name in DATETIMES if name in self.columns]
        sql = f"SELECT uuid, {', '.join(map(_quoted, present))} FROM tasks"  # noqa: S608
        for rows in self._query(sql, 20_000):
            for uuid, *stamps in rows:
                values: dict[str, datetime | None] = {
                    name: _instant(uuid, name, value) for name, value in zip(present, stamps, strict=True)
                }
                if values.get("updated_at") is None:
                    values["updated_at"] = next((values[name] for name in UPDATED_FALLBACK if values.get(name)), None)
                for name in names:
                    value = values.get(name)
                    if value is not None:
                        low, high = result.earliest[name], result.latest[name]
                        if low is None or value < low:
                            result.earliest[name] = value
                        if high is None or value > high:
                            result.latest[name] = value


def _bucket_user(user: object, path: Path) -> str | None:
    if user is None:
        return None
    stored = storable_text(user) if isinstance(user, str) else None
    if stored is None or len(stored) > LENGTHS["user"]:
        raise DataMigrationError(f"{path}: a usage bucket's user is not a name of at most {LENGTHS['user']} characters")
    return stored


def _bucket_start(value: object, path: Path) -> datetime:
    try:
        moment = parse_stored_datetime(value) if isinstance(value, str) else None
    except ValueError:
        moment = None
    if moment is None or bucket_start(moment) != moment or not EARLIEST_BUCKET <= moment < LATEST_BUCKET:
        shown = str(value)[:40]
        raise DataMigrationError(f"{path}: a usage bucket starts at {shown!r}, not at a quarter hour since 1970")
    return moment


def _canonical(expression: str) -> str:
    """True for the fixed-width UTC text `YYYY-MM-DDTHH:MM:SS[.ffffff]+00:00`, whose text order is time order."""
    return (
        f"length({expression}) IN (25, 32) AND substr({expression}, 11, 1) = 'T' "
        f"AND substr({expression}, -6) = '+00:00'"
    )


def _has_offset(name: str) -> str:
    """True for text ending in +HH:MM, -HH:MM, +HHMM, -HHMM or Z (checked from the end: no scanning)."""
    quoted = _quoted(name)
    return (
        f"(substr({quoted}, -6, 1) IN ('+', '-') AND substr({quoted}, -3, 1) = ':') "
        f"OR (substr({quoted}, -5, 1) IN ('+', '-') AND substr({quoted}, -4) GLOB '[0-9][0-9][0-9][0-9]') "
        f"OR substr({quoted}, -1) = 'Z'"
    )


def _copy_datetime(name: str, has_naive_values: bool) -> str:
    # Text with an offset goes as it is; without one it means UTC, which PostgreSQL must be told.
    quoted = _quoted(name)
    if not has_naive_values:
        return quoted
    return f"CASE WHEN {_has_offset(name)} THEN {quoted} ELSE {quoted} || '+00:00' END"


def _source_path(source: str) -> Path:
    if "://" in source:
        try:
            url = make_url(source)
        except Exception:
            raise DataMigrationError("--from: not a valid URL (expected sqlite:///PATH or a file path)") from None
        if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
            raise DataMigrationError("--from: only SQLite files can be read (sqlite:///PATH or a file path)")
        path = Path(url.database)
    else:
        path = Path(source)
    if not path.is_file():
        raise DataMigrationError(f"--from: no such file: {path}")
    return path.resolve()


def _instant(task: object, name: str, value: object) -> datetime | None:
    if value is None:
        return None
    try:
        return parse_stored_datetime(str(value)) if str(value)[:1].isdigit() else _unreadable(task, name, value)
    except ValueError:
        return _unreadable(task, name, value)


def _unreadable(task: object, name: str, value: object) -> datetime:
    where = f"task {task}: " if task is not None else ""
    raise DataMigrationError(f"{where}{name} {value!r} is not a date-time")


def _csv(rows: list[dict[str, Any]]) -> str:
    """Rows as CSV for COPY (FORMAT csv): NULL unquoted and empty, text quoted, date-times in ISO-8601."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n", quoting=csv.QUOTE_ALL)
    for row in rows:
        writer.writerow([_csv_field(row[name]) for name in COLUMNS])
    return buffer.getvalue().replace('"\x00NULL\x00"', "")


def _csv_field(value: Any) -> str:
    if value is None:
        return "\x00NULL\x00"
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


def _aggregate(rows: Iterator[dict[str, Any]]) -> Aggregates:
    """The figures verification compares, from rows as they will be stored."""
    result = Aggregates()
    for row in rows:
        result.rows += 1
        for name in COLUMNS:
            if row[name] is not None:
                result.non_null[name] += 1
        for name in INTEGERS:
            result.sums[name] += row[name] or 0
        for name in STRINGS:
            result.sums[name] += len(row[name] or "")
        for name in DATETIMES:
            value = row[name]
            if value is not None:
                low, high = result.earliest[name], result.latest[name]
                result.earliest[name] = value if low is None or value < low else low
                result.latest[name] = value if high is None or value > high else high
    return result
