"""Copy every task from a SQLite tasks.db (pre-SQLAlchemy or current layout) into the configured database.

The source is opened read-only. Rows are normalised as the in-place upgrade does (text date-times as the same
instants, NULL counters as 0, updated_at from the latest known time), staged, and merged by uuid in one
transaction: a uuid already present is skipped (or replaced with `overwrite`), so a re-run copies nothing
twice. Before COMMIT, row counts and per-column aggregates of source and target are compared; any
difference rolls everything back. PostgreSQL targets are fed with COPY.
"""

from __future__ import annotations

import io
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Column, Connection, Engine, MetaData, Table, create_engine, inspect
from sqlalchemy.engine import URL, make_url

from db.connection import DatabaseConnection
from db.errors import DatabaseError
from db.models import COUNTER_COLUMNS, Task, TaskStatus
from db.models.types import parse_stored_datetime
from db.schema import schema_state, upgrade_schema

logger = logging.getLogger(__name__)

COLUMNS = tuple(column.key for column in Task.__table__.columns)
REQUIRED = ("uuid", "task_source", "owner", "repo", "task_type", "task_id", "status", "created_at")
DATETIMES = ("created_at", "started_at", "completed_at", "updated_at")
LENGTHS = {
    column.key: column.type.length  # type: ignore[attr-defined]
    for column in Task.__table__.columns
    if getattr(column.type, "length", None) and column.key != "uuid"
}
STRINGS = (*LENGTHS, "error_message")
INTEGERS = ("process_id", "context_length", *COUNTER_COLUMNS)
STATUSES = frozenset(status.value for status in TaskStatus)
STAGING = "migrate_staging"
_STAGING_TABLE = Table(STAGING, MetaData(), *(Column(column.key, column.type) for column in Task.__table__.columns))


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

    def add(self, row: Sequence[Any]) -> None:
        self.rows += 1
        for name, value in zip(COLUMNS, row, strict=True):
            if value is None:
                continue
            self.non_null[name] += 1
            if name in self.sums:
                self.sums[name] += value if name in INTEGERS else len(value)
            elif name in self.earliest:
                low, high = self.earliest[name], self.latest[name]
                self.earliest[name] = value if low is None or value < low else low
                self.latest[name] = value if high is None or value > high else high

    def differences(self, other: Aggregates) -> list[str]:
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


@dataclass
class MigrationReport:
    source: str
    source_rows: int = 0
    copied: int = 0
    skipped: int = 0
    overwritten: int = 0
    dry_run: bool = False
    seconds: float = 0.0
    differences: list[str] = field(default_factory=list)

    @property
    def rows_per_second(self) -> float:
        return self.source_rows / self.seconds if self.seconds else 0.0


def open_source(source: str) -> tuple[Engine, Path]:
    """A read-only engine on the SQLite file named by a path or a sqlite:/// URL."""
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
    read_only = URL.create("sqlite", database=f"file:{path.resolve()}?mode=ro", query={"uri": "true"})
    return create_engine(read_only), path.resolve()


def _source_columns(engine: Engine, path: Path) -> set[str]:
    try:
        inspector = inspect(engine)
        columns = (
            {column["name"] for column in inspector.get_columns("tasks")} if inspector.has_table("tasks") else set()
        )
    except Exception:
        raise DataMigrationError(f"{path} is not a SQLite database") from None
    missing = [name for name in REQUIRED if name not in columns]
    if missing:
        raise DataMigrationError(
            f"{path} is not a task database: it has no tasks table with the columns {', '.join(missing)}"
        )
    return columns


def _refuse_same_file(target: DatabaseConnection, path: Path) -> None:
    database = target.config.sqlalchemy_url.database
    if target.config.backend == "sqlite" and database and database != ":memory:":
        target_path = Path(database)
        if target_path.exists() and os.path.samefile(target_path, path):
            raise DataMigrationError(f"the source {path} is the configured database itself: nothing to copy")


def read_rows(engine: Engine, columns: set[str], batch_size: int) -> Iterator[list[tuple[Any, ...]]]:
    """Source rows in batches, normalised to the model's columns and types."""
    present = [name for name in COLUMNS if name in columns]
    quoted = ", ".join(f'"{name}"' for name in present)
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        cursor.execute(f"SELECT {quoted} FROM tasks")  # noqa: S608
        while batch := cursor.fetchmany(batch_size):
            yield [_normalise(dict(zip(present, row, strict=True))) for row in batch]
    finally:
        raw.close()


def _normalise(values: dict[str, Any]) -> tuple[Any, ...]:
    task = values.get("uuid")
    for name in ("created_at", "started_at", "completed_at", "updated_at"):
        stamp = values.get(name)
        if stamp is not None:
            try:
                values[name] = parse_stored_datetime(stamp)
            except (TypeError, ValueError):
                raise DataMigrationError(f"task {task}: {name} {stamp!r} is not a date-time") from None
    for name in COUNTER_COLUMNS:
        if values.get(name) is None:
            values[name] = 0
    if values.get("updated_at") is None:
        values["updated_at"] = max(
            values[name] for name in ("created_at", "started_at", "completed_at") if values.get(name) is not None
        )
    if values["status"] not in STATUSES:
        raise DataMigrationError(f"task {task}: unknown status {values['status']!r}")
    for name, limit in LENGTHS.items():
        value = values.get(name)
        if value is not None and len(value) > limit:
            raise DataMigrationError(f"task {task}: {name} is {len(value)} characters long, the column takes {limit}")
    return tuple(values.get(name) for name in COLUMNS)


