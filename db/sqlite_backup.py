"""Copies of SQLite databases through SQLite's online backup API (safe while other processes write)."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import Engine

from private_files import written_then_named


def backup_path_for(database: Path, label: str) -> Path:
    """A new file beside `database`, named after it, `label` and the current UTC time."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    return database.with_name(f"{database.stem}.{label}-{stamp}{database.suffix or '.db'}")


def copies_of(database: Path, label_prefix: str) -> list[Path]:
    """The copies `backup_path_for(database, label)` made for labels starting with `label_prefix`, oldest first."""
    prefix = f"{database.stem}.{label_prefix}"
    suffix = database.suffix or ".db"
    found = [path for path in database.parent.glob(f"{database.stem}.*{suffix}") if path.name.startswith(prefix)]
    # The UTC stamp ends every name, so name order is time order within one label.
    return sorted(found, key=lambda path: path.name.rsplit("-", 1)[-1])


def copy_sqlite(source: sqlite3.Connection, target: Path) -> Path:
    """Copy the open database `source` into the new private file `target`, which gets its name only once
    complete: a copy cut short (full disk, crash) never looks like a backup."""
    with written_then_named(target) as partial:
        destination = sqlite3.connect(partial)
        try:
            source.backup(destination)
            check = destination.execute("PRAGMA quick_check").fetchone()
            if check is None or check[0] != "ok":
                raise sqlite3.DatabaseError(f"the copy in {partial} does not pass quick_check")
        finally:
            destination.close()
    return target


def backup_engine_database(engine: Engine, target: Path) -> Path:
    """Copy the engine's SQLite database into `target` (which must not exist yet)."""
    raw = engine.raw_connection()
    try:
        source = raw.driver_connection
        assert isinstance(source, sqlite3.Connection)
        return copy_sqlite(source, target)
    finally:
        raw.close()
