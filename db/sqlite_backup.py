"""Copies of SQLite databases through SQLite's online backup API (safe while other processes write)."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import Engine


def backup_path_for(database: Path, label: str) -> Path:
    """A new file beside `database`, named after it, `label` and the current UTC time."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    return database.with_name(f"{database.stem}.{label}-{stamp}{database.suffix or '.db'}")


def backup_engine_database(engine: Engine, target: Path) -> Path:
    """Copy the engine's SQLite database into `target` (which must not exist yet)."""
    if target.exists():
        raise FileExistsError(f"{target} exists; choose a new path")
    target.parent.mkdir(parents=True, exist_ok=True)
    raw = engine.raw_connection()
    try:
        source = raw.driver_connection
        assert isinstance(source, sqlite3.Connection)
        with sqlite3.connect(target) as destination:
            source.backup(destination)
        destination.close()
    finally:
        raw.close()
    return target