def migrate_data(
    source: str,
    target: DatabaseConnection,
    *,
    overwrite: bool = False,
    dry_run: bool = False,
    batch_size: int = 10_000,
    progress: Callable[[int], None] | None = None,
) -> MigrationReport:
    """Copy the tasks of `source` into `target`; see the module docstring."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError("batch_size must be a positive integer")
    engine, path = open_source(source)
    try:
        columns = _source_columns(engine, path)
        _refuse_same_file(target, path)
        report = MigrationReport(source=str(path), dry_run=dry_run)
        started = time.perf_counter()
        expected = Aggregates()
        batches = _measured(read_rows(engine, columns, batch_size), expected, progress)
        if dry_run and not schema_state(target).at_head:
            # No schema to compare against yet: every row is read and checked, and would be copied.
            for _ in batches:
                pass
            report.copied = expected.rows
        else:
            if not dry_run:
                upgrade_schema(target)
            _copy(target, batches, expected, report, overwrite=overwrite)
        report.source_rows = expected.rows
        report.seconds = time.perf_counter() - started
        return report
    finally:
        engine.dispose()


def _measured(
    batches: Iterator[list[tuple[Any, ...]]], expected: Aggregates, progress: Callable[[int], None] | None
) -> Iterator[list[tuple[Any, ...]]]:
    for batch in batches:
        for row in batch:
            expected.add(row)
        yield batch
        if progress is not None:
            progress(len(batch))


def _copy(
    target: DatabaseConnection,
    batches: Iterator[list[tuple[Any, ...]]],
    expected: Aggregates,
    report: MigrationReport,
    *,
    overwrite: bool,
) -> None:
    with target.engine.connect() as connection, connection.begin() as transaction:
        _create_staging(connection)
        for batch in batches:
            _stage(connection, batch)
        present = _count_present(connection)
        report.overwritten = present if overwrite else 0
        report.skipped = 0 if overwrite else present
        report.copied = expected.rows - present
        if report.dry_run:
            transaction.rollback()
            return
        _merge(connection, overwrite)
        report.differences = expected.differences(_target_aggregates(connection))
        if report.differences:
            transaction.rollback()


def _create_staging(connection: Connection) -> None:
    if connection.dialect.name == "postgresql":
        connection.exec_driver_sql(f"CREATE TEMP TABLE {STAGING} (LIKE tasks INCLUDING DEFAULTS) ON COMMIT DROP")
    else:
        connection.exec_driver_sql(f"DROP TABLE IF EXISTS temp.{STAGING}")
        connection.exec_driver_sql(f"CREATE TEMP TABLE {STAGING} AS SELECT * FROM tasks WHERE 0")  # noqa: S608


def _stage(connection: Connection, batch: list[tuple[Any, ...]]) -> None:
    if connection.dialect.name == "postgresql":
        buffer = io.StringIO("".join(_copy_line(row) for row in batch))
        cursor = connection.connection.driver_connection.cursor()  # type: ignore[union-attr]
        names = ", ".join(f'"{name}"' for name in COLUMNS)
        cursor.copy_expert(f"COPY {STAGING} ({names}) FROM STDIN", buffer)
        return
    # Other backends: the model's own column types convert the values (fixed-width UTC text on SQLite).
    connection.execute(_STAGING_TABLE.insert(), [dict(zip(COLUMNS, row, strict=True)) for row in batch])


def _copy_line(row: Sequence[Any]) -> str:
    return "\t".join(_copy_value(value) for value in row) + "\n"


def _copy_value(value: Any) -> str:
    if value is None:
        return "\\N"
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, str):
        return value.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
    return str(value)


def _count_present(connection: Connection) -> int:
    statement = f"SELECT count(*) FROM {STAGING} s JOIN tasks t ON t.uuid = s.uuid"  # noqa: S608
    return int(connection.exec_driver_sql(statement).scalar_one())


def _merge(connection: Connection, overwrite: bool) -> None:
    names = ", ".join(f'"{name}"' for name in COLUMNS)
    if overwrite:
        updates = ", ".join(f'"{name}" = excluded."{name}"' for name in COLUMNS if name != "uuid")
        conflict = f"DO UPDATE SET {updates}"
    else:
        conflict = "DO NOTHING"
    # "WHERE true" lets SQLite parse the upsert after INSERT ... SELECT.
    statement = f"INSERT INTO tasks ({names}) SELECT {names} FROM {STAGING} WHERE true ON CONFLICT (uuid) {conflict}"  # noqa: S608
    connection.exec_driver_sql(statement)


def _target_aggregates(connection: Connection) -> Aggregates:
    parts = ["count(*)"]
    parts += [f'count(t."{name}")' for name in COLUMNS]
    parts += [f'coalesce(sum(t."{name}"), 0)' for name in INTEGERS]
    parts += [f'coalesce(sum(length(t."{name}")), 0)' for name in STRINGS]
    parts += [f'min(t."{name}")' for name in DATETIMES] + [f'max(t."{name}")' for name in DATETIMES]
    statement = f"SELECT {', '.join(parts)} FROM tasks t WHERE t.uuid IN (SELECT uuid FROM {STAGING})"  # noqa: S608
    values = list(connection.exec_driver_sql(statement).one())
    result = Aggregates(rows=int(values.pop(0)))
    for name in COLUMNS:
        result.non_null[name] = int(values.pop(0))
    for name in (*INTEGERS, *STRINGS):
        result.sums[name] = int(values.pop(0))
    for bucket in (result.earliest, result.latest):
        for name in DATETIMES:
            value = values.pop(0)
            bucket[name] = None if value is None else parse_stored_datetime(value)
    return result
