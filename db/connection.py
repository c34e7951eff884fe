"""The process-wide database connection: engine, session factory and transaction scope."""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, scoped_session, sessionmaker
from sqlalchemy.pool import NullPool, StaticPool
from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_after_delay, wait_exponential

from db.config import DatabaseConfig
from db.errors import DatabaseError, DatabaseUnavailableError
from db.models import Base
from db.slow_query_log import install_slow_query_log
from private_files import connect_sqlite, create_private_file, make_private_dirs

logger = logging.getLogger(__name__)

SQLITE_BUSY_TIMEOUT_MS = 30_000
APPLICATION_NAME = "coding-agent"
# psycopg2.extensions.TRANSACTION_STATUS_INTRANS / _INERROR, without importing the driver here.
PSYCOPG2_IN_TRANSACTION = 2
PSYCOPG2_IN_ERROR = 3


def describe_driver_error(exc: BaseException) -> str:
    """The first line of the driver's own message (libpq and sqlite3 never put passwords in theirs)."""
    original = getattr(exc, "orig", None) or exc
    lines = str(original).strip().splitlines()
    return f"{type(original).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def retry_policy(seconds: float, first_wait: float, max_wait: float, what: str) -> dict[str, Any]:
    """Tenacity settings: exponential backoff that never sleeps past `seconds`, logged without SQL parameters."""
    backoff = wait_exponential(multiplier=first_wait, max=max_wait)

    def wait(state: RetryCallState) -> float:
        return max(0.0, min(backoff(state), seconds - (state.seconds_since_start or 0.0)))

    def before_sleep(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        logger.warning(
            "%s: attempt %d failed (%s); retrying in %.2fs",
            what,
            state.attempt_number,
            describe_driver_error(error) if error else "?",
            state.upcoming_sleep,
        )

    return {"stop": stop_after_delay(seconds), "wait": wait, "before_sleep": before_sleep, "reraise": True}


READ_ONLY_SQLSTATE = "25006"


def build_engine(config: DatabaseConfig, *, read_only: bool = False) -> Engine:
    """Create the engine for `config`, with the pool and per-connection settings its backend needs.

    `read_only`: the engine only reads. A SQLite file is then opened read-only and left exactly as it is
    (no journal mode change, nothing created); a missing file is an error instead of a new database.
    """
    engine = _create_engine(config, read_only)
    install_slow_query_log(engine, config.slow_query_ms)
    return engine


def _create_engine(config: DatabaseConfig, read_only: bool) -> Engine:
    url = config.sqlalchemy_url
    if config.backend != "sqlite":
        connect_args: dict[str, Any] = {}
        if url.get_driver_name() == "psycopg2":
            connect_args = {"connect_timeout": config.connect_timeout, "application_name": APPLICATION_NAME}
            # Every statement is bounded, so a lock held elsewhere (LOCK TABLE, a migration queued behind a long
            # transaction) makes a write give up instead of stopping the agent. Sent once, at connection.
            limits = (("statement_timeout", config.statement_timeout), ("lock_timeout", config.lock_timeout))
            bounds = [f"-c {name}={round(seconds * 1000)}" for name, seconds in limits if seconds]
            if read_only:
                # A reader's every transaction is read-only: the server refuses a write, whatever the role may do.
                bounds.append("-c default_transaction_read_only=on")
                # libpq's read-write test asks the session, which this makes read-only on every host; a reader
                # asked for the writable host is given the primary instead (the same server while all is well).
                if url.query.get("target_session_attrs") == "read-write":
                    url = url.update_query_dict({"target_session_attrs": "primary"})
            if bounds:
                connect_args["options"] = " ".join(bounds)
        # No pre-ping: a connection the server dropped is retried once by the repository instead, which
        # costs nothing on the common path.
        engine = create_engine(
            url,
            echo=config.echo,
            pool_size=config.pool.size,
            max_overflow=config.pool.max_overflow,
            pool_timeout=config.pool.timeout,
            pool_recycle=config.pool.recycle,
            connect_args=connect_args,
        )
        if not read_only:
            _drop_connections_to_read_only_servers(engine)
        return engine
    if config.is_sqlite_memory:
        # One shared connection, or every thread would see its own empty database.
        engine = create_engine(url, echo=config.echo, poolclass=StaticPool, connect_args={"check_same_thread": False})
        _configure_sqlite(engine, journal=False, read_only=False)
        return engine
    path = Path(url.database or "")
    if read_only:
        if not path.is_file():
            raise DatabaseError(
                f"no database at {path}: start the agent once (python main.py) or run python main.py db upgrade"
            )
    else:
        make_private_dirs(path.parent)
        create_private_file(path)
    timeout = SQLITE_BUSY_TIMEOUT_MS / 1000

    # A reader opens the file read-write but writes nothing and sets no journal mode (see `sqlite_uri` for why
    # not read-only), unless its directory cannot be written (a read-only mount of the agent's contexts/), where
    # SQLite could not make the WAL index a read-write open needs. It then opens the file read-only, through the
    # writer's WAL index while one is live, or as an immutable file when none is: such a connection never sees
    # later writes, so each checkout gets a new one (NullPool).
    cannot_write = read_only and not os.access(path.parent, os.W_OK)

    def connect() -> sqlite3.Connection:
        # The path reaches SQLite as an encoded URI, never through a URL's parsing.
        if cannot_write and _wal_without_index(path):
            raise sqlite3.OperationalError(
                f"{path} cannot be read where its directory is read-only: its -wal file has no -shm beside it (a "
                "writer ended without removing them); open it once where the directory can be written"
            )
        return connect_sqlite(path, read_only=cannot_write, timeout=timeout, check_same_thread=False)

    pool = {"poolclass": NullPool} if cannot_write else {}
    engine = create_engine(url, echo=config.echo, creator=connect, **pool)
    _configure_sqlite(engine, journal=not read_only, read_only=read_only)
    return engine


def _wal_without_index(path: Path) -> bool:
    return path.with_name(path.name + "-wal").exists() and not path.with_name(path.name + "-shm").exists()


def _ours(cursor: sqlite3.Cursor) -> bool:
    """True for a new file or one whose schema this code made. An old file's journal mode is changed only once
    its upgrade succeeded (db.schema.use_wal), so that a refused or failed upgrade leaves it byte for byte."""
    tables = {
        row[0] for row in cursor.execute("SELECT name FROM sqlite_master WHERE name IN ('tasks', 'alembic_version')")
    }
    return "tasks" not in tables or "alembic_version" in tables


def _drop_connections_to_read_only_servers(engine: Engine) -> None:
    """A writer's connection that finds itself on a server that cannot write (SQLSTATE 25006: a demoted
    primary, a standby after a failover) is treated as lost: dropped with its pool's generation, so that the
    retry connects again, and libpq's target_session_attrs=read-write finds the writable host."""

    @event.listens_for(engine, "handle_error")
    def on_read_only_server(context: Any) -> None:
        if is_read_only_server(context.original_exception):
            context.is_disconnect = True


def is_read_only_server(error: BaseException) -> bool:
    """True for PostgreSQL's 'cannot execute ... in a read-only transaction' (SQLSTATE 25006)."""
    original = getattr(error, "orig", None) or error
    return getattr(original, "pgcode", None) == READ_ONLY_SQLSTATE


def _configure_sqlite(engine: Engine, *, journal: bool, read_only: bool) -> None:
    @event.listens_for(engine, "connect")
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the sqlite3 module, decide where transactions begin (see on_begin).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys = ON")
        if read_only:
            # SQLite refuses any write on this connection ("attempt to write a readonly database").
            cursor.execute("PRAGMA query_only = ON")
        if journal and _ours(cursor):
            cursor.execute("PRAGMA journal_mode = WAL")
            # In WAL mode NORMAL is safe from corruption and loses nothing when a process dies; only a power
            # failure can take back the last commits. FULL would wait for the disk at every commit.
            cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def on_begin(connection: Any) -> None:
        # IMMEDIATE takes the write lock up front, waiting through busy_timeout; a deferred transaction that
        # reads and then writes would instead fail at once with "database is locked" under contention.
        # A reader takes no write lock at all.
        connection.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")


def use_driver_autocommit(driver: Any) -> None:
    """Switch a psycopg2 connection to autocommit. A new connection can still be in the transaction its
    `connect` hooks opened (a `SET`, say): that is committed first, as the first transaction would have."""
    status = getattr(getattr(driver, "info", None), "transaction_status", 0)
    if status == PSYCOPG2_IN_TRANSACTION:
        driver.commit()
    elif status == PSYCOPG2_IN_ERROR:
        driver.rollback()
    driver.autocommit = True


class DatabaseConnection:
    """Owns the engine and a thread-local session registry; one instance per process."""

    _instance: ClassVar[DatabaseConnection | None] = None
    _lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, config: DatabaseConfig, *, read_only: bool = False) -> None:
        self.config = config
        self.read_only = read_only
        self.engine = build_engine(config, read_only=read_only)
        self.session_factory = scoped_session(sessionmaker(bind=self.engine, expire_on_commit=False))

    @classmethod
    def initialize(
        cls, config: DatabaseConfig | None = None, *, read_only: bool = False, startup_timeout: float | None = None
    ) -> DatabaseConnection:
        """Create the process's connection (once), after checking that the database answers.

        `read_only`: for commands that only read; see `build_engine`. A read-write connection already
        initialised serves readers too. `startup_timeout`: how long to wait for the database, instead of
        the configured one.
        """
        with cls._lock:
            if cls._instance is not None:
                if config is not None and config != cls._instance.config:
                    raise RuntimeError(
                        "DatabaseConnection is already initialised with another configuration; call reset() first"
                    )
                if cls._instance.read_only and not read_only:
                    raise RuntimeError("DatabaseConnection is initialised read-only; call reset() first")
                return cls._instance
            instance = cls(config if config is not None else DatabaseConfig.load(), read_only=read_only)
            try:
                instance.wait_until_available(startup_timeout)
            except BaseException:
                instance.dispose()
                raise
            cls._instance = instance
            logger.debug("database connection initialised: %s", instance.config.safe_url)
            return instance

    @classmethod
    def get_instance(cls) -> DatabaseConnection:
        """The process's connection, initialised from `DatabaseConfig.load()` when there is none yet."""
        instance = cls._instance
        return instance if instance is not None else cls.initialize()

    @classmethod
    def is_initialized(cls) -> bool:
        """True once `initialize` has succeeded and until `reset`."""
        return cls._instance is not None

    @classmethod
    def reset(cls) -> None:
        """Dispose of the engine, drop the sessions and forget the instance."""
        with cls._lock:
            if cls._instance is not None:
                cls._instance.dispose()
                cls._instance = None

    @classmethod
    def _after_fork_in_child(cls) -> None:
        cls._lock = threading.Lock()
        instance = cls._instance
        if instance is not None and not instance.config.is_sqlite_memory:
            # close=False: the sockets belong to the parent; closing them here would break its connections.
            instance.engine.dispose(close=False)
            instance.session_factory.registry.clear()

    def wait_until_available(self, seconds: float | None = None) -> None:
        """Retry a trivial query with exponential backoff until it works or `seconds` (by default the
        configured startup timeout; 0 for one attempt) run out."""
        started = time.monotonic()
        if self.config.backend == "sqlite":
            seconds = 0
        elif seconds is None:
            seconds = self.config.startup_timeout
        retrying = Retrying(
            retry=retry_if_exception_type(DBAPIError),
            **retry_policy(seconds, 0.25, 5, f"connecting to {self.config.safe_url}"),
        )
        try:
            for attempt in retrying:
                with attempt, self.engine.connect() as connection:
                    connection.execute(text("SELECT 1"))
        except DBAPIError as exc:
            elapsed = time.monotonic() - started
            raise DatabaseUnavailableError(
                f"cannot reach the database at {self.config.safe_url} (gave up after {elapsed:.1f}s): "
                f"{describe_driver_error(exc)}"
            ) from None

    @contextmanager
    def session_scope(self) -> Iterator[Session]:
        """Yield a Session in a transaction: commit on exit, roll back and re-raise on error, always close.

        A scope opened inside another in the same thread joins the outer transaction, which alone commits.
        """
        session = self.session_factory()
        if session.in_transaction():
            yield session
            return
        try:
            with session.begin():
                yield session
        finally:
            self.session_factory.remove()

    @contextmanager
    def autocommit_session(self) -> Iterator[Session]:
        """PostgreSQL only: a Session whose statements commit on their own, for work that is one statement:
        one round trip instead of BEGIN, the statement and COMMIT.

        The driver's autocommit flag is switched on the pooled connection and back before it returns to the
        pool; both are client-side, where SQLAlchemy's isolation-level reset would cost a round trip.
        """
        with self.engine.connect() as connection:
            driver = connection.connection.dbapi_connection
            use_driver_autocommit(driver)
            try:
                with Session(bind=connection, expire_on_commit=False) as session:
                    yield session
            finally:
                if not connection.invalidated and not getattr(driver, "closed", True):
                    driver.autocommit = False  # type: ignore[union-attr]

    def create_tables(self) -> None:
        """Create missing tables and indexes (development; production uses migrations)."""
        Base.metadata.create_all(self.engine)

    def health_check(self) -> bool:
        """True when the database answers a trivial query; never raises."""
        try:
            with self.engine.connect() as connection:
                connection.execute(text("SELECT 1"))
        except Exception as exc:
            logger.debug("health check failed: %s", describe_driver_error(exc))
            return False
        return True

    def dispose(self) -> None:
        """Remove the thread's session and close every pooled connection."""
        self.session_factory.remove()
        self.engine.dispose()


os.register_at_fork(after_in_child=DatabaseConnection._after_fork_in_child)
