"""Run one unit of work in its own transaction, redoing it when it failed for a transient reason before COMMIT."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session
from tenacity import Retrying, retry_if_exception

from db.connection import DatabaseConnection, describe_driver_error, retry_policy
from db.errors import DatabaseError

T = TypeVar("T")

# PostgreSQL rolls the whole transaction back on these, so the work can be redone as it is.
TRANSIENT_SQLSTATES = frozenset({"40001", "40P01"})


class _FailedBeforeCommitError(Exception):
    """Wraps a failure of the work itself: the transaction was never committed."""

    def __init__(self, error: SQLAlchemyError) -> None:
        super().__init__(str(error))
        self.error = error
        self.orig = getattr(error, "orig", error)


def _is_transient(exc: BaseException) -> bool:
    if not isinstance(exc, _FailedBeforeCommitError):
        return False
    error = exc.error
    if isinstance(error, DBAPIError) and error.connection_invalidated:
        return True
    if isinstance(error, OperationalError):
        return True
    return getattr(getattr(error, "orig", None), "pgcode", None) in TRANSIENT_SQLSTATES


def run_in_transaction(connection: DatabaseConnection, work: Callable[[Session], T], description: str) -> T:
    """Run `work(session)` in one transaction and commit it.

    A connection dropped, a deadlock or a serialization failure while the work runs is retried with backoff
    for up to `retry_timeout` seconds. Once COMMIT has been sent nothing is retried, since the outcome is
    unknown: the error is raised as a `DatabaseError`. `IntegrityError` is left to the caller to interpret.
    """
    retrying = Retrying(
        retry=retry_if_exception(_is_transient),
        **retry_policy(connection.config.retry_timeout, 0.05, 2, description),
    )
    try:
        for attempt in retrying:
            with attempt:
                return _run_once(connection, work)
    except _FailedBeforeCommitError as failure:
        error = failure.error
        if isinstance(error, IntegrityError):
            raise error from None
        raise DatabaseError(f"{description} failed: {describe_driver_error(error)}") from error
    raise AssertionError("unreachable: tenacity either returns or raises")


def _run_once(connection: DatabaseConnection, work: Callable[[Session], T]) -> T:
    committing = False
    try:
        with connection.session_scope() as session:
            result = work(session)
            session.flush()
            committing = True
        return result
    except SQLAlchemyError as error:
        if committing:
            raise DatabaseError(
                f"the commit failed and its outcome is unknown: {describe_driver_error(error)}"
            ) from error
        raise _FailedBeforeCommitError(error) from error
