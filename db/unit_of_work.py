"""Run one unit of work in its own transaction, redoing it after a transient failure when that is safe.

Before COMMIT, a lost connection, a deadlock or a serialization failure leaves nothing behind, so the work
is redone. A connection lost while COMMIT is in flight leaves the outcome unknown: work that sets values, or
adds with an operation id (`redo_safe`), is simply redone; work that inserts or deletes is first checked with
`committed(result)`, and redone only if it did not take effect.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session
from tenacity import Retrying, retry_if_exception

from db.connection import (
    DatabaseConnection,
    describe_driver_error,
    is_read_only_server,
    retry_policy,
    use_driver_autocommit,
)
from db.errors import DatabaseError
from db.slow_query_log import log_if_slow

logger = logging.getLogger(__name__)

T = TypeVar("T")

# PostgreSQL rolls the whole transaction back on these, so the work can be redone as it is.
ROLLED_BACK_SQLSTATES = frozenset({"40001", "40P01"})
# ...and these fail before anything was done: lock not available, too many connections.
TRANSIENT_SQLSTATES = ROLLED_BACK_SQLSTATES | {"55P03", "53300"}
# Connection exceptions; operator intervention (admin shutdown, crash shutdown, cannot connect now).
TRANSIENT_SQLSTATE_CLASSES = ("08", "57P")
SQLITE_BUSY_CODES = frozenset({5, 6})  # SQLITE_BUSY, SQLITE_LOCKED


class _FailedBeforeCommitError(Exception):
    """Wraps a failure of the work itself: the transaction was never committed."""

    def __init__(self, error: SQLAlchemyError) -> None:
        super().__init__(str(error))
        self.error = error
        self.orig = getattr(error, "orig", error)


def _is_transient(exc: BaseException) -> bool:
    if not isinstance(exc, _FailedBeforeCommitError):
        return False
    return is_transient_error(exc.error)


def _connection_lost(error: BaseException) -> bool:
    """The session ended under the work (dropped, terminated by a shutdown): whatever it sent last may or may
    not have taken effect. Unlike a serialization failure or a deadlock, which roll back."""
    if isinstance(error, DBAPIError) and error.connection_invalidated:
        return True
    original = getattr(error, "orig", None)
    code = getattr(original, "pgcode", None)
    if code is not None:
        return bool(code.startswith(TRANSIENT_SQLSTATE_CLASSES))
    return isinstance(error, OperationalError) and type(original).__module__.startswith("psycopg2")


def is_sqlite_busy(error: BaseException) -> bool:
    """True for a SQLite file that is busy or locked by another connection (the driver's error, or SQLAlchemy's
    around it)."""
    original = getattr(error, "orig", None) or error
    code = getattr(original, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in SQLITE_BUSY_CODES


def is_transient_error(error: BaseException) -> bool:
    """True for failures that can succeed when tried again: a lost connection, a busy or locked SQLite file,
    a serialization failure or deadlock, a server shutting down or starting. Anything else (a missing
    column, a constraint, bad SQL) is raised at once."""
    if isinstance(error, DBAPIError) and error.connection_invalidated:
        return True
    original = getattr(error, "orig", None)
    code = getattr(original, "pgcode", None)
    if code is not None:
        return code in TRANSIENT_SQLSTATES or code.startswith(TRANSIENT_SQLSTATE_CLASSES)
    if getattr(original, "sqlite_errorcode", None) is not None:
        return is_sqlite_busy(error)
    # psycopg2 gives no SQLSTATE for a connection that failed or broke: those are worth another try.
    return isinstance(error, OperationalError) and type(original).__module__.startswith("psycopg2")


def run_in_transaction(
    connection: DatabaseConnection,
    work: Callable[[Session], T],
    description: str,
    *,
    redo_safe: bool = False,
    committed: Callable[[T], bool] | None = None,
    single_statement: bool = False,
) -> T:
    """Run `work(session)` in one transaction and commit it, retrying transient failures for `retry_timeout`.

    `redo_safe`: running the work twice leaves the same state as running it once. `committed(result)`: tells,
    after a COMMIT whose answer was lost, whether it took effect. With neither, such a failure is raised as a
    `DatabaseError` saying the outcome is unknown. `IntegrityError` is left to the caller to interpret.
    `single_statement`: the work sends one statement, which on PostgreSQL then commits on its own, in one round
    trip. It needs `redo_safe`, or `committed` (called with None, for work whose caller ignores the result).
    """
    if single_statement and (redo_safe or committed is not None) and connection.config.backend == "postgresql":

        def once() -> T:
            return _run_autocommitted(connection, work, None if redo_safe else committed)  # type: ignore[return-value, arg-type]
    else:

        def once() -> T:
            return _run_once(connection, work, redo_safe, committed)

    return _with_retries(connection, once, description)


def run_once(connection: DatabaseConnection, work: Callable[[Session], T], description: str) -> T:
    """`work(session)` in one transaction, tried once (no retry, no retry log): for work that is sent again
    anyway, on a schedule. A failure is raised as `DatabaseError`."""
    try:
        return _run_once(connection, work, True, None)
    except _FailedBeforeCommitError as failure:
        _raise_failure(failure, description)


def run_single_statement(connection: DatabaseConnection, work: Callable[[Session], T], description: str) -> T:
    """Work that is one statement and safe to redo (a read, or setting values): one round trip on PostgreSQL."""
    return run_in_transaction(connection, work, description, redo_safe=True, single_statement=True)


def _with_retries(connection: DatabaseConnection, once: Callable[[], T], description: str) -> T:
    """`once()`, then again after each transient failure, with backoff, for up to `retry_timeout`."""
    try:
        # The common case pays for no retry machinery: it is set up after a first transient failure.
        return once()
    except _FailedBeforeCommitError as failure:
        if not _is_transient(failure):
            _raise_failure(failure, description)
        logger.warning("%s: failed (%s); retrying", description, describe_driver_error(failure))
    retrying = Retrying(
        retry=retry_if_exception(_is_transient),
        **retry_policy(connection.config.retry_timeout, 0.05, 2, description),
    )
    try:
        return retrying(once)
    except _FailedBeforeCommitError as failure:
        _raise_failure(failure, description)


def _raise_failure(failure: _FailedBeforeCommitError, description: str) -> NoReturn:
    error = failure.error
    if isinstance(error, IntegrityError):
        raise error from None
    raise DatabaseError(f"{description} failed: {describe_driver_error(error)}") from error


def _run_autocommitted(
    connection: DatabaseConnection, work: Callable[[Session], T], committed: Callable[[T | None], bool] | None
) -> T | None:
    """One statement that commits on its own (PostgreSQL). Work that is safe to redo is redone after any
    failure; otherwise, when the connection was lost with the statement sent, `committed(None)` tells whether
    it took effect (then None is returned), and if it cannot tell the outcome is reported as unknown."""
    try:
        with connection.autocommit_session() as session:
            result = work(session)
            session.commit()  # nothing is sent: the statement committed already; the objects stay loaded
            return result
    except SQLAlchemyError as error:
        if committed is None or not _connection_lost(error):
            raise _FailedBeforeCommitError(error) from error
        if committed(None):
            return None
        raise _FailedBeforeCommitError(error) from error


def _run_once(
    connection: DatabaseConnection, work: Callable[[Session], T], redo_safe: bool, committed: Callable[[T], bool] | None
) -> T:
    committing = False
    try:
        with connection.session_scope() as session:
            result = work(session)
            session.flush()
            committing = True
        return result
    except SQLAlchemyError as error:
        if not committing or redo_safe or _known_rolled_back(error):
            raise _FailedBeforeCommitError(error) from error
        if committed is None or not _connection_lost(error):
            raise DatabaseError(
                f"the commit failed and its outcome is unknown: {describe_driver_error(error)}"
            ) from error
        if committed(result):
            return result
        raise _FailedBeforeCommitError(error) from error


def run_statement(
    connection: DatabaseConnection,
    sql: str,
    parameters: dict[str, Any],
    description: str,
    *,
    committed: Callable[[], bool] | None = None,
) -> list[tuple[Any, ...]]:
    """PostgreSQL: `sql`, in the driver's own form, as one statement that commits on its own: one round trip,
    on a pooled driver connection and nothing else (no session, no SQLAlchemy Connection). Its rows are
    returned. Failures are raised as SQLAlchemy's exceptions, as any other path raises them.

    Without `committed` the statement must be safe to send again (a read, setting values, an increment that
    carries its operation id), and it is redone after any transient failure. With it, a connection lost with
    the statement sent is resolved by `committed()`: True returns no rows, False sends it again.
    """
    engine = connection.engine
    threshold_ms = connection.config.slow_query_ms

    driver_error_class = engine.dialect.loaded_dbapi.Error

    def once() -> list[tuple[Any, ...]]:
        try:
            pooled = engine.raw_connection()
        except driver_error_class as cannot_connect:
            # The pool hands the driver's own error back: wrapped as SQLAlchemy wraps it everywhere else.
            wrapped = DBAPIError.instance(None, None, cannot_connect, driver_error_class)
            raise _FailedBeforeCommitError(wrapped) from wrapped
        except SQLAlchemyError as error:
            raise _FailedBeforeCommitError(error) from error
        driver: Any = pooled.dbapi_connection
        try:
            use_driver_autocommit(driver)
            started = time.perf_counter()
            with driver.cursor() as cursor:
                cursor.execute(sql, parameters)
                rows = cursor.fetchall() if cursor.description is not None else []
            log_if_slow(sql, started, threshold_ms)
            return rows
        except driver_error_class as driver_error:
            # A writer's connection on a server that cannot write is as good as lost; a reader's refuses by design.
            demoted = is_read_only_server(driver_error) and not connection.read_only
            lost = engine.dialect.is_disconnect(driver_error, driver, None) or demoted
            if lost:
                # As SQLAlchemy's own path does: every connection of the pool older than this one is dropped at
                # its next checkout (after a server restart they are all dead), and this one now.
                engine.pool._invalidate(pooled, driver_error)
            wrapped = DBAPIError.instance(
                sql, parameters, driver_error, driver_error_class, connection_invalidated=lost
            )
            if committed is not None and lost and committed():
                return []
            raise _FailedBeforeCommitError(wrapped) from wrapped
        finally:
            if pooled.is_valid and not driver.closed:
                driver.autocommit = False
            pooled.close()

    return _with_retries(connection, once, description)


def _known_rolled_back(error: SQLAlchemyError) -> bool:
    return getattr(getattr(error, "orig", None), "pgcode", None) in ROLLED_BACK_SQLSTATES
