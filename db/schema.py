"""Schema version: where a database stands against the migrations, and bringing it to head safely.

Upgrades are serialised across processes (a file lock beside a SQLite file, a transaction-level advisory
lock on PostgreSQL), so agents starting together do not race: the losers find the schema at head.
"""

from __future__ import annotations

import csv
import functools
import logging
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from filelock import FileLock
from sqlalchemy import Connection, func, inspect, select
from sqlalchemy.exc import DBAPIError

from db.connection import DatabaseConnection
from db.errors import DatabaseError
from db.sqlite_backup import backup_engine_database, backup_path_for, copies_of
from private_files import remove_with_journals, written_then_named

logger = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
# Any fixed 64-bit number; it names the lock that serialises migrations on a PostgreSQL database.
ADVISORY_LOCK_KEY = 0x7461736B73
FILE_LOCK_TIMEOUT = 600
# Migrations wait at most this long for a table lock before letting the agents' statements through again.
MIGRATION_LOCK_TIMEOUT_MS = 2000
LOCK_NOT_AVAILABLE = "55P03"
LEGACY = "legacy"


class SchemaNotCurrentError(DatabaseError):
    """The database schema is not at the revision this code needs."""


@dataclass(frozen=True)
class SchemaState:
    """`current` is a revision, None for an empty database, or LEGACY for a pre-SQLAlchemy tasks table."""

    current: str | None
    head: str

    @property
    def at_head(self) -> bool:
        return self.current == self.head

    def describe(self) -> str:
        if self.current is None:
            return "empty"
        if self.current == LEGACY:
            return "legacy (pre-SQLAlchemy tasks table, no migration history)"
        return self.current


@dataclass(frozen=True)
class UpgradeResult:
    before: SchemaState
    after: str
    backup: Path | None

    @property
    def changed(self) -> bool:
        return self.before.current != self.after


def alembic_config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = connection
    return config


