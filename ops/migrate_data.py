"""Copy every task from a SQLite tasks.db (pre-SQLAlchemy or current layout) into the configured database.

Everything happens in one transaction, verified before COMMIT; any difference rolls it all back, so nothing
is ever half-copied:

1. the source's rows arrive in a staging table (or, on PostgreSQL, straight into an empty `tasks`) and their
   row count and per-column aggregates must equal the source's;
2. they are merged by uuid: a task already in the target is skipped, or with `overwrite` replaced, unless the
   target's row was updated later (kept unless `overwrite_newer`); so a re-run copies nothing twice;
3. every merged row must then be in the target exactly as in the staging table, and a skipped one identical.

PostgreSQL is fed with one COPY, formatted by SQLite and streamed from a second thread; a third thread reads
the source's figures for the verification meanwhile.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import Column, Connection, MetaData, Table, insert, select

from db.connection import DatabaseConnection
from db.legacy_rows import COLUMNS, DATETIMES, INTEGERS
from db.models import Task, UsageBucket
from db.models.types import parse_stored_datetime
from db.schema import schema_state, upgrade_schema
from ops.migrate_data_source import STRINGS, Aggregates, DataMigrationError, TaskSource

logger = logging.getLogger(__name__)

STAGING = "migrate_staging"
KEPT = "migrate_kept"
MAX_BATCH = 1_000_000
_STAGING_TABLE = Table(STAGING, MetaData(), *(Column(column.key, column.type) for column in Task.__table__.columns))
_NAMES = ", ".join(f'"{name}"' for name in COLUMNS)

__all__ = ["DataMigrationError", "MigrationReport", "migrate_data"]


@dataclass
class MigrationReport:
    """What a copy did, or would do (`dry_run`): rows new to the target, skipped, overwritten, kept as newer."""

    source: str
    source_rows: int = 0
    copied: int = 0
    skipped: int = 0
    overwritten: int = 0
    kept_newer: int = 0
    renamed: dict[str, str] = field(default_factory=dict)
    merged: int = 0
    dry_run: bool = False
    seconds: float = 0.0
    differences: list[str] = field(default_factory=list)
    usage_buckets: int = 0

    @property
    def rows_per_second(self) -> float:
        return self.source_rows / self.seconds if self.seconds else 0.0


def migrate_data(
    source: str,
    target: DatabaseConnection,
    *,
    overwrite: bool = False,
    overwrite_newer: bool = False,
    dry_run: bool = False,
    batch_size: int = 10_000,
    progress: Callable[[int], None] | None = None,
    leave_behind: Sequence[str] = (),
) -> MigrationReport:
    """Copy the tasks of `source` into `target`; see the module docstring.

    `overwrite`: a task already in the target is replaced by the source's, unless the target's row was
    updated later (`updated_at`), which is kept and counted; `overwrite_newer` replaces those too.
    Every value of every source row is checked first (dry runs too); columns of the source the target does
    not keep are refused unless named in `leave_behind`.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= MAX_BATCH:
        raise ValueError(f"batch_size must be an integer in 1..{MAX_BATCH}")
    if overwrite_newer and not overwrite:
        raise ValueError("overwrite_newer needs overwrite")
    tasks = TaskSource(source, leave_behind)
    try:
        checked = tasks.check()
        buckets = tasks.usage_buckets() or {}
        database = target.config.sqlalchemy_url.database
        if target.config.backend == "sqlite" and database and database != ":memory:" and tasks.is_same_file(database):
            raise DataMigrationError(f"the source {tasks.path} is the configured database itself: nothing to copy")
        report = MigrationReport(
            source=str(tasks.path), dry_run=dry_run, renamed=dict(checked.renamed), merged=checked.merged
        )
        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="migrate-data-verify") as pool:
            expected = pool.submit(tasks.aggregates)
            if dry_run and not schema_state(target).at_head:
                # No schema to compare against: every row is read and checked, and would be copied.
                report.source_rows = report.copied = expected.result().rows
                if progress is not None:
                    progress(report.source_rows)
            else:
                if not dry_run:
                    upgrade_schema(target)
                merge = _Merge(overwrite=overwrite, overwrite_newer=overwrite_newer)
                _copy(target, tasks, buckets, expected, report, merge, batch_size=batch_size, progress=progress)
        report.seconds = time.perf_counter() - started
        return report
    finally:
        tasks.close()


@dataclass(frozen=True)
class _Merge:
    overwrite: bool
    overwrite_newer: bool


