"""Logs statements slower than a threshold, with their duration and SQL text but never their parameters."""

from __future__ import annotations

import logging
import time
from typing import Any

from sqlalchemy import Engine, event

logger = logging.getLogger("db.slow_query")
_STARTS = "slow_query_log_starts"


def install_slow_query_log(engine: Engine, threshold_ms: int) -> None:
    """Log, at WARNING, every statement of `engine` that takes `threshold_ms` or longer (0: all of them)."""

    @event.listens_for(engine, "before_cursor_execute")
    def started(conn: Any, _cursor: Any, _statement: str, _parameters: Any, _context: Any, _many: bool) -> None:
        conn.info.setdefault(_STARTS, []).append(time.perf_counter())

    @event.listens_for(engine, "after_cursor_execute")
    def finished(conn: Any, _cursor: Any, statement: str, _parameters: Any, _context: Any, _many: bool) -> None:
        log_if_slow(statement, conn.info[_STARTS].pop(), threshold_ms)

    @event.listens_for(engine, "handle_error")
    def failed(context: Any) -> None:
        starts = context.connection.info.get(_STARTS) if context.connection is not None else None
        if starts:
            starts.pop()


def log_if_slow(statement: str, started: float, threshold_ms: int) -> None:
    """Log `statement`, begun at `started` (time.perf_counter()), if it took `threshold_ms` or longer; for
    statements sent to the driver directly, past the engine's events."""
    elapsed_ms = (time.perf_counter() - started) * 1000
    if elapsed_ms >= threshold_ms:
        # Parameters can hold user data (error messages, user names): only the SQL text is logged.
        logger.warning("slow query (%.1f ms): %s", elapsed_ms, " ".join(statement.split()))