@functools.cache
def head_revision() -> str:
    """The newest revision in db/migrations (read from disk once per process)."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:
        raise DatabaseError("no migrations found")
    return head


@functools.cache
def known_revisions() -> frozenset[str]:
    """Every revision in db/migrations."""
    return frozenset(script.revision for script in ScriptDirectory.from_config(alembic_config()).walk_revisions())


def _state(connection: Connection) -> SchemaState:
    current = MigrationContext.configure(connection).get_current_revision()
    if current is None and inspect(connection).has_table("tasks"):
        current = LEGACY
    return SchemaState(current, head_revision())


def schema_state(database: DatabaseConnection) -> SchemaState:
    """Where the database stands now."""
    with database.engine.connect() as connection:
        return _state(connection)


@contextmanager
def _serialised(database: DatabaseConnection) -> Iterator[None]:
    path = database.config.sqlalchemy_url.database
    if database.config.backend == "sqlite" and not database.config.is_sqlite_memory and path:
        # The lock file stays beside the database (empty, 0600): removing it could let two processes hold
        # locks on two different files.
        with FileLock(f"{path}.migrate.lock", timeout=FILE_LOCK_TIMEOUT, mode=0o600):
            yield
    else:
        yield


def upgrade_schema(database: DatabaseConnection, *, backup: bool = True) -> UpgradeResult:
    """Bring the schema to head; a SQLite file that is about to change is first copied aside.

    The copy is kept only when the upgrade changed the file (a failed upgrade leaves the file as it was and
    removes its copy), and only the newest `sqlite_backups_kept` copies of earlier upgrades are kept.
    """
    with _serialised(database):
        before = schema_state(database)
        if before.at_head:
            return UpgradeResult(before, before.head, None)
        copy = None
        config = database.config
        path = config.sqlalchemy_url.database
        file_backed = config.backend == "sqlite" and path and not config.is_sqlite_memory
        if backup and before.current is not None and file_backed:
            copy = backup_engine_database(database.engine, backup_path_for(Path(str(path)), f"before-{before.head}"))
        try:
            changes = _upgrade_to_head(database)
        except BaseException:
            if copy is not None:
                remove_with_journals(copy)
            raise
        if file_backed:
            use_wal(database)
            _write_renamed_tasks(Path(str(path)), changes)
        if copy is not None:
            logger.warning("copied %s to %s before upgrading its schema", path, copy)
            _prune_copies(Path(copy), Path(str(path)), database.config.sqlite_backups_kept)
    logger.info("schema upgraded from %s to %s", before.describe(), before.head)
    return UpgradeResult(before, before.head, copy)


def _upgrade_to_head(database: DatabaseConnection) -> dict[str, Any]:
    """Run the migrations in one transaction. On PostgreSQL their table locks are taken with a short lock
    timeout and the whole upgrade retried, so an ALTER TABLE never queues the agents behind a long transaction."""
    deadline = time.monotonic() + FILE_LOCK_TIMEOUT
    attempt = 0
    while True:
        try:
            with database.engine.connect() as connection:
                if connection.dialect.name == "sqlite":
                    return _upgrade_sqlite(connection)
                with connection.begin():
                    # No limit while waiting for another process's upgrade, nor on the migrations' own work.
                    connection.exec_driver_sql("SET LOCAL lock_timeout = 0")
                    connection.exec_driver_sql("SET LOCAL statement_timeout = 0")
                    connection.execute(select(func.pg_advisory_xact_lock(ADVISORY_LOCK_KEY)))
                    connection.exec_driver_sql(f"SET LOCAL lock_timeout = {MIGRATION_LOCK_TIMEOUT_MS}")
                    command.upgrade(alembic_config(connection), "head")
                return {}
        except DBAPIError as exc:
            if getattr(exc.orig, "pgcode", None) != LOCK_NOT_AVAILABLE or time.monotonic() > deadline:
                raise
            attempt += 1
            pause = min(0.1 * 2**attempt, 5.0)
            logger.warning("schema upgrade: a table is locked by another transaction; trying again in %.1fs", pause)
            time.sleep(pause)


def _upgrade_sqlite(connection: Connection) -> dict[str, Any]:
    """SQLite's way to replace a table others refer to: foreign keys off and legacy_alter_table on while the
    migrations run (both only take effect outside a transaction), foreign keys checked before COMMIT."""
    raw = connection.connection.driver_connection
    assert isinstance(raw, sqlite3.Connection)
    raw.execute("PRAGMA foreign_keys = OFF")
    raw.execute("PRAGMA legacy_alter_table = ON")
    config = alembic_config(connection)
    try:
        with connection.begin():
            command.upgrade(config, "head")
            broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
            if broken:
                raise DatabaseError(
                    f"the upgrade would break {len(broken)} foreign key references; nothing was changed"
                )
    finally:
        raw.execute("PRAGMA legacy_alter_table = OFF")
        raw.execute("PRAGMA foreign_keys = ON")
    return dict(config.attributes)


def _prune_copies(latest: Path, database: Path, keep: int) -> None:
    older = [path for path in copies_of(database, "before-") if path != latest]
    for old in older[: max(0, len(older) - (keep - 1))]:
        logger.info("removing the old upgrade copy %s (keeping the newest %d)", old, keep)
        remove_with_journals(old)


def use_wal(database: DatabaseConnection) -> None:
    """Switch a SQLite file to WAL journaling once its schema is this code's (an old file is left as it is
    until its upgrade succeeded, so that a failed or refused upgrade leaves it byte for byte as it was)."""
    raw = database.engine.raw_connection()
    try:
        driver = raw.driver_connection
        assert isinstance(driver, sqlite3.Connection)
        driver.execute("PRAGMA journal_mode = WAL")
    finally:
        raw.close()


def _write_renamed_tasks(database: Path, changes: dict[str, Any]) -> None:
    renamed: dict[str, str] = changes.get("renamed_tasks") or {}
    if changes.get("merged_tasks"):
        logger.warning(
            "%d rows of the old tasks table were identical duplicates and were merged", changes["merged_tasks"]
        )
    if not renamed:
        return
    target = backup_path_for(database, "uuid-map").with_suffix(".csv")
    with written_then_named(target) as partial, partial.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(("old_id", "uuid"))
        writer.writerows(sorted(renamed.items()))
    logger.warning("%d tasks got a new uuid (upper case or not a UUID); the mapping is in %s", len(renamed), target)


def require_current_schema(database: DatabaseConnection) -> SchemaState:
    """Raise SchemaNotCurrentError, naming the command that fixes it, unless the schema is at head."""
    state = schema_state(database)
    if not state.at_head:
        raise SchemaNotCurrentError(
            f"the database schema is {state.describe()}, this code needs {state.head}: "
            "apply the migrations with `python main.py db upgrade`"
        )
    return state