def _copy(
    target: DatabaseConnection,
    tasks: TaskSource,
    buckets: dict[tuple[str | None, datetime], int],
    expected: Future[Aggregates],
    report: MigrationReport,
    merge: _Merge,
    *,
    batch_size: int,
    progress: Callable[[int], None] | None,
) -> None:
    with target.engine.connect() as connection, connection.begin() as transaction:
        postgresql = connection.dialect.name == "postgresql"
        # In the copy's transaction, before the tasks: refused, or cut short, the tasks are not copied either.
        report.usage_buckets = _carry_buckets(connection, buckets, str(tasks.path))
        direct = postgresql and not report.dry_run and _table_is_empty(connection)
        try:
            if direct:
                _copy_in(connection, "tasks", tasks.copy_chunks(batch_size), progress, batch_size)
            else:
                _create_staging(connection)
                if postgresql:
                    _copy_in(connection, STAGING, tasks.copy_chunks(batch_size), progress, batch_size)
                else:
                    for rows in tasks.rows(batch_size):
                        connection.execute(_STAGING_TABLE.insert(), rows)
                        if progress is not None:
                            progress(len(rows))
        except Exception:
            expected.result()  # an unreadable source value is the clearer error: raised here if there is one
            raise
        source = expected.result()
        report.source_rows = source.rows
        # The copy itself first: what arrived in the target's types must be what the source holds.
        report.differences = source.differences(_aggregates(connection, "tasks" if direct else STAGING))
        _refuse_if_pruned_meanwhile(tasks, buckets)
        if not direct:
            present, kept = _mark_kept(connection, merge)
            report.kept_newer = kept
            report.overwritten = present - kept if merge.overwrite else 0
            report.skipped = 0 if merge.overwrite else present
            report.copied = source.rows - present
        else:
            report.copied = source.rows
        if report.dry_run:
            transaction.rollback()
            return
        if not direct and not report.differences:
            _merge(connection, merge.overwrite)
            report.differences = _rows_not_as_copied(connection)
        if report.differences:
            transaction.rollback()


def _refuse_if_pruned_meanwhile(tasks: TaskSource, buckets: dict[tuple[str | None, datetime], int]) -> None:
    """The buckets read first must still be the source's: pruned meanwhile, the tasks read may miss some whose
    usage the buckets read did not hold yet."""
    if (tasks.usage_buckets() or {}) != buckets:
        raise DataMigrationError(
            f"{tasks.path} was pruned while it was being copied; nothing was copied. Copy it while nothing prunes it"
        )


def _carry_buckets(connection: Connection, buckets: dict[tuple[str | None, datetime], int], source: str) -> int:
    """The usage of pruned tasks, only where a copy cannot count a token twice: into a target that has no task
    and no usage of pruned tasks. Buckets hold sums, not tasks, so nothing tells which tasks a target's buckets
    stand for: a target with buckets is refused (the copy could bring back tasks it pruned, beside their
    usage), and so is a pruned source into a target that holds tasks (they may be ones the source pruned)."""
    if connection.execute(select(UsageBucket.id).limit(1)).first() is not None:
        raise DataMigrationError(
            "the target holds usage of pruned tasks (tasks prune): a copy into it could bring pruned tasks back "
            "and count their tokens twice, so nothing was copied. Copy into a database that was never pruned, "
            "and prune after"
        )
    if not buckets:
        return 0
    if not _table_is_empty(connection):
        raise DataMigrationError(
            f"{source} has pruned tasks (tasks prune) and the target already holds tasks, which may be the pruned "
            "ones: their tokens could count twice, so nothing was copied. Copy it into an empty database"
        )
    rows = [{"user": user, "bucket_start": start, "tokens": tokens} for (user, start), tokens in buckets.items()]
    for first in range(0, len(rows), 10_000):
        connection.execute(insert(UsageBucket), rows[first : first + 10_000])
    return len(rows)


def _table_is_empty(connection: Connection) -> bool:
    return bool(connection.exec_driver_sql("SELECT NOT EXISTS (SELECT 1 FROM tasks)").scalar_one())


def _create_staging(connection: Connection) -> None:
    if connection.dialect.name == "postgresql":
        connection.exec_driver_sql(f"CREATE TEMP TABLE {STAGING} (LIKE tasks INCLUDING DEFAULTS) ON COMMIT DROP")
    else:
        connection.exec_driver_sql(f"DROP TABLE IF EXISTS temp.{STAGING}")
        connection.exec_driver_sql(f"CREATE TEMP TABLE {STAGING} AS SELECT * FROM tasks WHERE 0")  # noqa: S608


class _QueuedText:
    """A file-like object for COPY ... FROM STDIN whose text another thread produces."""

    def __init__(self, chunks: queue.Queue[str | None]) -> None:
        self._chunks = chunks

    def read(self, _size: int = -1) -> str:
        return self._chunks.get() or ""


