"""Backups: pg_dump / pg_restore (custom format) for PostgreSQL, SQLite's online backup API for SQLite files.

Connection settings reach pg_dump and pg_restore through libpq's environment variables (PGPASSWORD among
them), never through their command line, where other users of the machine could read a password.
"""

from __future__ import annotations

import glob
import os
import shutil
import sqlite3
import subprocess
from pathlib import Path

from db.connection import DatabaseConnection
from db.errors import DatabaseError
from db.sqlite_backup import backup_engine_database


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
    """The process environment plus PGHOST, PGPORT, PGUSER, PGPASSWORD, PGDATABASE and SSL settings."""
    url = connection.config.sqlalchemy_url
    settings = {
        "PGHOST": url.host,
        "PGPORT": str(url.port) if url.port else None,
        "PGUSER": url.username,
        "PGPASSWORD": url.password,
        "PGDATABASE": url.database,
        "PGSSLMODE": url.query.get("sslmode"),
        "PGSSLROOTCERT": url.query.get("sslrootcert"),
        "PGCONNECT_TIMEOUT": str(connection.config.connect_timeout),
    }
    return {**os.environ, **{key: str(value) for key, value in settings.items() if value}}


def _run_pg_tool(connection: DatabaseConnection, *args: str) -> None:
    result = subprocess.run(
        [find_pg_tool(args[0]), *args[1:]],
        env=libpq_environment(connection),
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
        raise DatabaseError(f"{args[0]} failed: {lines[-1] if lines else f'exit status {result.returncode}'}")


def backup_database(connection: DatabaseConnection, output: Path) -> Path:
    """Write a backup of the configured database to `output`, which must not exist yet."""
    if output.exists():
        raise DatabaseError(f"{output} exists; choose a new file")
    backend = connection.config.backend
    if backend == "sqlite":
        if connection.config.is_sqlite_memory:
            raise DatabaseError("an in-memory database cannot be backed up")
        return backup_engine_database(connection.engine, output)
    if backend != "postgresql":
        raise DatabaseError(f"backups of {backend} databases are not supported")
    output.parent.mkdir(parents=True, exist_ok=True)
    try:
        _run_pg_tool(connection, "pg_dump", "--format=custom", "--no-password", f"--file={output}")
    except DatabaseError:
        output.unlink(missing_ok=True)
        raise
    return output


def restore_database(connection: DatabaseConnection, backup: Path) -> None:
    """Replace the configured database's tables by those in `backup` (made by `backup_database`)."""
    if not backup.is_file():
        raise DatabaseError(f"no such backup file: {backup}")
    backend = connection.config.backend
    if backend == "sqlite":
        _restore_sqlite(connection, backup)
    elif backend == "postgresql":
        _run_pg_tool(
            connection,
            "pg_restore",
            "--clean",
            "--if-exists",
            "--no-owner",
            "--single-transaction",
            "--exit-on-error",
            "--no-password",
            f"--dbname={connection.config.sqlalchemy_url.database}",
            str(backup),
        )
    else:
        raise DatabaseError(f"restoring {backend} databases is not supported")
    connection.engine.dispose()


def _restore_sqlite(connection: DatabaseConnection, backup: Path) -> None:
    try:
        source = sqlite3.connect(f"file:{backup.resolve()}?mode=ro", uri=True)
        tables = {row[0] for row in source.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.DatabaseError:
        raise DatabaseError(f"{backup} is not a SQLite database") from None
    try:
        if "tasks" not in tables:
            raise DatabaseError(f"{backup} holds no tasks table")
        raw = connection.engine.raw_connection()
        try:
            source.backup(raw.driver_connection)  # type: ignore[arg-type]
        finally:
            raw.close()
    finally:
        source.close()
