"""The dashboard's database: opened read-only when first needed, and again after it could not be."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from db.connection import DatabaseConnection
from db.errors import DatabaseError, DatabaseUnavailableError
from db.redaction import redact_secrets

logger = logging.getLogger(__name__)

RETRY_AFTER_SECONDS = 5.0


class DatabaseSource:
    """Hands out the read-only connection. A database that is missing or unreachable when the dashboard
    starts (a fresh clone, a server still starting) is tried again, at most every few seconds, so the
    dashboard comes up first and shows the data once there is some."""

    def __init__(
        self, open_connection: Callable[[], DatabaseConnection], retry_after: float = RETRY_AFTER_SECONDS
    ) -> None:
        self._open = open_connection
        self._retry_after = retry_after
        self._connection: DatabaseConnection | None = None
        self._failure: str | None = None
        self._failed_at = 0.0
        self._lock = threading.Lock()

    def connection(self) -> DatabaseConnection:
        """The connection; DatabaseUnavailableError, with a reason safe to show, when it cannot be opened."""
        with self._lock:
            if self._connection is not None:
                return self._connection
            if self._failure is not None and time.monotonic() - self._failed_at < self._retry_after:
                raise DatabaseUnavailableError(self._failure)
            try:
                self._connection = self._open()
            except DatabaseError as exc:
                reason = redact_secrets(str(exc))
                if self._failure != reason:
                    logger.warning("dashboard: database not available: %s", reason)
                self._failure, self._failed_at = reason, time.monotonic()
                raise DatabaseUnavailableError(reason) from None
            self._failure = None
            return self._connection