def _copy_in(
    connection: Connection,
    table: str,
    chunks: Iterator[str],
    progress: Callable[[int], None] | None,
    batch_size: int,
) -> None:
    """COPY the chunks into `table`, reading the next chunk in a second thread while the server works."""
    pending: queue.Queue[str | None] = queue.Queue(maxsize=4)
    stop = threading.Event()
    failure: list[BaseException] = []

    def produce() -> None:
        try:
            for chunk in chunks:
                while not stop.is_set():
                    try:
                        pending.put(chunk, timeout=0.2)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
                if progress is not None:
                    progress(min(batch_size, chunk.count("\n")))
        except BaseException as exc:
            failure.append(exc)
        finally:
            pending.put(None)

    producer = threading.Thread(target=produce, name="migrate-data-reader", daemon=True)
    producer.start()
    cursor = connection.connection.driver_connection.cursor()  # type: ignore[union-attr]
    try:
        cursor.copy_expert(f"COPY {table} ({_NAMES}) FROM STDIN (FORMAT csv)", _QueuedText(pending), size=1 << 20)
    finally:
        stop.set()
        producer.join()
    if failure:
        raise failure[0]


def _mark_kept(connection: Connection, merge: _Merge) -> tuple[int, int]:
    """Fill the table of target rows the merge leaves alone; return (rows present, rows kept as newer)."""
    if connection.dialect.name == "postgresql":
        connection.exec_driver_sql(f"CREATE TEMP TABLE {KEPT} (uuid uuid) ON COMMIT DROP")
    else:
        connection.exec_driver_sql(f"DROP TABLE IF EXISTS temp.{KEPT}")
        connection.exec_driver_sql(f"CREATE TEMP TABLE {KEPT} (uuid TEXT)")
    present = int(
        connection.exec_driver_sql(f"SELECT count(*) FROM {STAGING} s JOIN tasks t ON t.uuid = s.uuid").scalar_one()  # noqa: S608
    )
    if not merge.overwrite or merge.overwrite_newer:
        return present, 0
    connection.exec_driver_sql(
        f"INSERT INTO {KEPT} SELECT s.uuid FROM {STAGING} s JOIN tasks t ON t.uuid = s.uuid "  # noqa: S608
        "WHERE t.updated_at > s.updated_at"
    )
    return present, int(connection.exec_driver_sql(f"SELECT count(*) FROM {KEPT}").scalar_one())  # noqa: S608


def _merge(connection: Connection, overwrite: bool) -> None:
    if overwrite:
        updates = ", ".join(f'"{name}" = excluded."{name}"' for name in COLUMNS if name != "uuid")
        conflict = f"DO UPDATE SET {updates}"
    else:
        conflict = "DO NOTHING"
    connection.exec_driver_sql(
        f"INSERT INTO tasks ({_NAMES}) SELECT {_NAMES} FROM {STAGING} "  # noqa: S608
        f"WHERE uuid NOT IN (SELECT uuid FROM {KEPT}) ON CONFLICT (uuid) {conflict}"
    )


def _rows_not_as_copied(connection: Connection, shown: int = 20) -> list[str]:
    """Every source row the merge did not leave alone must now be in the target exactly; name those that
    are not (a task skipped because it was already there, but differently)."""
    same = " AND ".join(f't."{name}" IS NOT DISTINCT FROM s."{name}"' for name in COLUMNS)
    names = ", ".join(f's."{name}"' for name in COLUMNS) + ", " + ", ".join(f't."{name}"' for name in COLUMNS)
    rows = connection.exec_driver_sql(
        f"SELECT {names} FROM {STAGING} s JOIN tasks t ON t.uuid = s.uuid "  # noqa: S608
        f"WHERE s.uuid NOT IN (SELECT uuid FROM {KEPT}) AND NOT ({same}) LIMIT {shown}"
    ).all()
    found = []
    for row in rows:
        mine, theirs = row[: len(COLUMNS)], row[len(COLUMNS) :]
        columns = [name for name, a, b in zip(COLUMNS, mine, theirs, strict=True) if a != b]
        found.append(f"task {mine[0]}: already in the target with another {', '.join(columns)}")
    return found


def _aggregates(connection: Connection, table: str) -> Aggregates:
    parts = ["count(*)"]
    parts += [f'count(t."{name}")' for name in COLUMNS]
    parts += [f'coalesce(sum(t."{name}"), 0)' for name in INTEGERS]
    parts += [f'coalesce(sum(length(t."{name}")), 0)' for name in STRINGS]
    parts += [f'min(t."{name}")' for name in DATETIMES] + [f'max(t."{name}")' for name in DATETIMES]
    values = list(connection.exec_driver_sql(f"SELECT {', '.join(parts)} FROM {table} t").one())  # noqa: S608
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
