"""Backups: pg_dump / pg_restore (custom format) for PostgreSQL, SQLite's online backup API for SQLite files.

Connection settings reach pg_dump and pg_restore through libpq's environment variables (PGPASSWORD among
them), never through their command line, where other users of the machine could read a password.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import sqlite3
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import psycopg2
from sqlalchemy import Connection, delete, func, insert, select
from sqlalchemy.exc import DBAPIError

from db.connection import DatabaseConnection, describe_driver_error
from db.errors import DatabaseError
from db.models import Task, UsageBucket
from db.schema import known_revisions, upgrade_schema
from db.sqlite_backup import backup_engine_database, backup_path_for
from db.unit_of_work import is_sqlite_busy
from ops.migrate_data_source import MAX_BUCKET_TOKENS, DataMigrationError, TaskSource
from private_files import connect_sqlite, written_then_named

# Rows a restore inserts per statement.
RESTORE_BATCH = 1000


def find_pg_tool(name: str) -> str:
    """pg_dump or pg_restore: from PG_BINDIR, the PATH, or the newest /usr/lib/postgresql/*/bin."""
    bindir = os.environ.get("PG_BINDIR")
    if bindir and (Path(bindir) / name).exists():
        return str(Path(bindir) / name)
    found = shutil.which(name)
    if found:
        return found
    installed = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda path: int(Path(path).parts[-3]))
    if installed:
        return installed[-1]
    raise DatabaseError(f"{name} not found: install PostgreSQL's client programs (the server's major version or newer)")


def libpq_environment(connection: DatabaseConnection) -> dict[str, str]:
    """The process environment plus PGHOST, PGPORT (every host of a multi-host URL), PGTARGETSESSIONATTRS, PGUSER,
    PGPASSWORD, PGDATABASE and SSL settings."""
    url = connection.config.sqlalchemy_url
    # Exactly the hosts and ports the agents' driver is given (a multi-host URL's as libpq's comma lists).
    _, given = connection.engine.dialect.create_connect_args(url)
    settings = {
        "PGHOST": given.get("host"),
        "PGPORT": given.get("port"),
        "PGTARGETSESSIONATTRS": url.query.get("target_session_attrs"),
        "PGUSER": url.username,
        "PGPASSWORD": url.password or url.query.get("password"),
        "PGDATABASE": url.database,
        "PGSSLMODE": url.query.get("sslmode"),
        "PGSSLROOTCERT": url.query.get("sslrootcert"),
        "PGCONNECT_TIMEOUT": str(connection.config.connect_timeout),
    }
    return {**os.environ, **{key: str(value) for key, value in settings.items() if value}}


def _run_pg_tool(connection: DatabaseConnection, *args: str) -> str:
    """Run pg_dump or pg_restore with the connection's settings in its environment; its standard output."""
    result = subprocess.run(
        [find_pg_tool(args[0]), *args[1:]],
        env=libpq_environment(connection),
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise DatabaseError(f"{args[0]} failed: {_last_line(result.stderr, result.returncode)}")
    return result.stdout


def backup_database(connection: DatabaseConnection, output: Path) -> Path:
    """Write a backup of the configured database to `output`, which must not exist yet.

    The file is private (0600) and gets its name only once complete: a backup cut short is removed.
    """
    if output.exists():
        raise DatabaseError(f"{output} exists; choose a new file")
    backend = connection.config.backend
    if backend == "sqlite":
        if connection.config.is_sqlite_memory:
            raise DatabaseError("an in-memory database cannot be backed up")
        return backup_engine_database(connection.engine, output)
    if backend != "postgresql":
        raise DatabaseError(f"backups of {backend} databases are not supported")
    with written_then_named(output) as partial:
        _run_pg_tool(connection, "pg_dump", "--format=custom", "--no-password", f"--file={partial}")
    return output


@dataclass(frozen=True)
class RestoreResult:
    """What a restore brought (`rows`, at schema `revision`) and where the replaced data was kept."""

    rows: int
    revision: str
    replaced_copy: Path | None


def restore_database(connection: DatabaseConnection, backup: Path) -> RestoreResult:
    """Replace the configured database's tasks, and the usage of its pruned tasks, by those in `backup` (made by
    `backup_database`).

    The backup is verified before anything changes, the data it replaces is first copied aside, and the
    replacement is one transaction checked before it commits: a failed restore changes nothing.
    """
    if not backup.is_file():
        raise DatabaseError(f"no such backup file: {backup}")
    backend = connection.config.backend
    if backend == "sqlite":
        if connection.config.is_sqlite_memory:
            raise DatabaseError("an in-memory database cannot be restored into")
        result = _restore_sqlite(connection, backup)
    elif backend == "postgresql":
        result = _restore_postgresql(connection, backup)
    else:
        raise DatabaseError(f"restoring {backend} databases are not supported")
    connection.engine.dispose()
    return result


# The first schema revision that has the usage buckets table.
BUCKETS_REVISION = 5


def _known_revision(revision: object, backup: Path) -> str:
    if not isinstance(revision, str) or revision not in known_revisions():
        raise DatabaseError(
            f"{backup} is at schema revision {revision!r}, which this code does not know "
            f"(known: {', '.join(sorted(known_revisions()))}); nothing was changed"
        )
    return revision


def _check_columns(columns: Sequence[str], backup: Path) -> None:
    expected = {column.key for column in Task.__table__.columns}
    if set(columns) != expected:
        missing = sorted(expected - set(columns))
        extra = sorted(set(columns) - expected)
        raise DatabaseError(
            f"{backup} does not hold this code's tasks table (missing: {', '.join(missing) or 'none'}; "
            f"unexpected: {', '.join(extra) or 'none'}); nothing was changed"
        )


def _restore_sqlite(connection: DatabaseConnection, backup: Path) -> RestoreResult:
    """Rows, not schema: the backup is checked whole (integrity, tables, revision, columns, every value, as
    `db migrate-data` checks a source), then its rows replace the target's in one transaction, into the
    target's own schema at head. Nothing else crosses: no trigger, view, index or table of the backup's."""
    database = Path(str(connection.config.sqlalchemy_url.database))
    if database.exists() and os.path.samefile(database, backup):
        raise DatabaseError(f"{backup} is the database itself; nothing was changed")
    revision = _check_sqlite_backup(backup)
    try:
        source = TaskSource(str(backup))
    except DataMigrationError as exc:
        raise DatabaseError(f"{exc}; nothing was changed") from None
    try:
        try:
            checked = source.check()
        except DataMigrationError as exc:
            raise DatabaseError(f"{backup} cannot be restored: {exc}") from None
        expected = checked.rows - checked.merged
        try:
            buckets = source.usage_buckets()
        except DataMigrationError as exc:
            raise DatabaseError(f"{backup} cannot be restored: {exc}") from None
        if buckets is None and int(revision) >= BUCKETS_REVISION:
            raise DatabaseError(
                f"{backup} is at revision {revision} but holds no usage buckets table: damaged; nothing was changed"
            )
        upgrade_schema(connection)
        copy = None
        if _has_tasks(connection):
            copy = backup_engine_database(connection.engine, backup_path_for(database, "before-restore"))
        with connection.session_scope() as session:
            session.execute(delete(Task))
            for batch in source.rows(RESTORE_BATCH):
                session.execute(insert(Task), batch)
            # The usage of the backup's pruned tasks comes with its tasks, and replaces the target's.
            session.execute(delete(UsageBucket))
            if buckets:
                session.execute(
                    insert(UsageBucket),
                    [
                        {"user": user, "bucket_start": start, "tokens": tokens}
                        for (user, start), tokens in buckets.items()
                    ],
                )
            restored = session.scalar(select(func.count()).select_from(Task))
            if restored != expected:
                raise DatabaseError(
                    f"the restore of {backup} stored {restored} of its {expected} tasks (a trigger of the target "
                    f"dropping rows?); nothing was changed, and a copy is in {copy}"
                )
        return RestoreResult(expected, revision, copy)
    finally:
        source.close()


def _check_sqlite_backup(backup: Path) -> str:
    """The schema revision of a whole, undamaged SQLite backup holding a tasks table; DatabaseError if not."""
    try:
        source = connect_sqlite(backup, read_only=True)
    except sqlite3.Error:
        raise DatabaseError(f"{backup} cannot be opened as a SQLite database") from None
    try:
        try:
            problems = [row[0] for row in source.execute("PRAGMA integrity_check(5)")]
            tables = {row[0] for row in source.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        except sqlite3.OperationalError as exc:
            if is_sqlite_busy(exc):
                raise DatabaseError(
                    f"{backup} is busy: another process is writing it; try again once it is done. Nothing was changed"
                ) from None
            raise DatabaseError(f"{backup} is not a SQLite database") from None
        except sqlite3.DatabaseError:
            raise DatabaseError(f"{backup} is not a SQLite database") from None
        if problems != ["ok"]:
            raise DatabaseError(f"{backup} is damaged ({'; '.join(problems)}); nothing was changed")
        if "tasks" not in tables or "alembic_version" not in tables:
            raise DatabaseError(f"{backup} holds no task database (tasks and alembic_version); nothing was changed")
        _check_columns([row[1] for row in source.execute("PRAGMA table_info(tasks)")], backup)
        try:
            versions = [row[0] for row in source.execute("SELECT version_num FROM alembic_version")]
        except sqlite3.Error:
            versions = []
        if len(versions) != 1:
            raise DatabaseError(
                f"{backup} records {len(versions)} schema revisions where there is one; nothing was changed"
            )
        stored = versions[0]
        return _known_revision(stored, backup)
    finally:
        source.close()


def _has_tasks(connection: DatabaseConnection) -> bool:
    with connection.engine.connect() as conn:
        return conn.execute(select(Task.uuid).limit(1)).first() is not None


def _restore_postgresql(connection: DatabaseConnection, backup: Path) -> RestoreResult:
    listing = _run_pg_tool(connection, "pg_restore", "--list", "--", str(backup))
    if len(_table_data(listing, "tasks")) != 1:
        raise DatabaseError(f"{backup} holds no data of a tasks table in the public schema; nothing was changed")
    version_lines = _run_pg_tool(
        connection, "pg_restore", "--data-only", "--table=alembic_version", "--file=-", "--", str(backup)
    ).splitlines()
    header = next((index for index, line in enumerate(version_lines) if line.startswith("COPY ")), None)
    stored = version_lines[header + 1] if header is not None and header + 1 < len(version_lines) else None
    revision = _known_revision(None if stored in (None, "\\.") else stored, backup)
    has_buckets = len(_table_data(listing, "token_usage_buckets")) == 1
    if not has_buckets and int(revision) >= BUCKETS_REVISION:
        raise DatabaseError(
            f"{backup} is at revision {revision} but holds no usage buckets data: damaged; nothing was changed"
        )
    with _table_rows(connection, backup, "tasks") as rows:
        _check_columns(rows.columns, backup)
        # The schema is brought to head first: the rows of every known revision fit it.
        upgrade_schema(connection)
        copy = None
        with connection.engine.connect() as conn:
            if conn.exec_driver_sql("SELECT EXISTS (SELECT 1 FROM tasks)").scalar_one():
                name = connection.config.sqlalchemy_url.database or "database"
                copy = backup_database(connection, backup_path_for(backup.parent / f"{name}.dump", "before-restore"))
        with _refused_as_damaged(backup), connection.engine.connect() as conn, conn.begin() as transaction:
            # The old rows stay visible to everyone else until the new ones are in and counted.
            conn.exec_driver_sql("DELETE FROM tasks")
            cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
            rows.copy_into(cursor, "tasks")
            restored = int(conn.exec_driver_sql("SELECT count(*) FROM tasks").scalar_one())
            problem = rows.problem() or (None if restored == rows.data.rows else "the data is cut short")
            if problem is not None:
                transaction.rollback()
                raise DatabaseError(f"pg_restore of {backup} failed ({problem}); nothing was changed")
            conn.exec_driver_sql("DELETE FROM token_usage_buckets")
            if has_buckets:
                _restore_buckets_postgresql(connection, conn, cursor, backup)
    return RestoreResult(restored, revision, copy)


def _restore_buckets_postgresql(connection: DatabaseConnection, conn: Connection, cursor: Any, backup: Path) -> None:
    """The backup's usage buckets into the transaction of the restore, checked as every source's are: through
    a table of the same columns, so that the server reads the text and only checked values reach the table."""
    with _table_rows(connection, backup, "token_usage_buckets") as rows:
        if sorted(rows.columns) != ["bucket_start", "id", "tokens", "user"]:
            raise DatabaseError(f"{backup} holds usage buckets of another shape; nothing was changed")
        conn.exec_driver_sql("CREATE TEMPORARY TABLE restored_buckets (LIKE token_usage_buckets) ON COMMIT DROP")
        rows.copy_into(cursor, "restored_buckets")
        problem = rows.problem()
        if problem is not None:
            raise DatabaseError(f"pg_restore of {backup} failed ({problem}); nothing was changed")
        bad, total = conn.exec_driver_sql(
            "SELECT count(*) FILTER (WHERE tokens < 0 OR mod(extract(epoch FROM bucket_start), 900) <> 0 "
            "OR bucket_start < '1970-01-01+00' OR bucket_start >= '9999-01-01+00' OR length(\"user\") > 255), "
            "coalesce(sum(tokens), 0) FROM restored_buckets"
        ).one()
        if bad or total > MAX_BUCKET_TOKENS:
            raise DatabaseError(
                f"{backup} holds usage buckets that cannot be restored ({bad} not a quarter hour since 1970 or not "
                f"a count, {total:,} tokens in all); nothing was changed"
            )
        conn.exec_driver_sql(
            'INSERT INTO token_usage_buckets ("user", bucket_start, tokens) '
            'SELECT "user", bucket_start, tokens FROM restored_buckets'
        )


@contextlib.contextmanager
def _refused_as_damaged(backup: Path) -> Iterator[None]:
    """A value the server refuses while the backup's rows go in (a type, a constraint): one line naming the file;
    the transaction is rolled back, so nothing changed."""
    try:
        yield
    except (DBAPIError, psycopg2.Error) as exc:
        raise DatabaseError(f"{backup} cannot be restored: {describe_driver_error(exc)}; nothing was changed") from None


def _table_data(listing: str, table: str) -> list[str]:
    """The entries of pg_restore's listing that hold the data of `table` in the public schema."""
    return re.findall(rf"^\d+; \d+ \d+ TABLE DATA public {table} ", listing, re.MULTILINE)


@dataclass
class _TableRows:
    """The COPY block of one table in pg_restore's output: its columns, and its rows as a file for copy_expert."""

    columns: list[str]
    data: _CopyData
    process: subprocess.Popen[str]

    def copy_into(self, cursor: Any, table: str) -> None:
        names = ", ".join(f'"{name}"' for name in self.columns)
        cursor.copy_expert(f"COPY {table} ({names}) FROM STDIN", self.data, size=1 << 20)

    def problem(self) -> str | None:
        """Once the rows are read: why pg_restore failed or its data ended early, or None."""
        assert self.process.stderr is not None
        errors = self.process.stderr.read()
        if self.process.wait() != 0:
            return _last_line(errors, self.process.returncode)
        return None if self.data.finished else "the data is cut short"


@contextlib.contextmanager
def _table_rows(connection: DatabaseConnection, backup: Path, table: str) -> Iterator[_TableRows]:
    """pg_restore writing the data of `table` (public schema) of `backup`; the process is ended on leaving."""
    process = _start_pg_tool(
        connection, "pg_restore", "--data-only", "--schema=public", f"--table={table}", "--file=-", "--", str(backup)
    )
    assert process.stdout is not None and process.stderr is not None
    try:
        yield _TableRows(_copy_header(process.stdout, backup), _CopyData(process.stdout), process)
    finally:
        process.kill()
        process.wait()
        process.stdout.close()
        process.stderr.close()


def _copy_header(lines: IO[str], backup: Path) -> list[str]:
    """Read up to the `COPY public.tasks (a, b, ...) FROM stdin;` line of pg_restore's output; its columns."""
    for line in lines:
        match = re.match(r"COPY \S+ \((.*)\) FROM stdin;$", line.rstrip("\n"))
        if match:
            return [name.strip().strip('"') for name in match.group(1).split(",")]
    raise DatabaseError(f"{backup} holds no data of a tasks table; nothing was changed")


class _CopyData:
    """The rows of one COPY block of pg_restore's text output, as a file for `copy_expert`."""

    def __init__(self, lines: IO[str]) -> None:
        self._lines = lines
        self.rows = 0
        self.finished = False

    def read(self, size: int = -1) -> str:
        chunk: list[str] = []
        length = 0
        while not self.finished and (size < 0 or length < size):
            line = self._lines.readline()
            if not line:
                break
            if line == "\\.\n":
                self.finished = True
                break
            chunk.append(line)
            length += len(line)
            self.rows += 1
        return "".join(chunk)


def _last_line(stderr: str, returncode: int | None) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    return lines[-1] if lines else f"exit status {returncode}"


def _start_pg_tool(connection: DatabaseConnection, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [find_pg_tool(args[0]), *args[1:]],
        env=libpq_environment(connection),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        encoding="utf-8",
    )
