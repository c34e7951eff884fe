"""The dashboard's database: opened read-only when first needed, and again after it could not be."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from db.config import DatabaseConfig
from db.connection import DatabaseConnection, describe_driver_error
from db.errors import DatabaseError, DatabaseUnavailableError
from db.redaction import redact_secrets

logger = logging.getLogger(__name__)

RETRY_AFTER_SECONDS = 5.0


class DatabaseSource:
    """Hands out the read-only connection. A database that is missing or unreachable when the dashboard
    starts (a fresh clone, a server still starting) is tried again, at most every few seconds, so the
    dashboard comes up first and shows the data once there is some.

    `empty_until_created`: the SQLite file the agent will create. Until it exists the pages show an empty,
    in-memory table of the same schema, with a notice saying so, rather than an error.
    """

    def __init__(
        self,
        open_connection: Callable[[], DatabaseConnection],
        retry_after: float = RETRY_AFTER_SECONDS,
        empty_until_created: Path | None = None,
    ) -> None:
        self._open = open_connection
        self._retry_after = retry_after
        self._awaited = empty_until_created
        self._connection: DatabaseConnection | None = None
        self._stand_in: DatabaseConnection | None = None
        self._failure: str | None = None
        self._failed_at = 0.0
        self._lock = threading.Lock()

    @property
    def notice(self) -> str | None:
        """What the pages should say about the database, when it is not there yet."""
        if self._connection is None and self._stand_in is not None:
            return (
                f"No database at {self._awaited} yet: the agent creates it when it first runs. "
                "Until then there are no tasks to show."
            )
        return None

    def connection(self) -> DatabaseConnection:
        """The connection; DatabaseUnavailableError, with a reason safe to show, when it cannot be opened."""
        with self._lock:
            if self._connection is not None:
                return self._connection
            if self._failure is not None and time.monotonic() - self._failed_at < self._retry_after:
                return self._instead(self._failure)
            try:
                self._connection = self._open()
            except Exception as exc:  # whatever the database is (not one, truncated, locked, forbidden): say so
                reason = redact_secrets(str(exc) if isinstance(exc, DatabaseError) else describe_driver_error(exc))
                if self._failure != reason:
                    logger.warning("dashboard: database not available: %s", reason)
                self._failure, self._failed_at = reason, time.monotonic()
                return self._instead(reason)
            self._failure = None
            if self._stand_in is not None:
                self._stand_in.dispose()
                self._stand_in = None
            return self._connection

    def close(self) -> None:
        """Close every connection to a database on disk: a SQLite reader's last close removes the -wal and -shm
        files it opened. An in-memory database is left open: closing it would lose it, and it leaves no file."""
        with self._lock:
            for connection in (self._connection, self._stand_in):
                if connection is not None and not connection.config.is_sqlite_memory:
                    connection.dispose()
            self._connection = None

    def _instead(self, reason: str) -> DatabaseConnection:
        if self._awaited is None or self._awaited.exists():
            raise DatabaseUnavailableError(reason)
        if self._stand_in is None:
            self._stand_in = DatabaseConnection(DatabaseConfig(sqlite_path=":memory:"))
            self._stand_in.create_tables()
        return self._stand_in
