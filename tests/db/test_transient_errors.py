"""Which failures are worth another try, decided on real driver errors from real databases."""

from __future__ import annotations

import logging
import re
import sqlite3
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text, update
from sqlalchemy.engine import URL, Engine
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.orm import Session

from db import DatabaseConnection, PoolConfig, Task, TaskRepository
from db.errors import DatabaseError
from db.unit_of_work import (
    _connection_lost,
    _FailedBeforeCommitError,
    _known_rolled_back,
    is_transient_error,
    run_in_transaction,
)
from tests.support.data import empty_tasks_table, task_data, url_config


def _raised(engine: Engine, statement: str) -> DBAPIError:
    with pytest.raises(DBAPIError) as raised, engine.connect() as conn:
        conn.execute(text(statement))
    return raised.value


def test_a_locked_sqlite_file_is_transient_a_missing_table_is_not(tmp_path: Path) -> None:
    path = tmp_path / "busy.db"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN EXCLUSIVE")
    engine = create_engine(f"sqlite:///{path}", connect_args={"timeout": 0})
    try:
        locked = _raised(engine, "SELECT * FROM t")
        assert getattr(locked.orig, "sqlite_errorcode", 0) & 0xFF == 5  # SQLITE_BUSY, as the driver says it
        assert is_transient_error(locked)
        holder.execute("ROLLBACK")
        missing = _raised(engine, "SELECT * FROM nowhere")
        assert not is_transient_error(missing)
        assert not _connection_lost(missing) and not _known_rolled_back(missing)
        failure = _FailedBeforeCommitError(locked)
        assert failure.error is locked and failure.orig is locked.orig and str(failure) == str(locked)
    finally:
        engine.dispose()
        holder.close()


@pytest.fixture
def server_engine(postgres_url: URL) -> Iterator[Engine]:
    engine = create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.exec_driver_sql("DROP TABLE IF EXISTS transient_probe")
        conn.exec_driver_sql("CREATE TABLE transient_probe (id int PRIMARY KEY)")
        conn.exec_driver_sql("INSERT INTO transient_probe VALUES (1)")
    yield engine
    with engine.connect() as conn:
        conn.exec_driver_sql("DROP TABLE IF EXISTS transient_probe")
    engine.dispose()


def test_postgresql_sqlstates_decide(server_engine: Engine, postgres_url: URL, refused_port: int) -> None:
    with server_engine.connect() as holder:
        holder.exec_driver_sql("BEGIN")
        holder.exec_driver_sql("SELECT * FROM transient_probe FOR UPDATE")
        with pytest.raises(DBAPIError) as raised, server_engine.connect() as conn:
            conn.exec_driver_sql("SELECT * FROM transient_probe FOR UPDATE NOWAIT")
        holder.exec_driver_sql("ROLLBACK")
    not_available = raised.value
    assert getattr(not_available.orig, "pgcode", None) == "55P03"
    assert is_transient_error(not_available) and not _connection_lost(not_available)
    assert not _known_rolled_back(not_available)

    missing = _raised(server_engine, "SELECT * FROM nowhere")
    assert getattr(missing.orig, "pgcode", None) == "42P01"
    assert not is_transient_error(missing) and not _connection_lost(missing)

    with server_engine.connect() as victim:
        pid = victim.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
        with server_engine.connect() as admin:
            admin.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        with pytest.raises(DBAPIError) as raised:
            victim.exec_driver_sql("SELECT 1")
    terminated = raised.value
    assert is_transient_error(terminated) and _connection_lost(terminated)

    unreachable = create_engine(postgres_url.set(port=refused_port), connect_args={"connect_timeout": 2})
    try:
        with pytest.raises(DBAPIError) as raised, unreachable.connect():
            pass
    finally:
        unreachable.dispose()
    refused = raised.value
    assert getattr(refused.orig, "pgcode", None) is None
    assert is_transient_error(refused) and _connection_lost(refused)


def test_a_serialization_failure_is_transient_and_rolled_back(server_engine: Engine) -> None:
    first, second = server_engine.connect(), server_engine.connect()
    try:
        for conn in (first, second):
            conn.exec_driver_sql("BEGIN ISOLATION LEVEL SERIALIZABLE")
            conn.exec_driver_sql("SELECT * FROM transient_probe")
        first.exec_driver_sql("UPDATE transient_probe SET id = 2")
        first.exec_driver_sql("COMMIT")
        with pytest.raises(DBAPIError) as raised:
            second.exec_driver_sql("UPDATE transient_probe SET id = 3")
        second.exec_driver_sql("ROLLBACK")
    finally:
        first.close()
        second.close()
    conflict = raised.value
    assert getattr(conflict.orig, "pgcode", None) == "40001"
    assert is_transient_error(conflict) and _known_rolled_back(conflict) and not _connection_lost(conflict)


def test_a_statement_timeout_and_a_value_the_driver_cannot_send_are_not_transient(server_engine: Engine) -> None:
    with server_engine.connect() as conn:
        conn.exec_driver_sql("SET statement_timeout = '50ms'")
        with pytest.raises(DBAPIError) as raised:
            conn.exec_driver_sql("SELECT pg_sleep(5)")
    cancelled = raised.value
    # psycopg2 files a cancelled statement with the connection errors; its SQLSTATE says it is not one.
    assert getattr(cancelled.orig, "pgcode", None) == "57014" and isinstance(cancelled, OperationalError)
    assert not is_transient_error(cancelled) and not _connection_lost(cancelled)

    with pytest.raises(DBAPIError) as raised, server_engine.connect() as conn:
        conn.exec_driver_sql("SELECT %(value)s", {"value": object()})
    unsendable = raised.value
    assert getattr(unsendable.orig, "pgcode", None) is None  # refused by the driver, before the server
    assert not is_transient_error(unsendable) and not _connection_lost(unsendable)


def test_an_exhausted_pool_is_reported_at_once_naming_the_operation(postgres_url: URL) -> None:
    connection = DatabaseConnection(url_config(postgres_url, pool=PoolConfig(size=1, max_overflow=0, timeout=1)))
    try:
        with connection.engine.connect(), pytest.raises(DatabaseError) as raised:
            TaskRepository(connection).get_by_uuid(str(uuid.uuid4()))
    finally:
        connection.engine.dispose()
    assert str(raised.value).startswith("get task failed: TimeoutError: QueuePool limit of size 1 overflow 0 reached")
    exhausted = raised.value.__cause__
    assert isinstance(exhausted, PoolTimeoutError)
    assert not is_transient_error(exhausted) and not _connection_lost(exhausted) and not _known_rolled_back(exhausted)


def test_a_lock_held_past_the_retry_window_fails_naming_the_operation(
    postgres_url: URL, caplog: pytest.LogCaptureFixture
) -> None:
    connection = empty_tasks_table(url_config(postgres_url, lock_timeout=0.2, retry_timeout=0.6))
    repository = TaskRepository(connection)
    task = repository.create(task_data())
    holder = create_engine(postgres_url)
    try:
        with holder.connect() as conn:
            conn.exec_driver_sql("SELECT 1 FROM tasks WHERE uuid = %(key)s FOR UPDATE", {"key": task.uuid})
            with caplog.at_level(logging.WARNING, logger="db"), pytest.raises(DatabaseError) as raised:
                repository.complete(task.uuid)
            conn.rollback()
    finally:
        holder.dispose()
    assert str(raised.value).startswith("complete failed: LockNotAvailable: ")
    said = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert re.fullmatch(r"complete: failed \(LockNotAvailable: [^)]+\); retrying", said[0]), said
    # Then tenacity's own attempts, each logged before its pause, until the window closes.
    assert len(said) >= 2
    for line in said[1:]:
        assert re.fullmatch(r"complete: attempt \d+ failed \(LockNotAvailable: [^)]+\); retrying in \d+\.\d\ds", line)
    found = repository.get_by_uuid(task.uuid)
    assert found is not None and found.status == "running"


@pytest.mark.parametrize("lasting", ["a missing table", "a refused value"])
def test_after_a_transient_failure_a_lasting_one_is_raised_at_once(
    server_engine: Engine, postgres_url: URL, lasting: str
) -> None:
    connection = DatabaseConnection(url_config(postgres_url, retry_timeout=5))
    calls: list[int] = []

    def work(session: Session) -> None:
        calls.append(len(calls))
        if len(calls) == 1:
            session.execute(text("SELECT * FROM transient_probe FOR UPDATE NOWAIT"))  # locked: 55P03
        elif lasting == "a missing table":
            session.execute(text("SELECT * FROM nowhere"))
        else:
            raise ValueError("refused")

    expected = DatabaseError if lasting == "a missing table" else ValueError
    try:
        with server_engine.connect() as holder:
            holder.exec_driver_sql("BEGIN")
            holder.exec_driver_sql("SELECT * FROM transient_probe FOR UPDATE")
            try:
                with pytest.raises(expected):
                    run_in_transaction(connection, work, "probe")
            finally:
                holder.exec_driver_sql("ROLLBACK")
    finally:
        connection.engine.dispose()
    assert calls == [0, 1]


def test_work_safe_to_redo_still_runs_as_one_transaction(postgres_url: URL) -> None:
    connection = empty_tasks_table(url_config(postgres_url))
    repository = TaskRepository(connection)
    task = repository.create(task_data(model="before"))

    def work(session: Session) -> None:
        session.execute(update(Task).where(Task.uuid == task.uuid).values(model="halfway"))
        session.execute(text("SELECT * FROM nowhere"))

    with pytest.raises(DatabaseError, match=r"^two statements failed: "):
        run_in_transaction(connection, work, "two statements", redo_safe=True)
    found = repository.get_by_uuid(task.uuid)
    assert found is not None and found.model == "before"


def test_an_increment_leaves_its_connection_to_transactions_again(server_engine: Engine, postgres_url: URL) -> None:
    connection = empty_tasks_table(url_config(postgres_url, pool=PoolConfig(size=1, max_overflow=0)))
    repository = TaskRepository(connection)
    task = repository.create(task_data())
    with connection.engine.connect() as conn:
        backend = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
    # Sent with the driver in autocommit (one statement that commits on its own): the pool gets it back without,
    # and with no transaction left open on the server, even when the UPDATE found no row to commit.
    for key, landed in ((task.uuid, True), (str(uuid.uuid4()), False)):
        assert repository.update_statistics(key, tokens=5) is landed
        with server_engine.connect() as observer:
            state = observer.exec_driver_sql(
                "SELECT state FROM pg_stat_activity WHERE pid = %(pid)s", {"pid": backend}
            ).scalar_one()
        assert state == "idle", landed
        with connection.engine.connect() as conn:
            driver = conn.connection.dbapi_connection
            assert driver is not None and driver.autocommit is False  # type: ignore[attr-defined]


def test_after_every_connection_died_one_failure_renews_the_whole_pool(
    server_engine: Engine, postgres_url: URL
) -> None:
    idle = 8
    connection = empty_tasks_table(
        url_config(postgres_url, pool=PoolConfig(size=idle, max_overflow=0), retry_timeout=1.5)
    )
    repository = TaskRepository(connection)
    task = repository.create(task_data())
    held = [connection.engine.raw_connection() for _ in range(idle)]
    pids = []
    for pooled in held:
        with pooled.dbapi_connection.cursor() as cursor:  # type: ignore[union-attr]
            cursor.execute("SELECT pg_backend_pid()")
            pids.append(cursor.fetchone()[0])
        pooled.close()
    with server_engine.connect() as admin:
        admin.execute(text("SELECT pg_terminate_backend(pid) FROM unnest(CAST(:pids AS int[])) AS pid"), {"pids": pids})
    # A server restart or failover leaves every pooled connection dead: the first that fails renews them all,
    # instead of each being tried (and waited for) in turn until the retry window runs out.
    for call in (lambda: repository.get_by_uuid(task.uuid), lambda: repository.update_statistics(task.uuid, tokens=1)):
        assert call()


def test_a_writer_that_lands_on_a_server_that_cannot_write_reconnects_until_one_can(
    server_engine: Engine, postgres_url: URL
) -> None:
    # A demoted primary, as a pooled connection finds it: every new session is read-only (SQLSTATE 25006 on a
    # write) until the database can write again (as when libpq's next connection reaches the new primary).
    connection = empty_tasks_table(url_config(postgres_url, retry_timeout=20))
    repository = TaskRepository(connection)
    task = repository.create(task_data())
    database = postgres_url.database

    def read_only(on: bool) -> None:
        change = "SET default_transaction_read_only = on" if on else "RESET default_transaction_read_only"
        with server_engine.connect() as admin:
            admin.exec_driver_sql(f'ALTER DATABASE "{database}" {change}')
            if on:  # sessions already open keep their setting: end them
                admin.execute(
                    text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = :name AND pid <> pg_backend_pid()"
                    ),
                    {"name": database},
                )

    for write in (
        lambda: repository.update_statistics(task.uuid, tokens=5),  # on a pooled driver connection
        lambda: repository.update(task.uuid, {"model": "m"}),  # through a session
    ):
        read_only(True)
        timer = threading.Timer(1.5, read_only, args=(False,))
        timer.start()
        try:
            assert write()
        finally:
            timer.join()
    found = repository.get_by_uuid(task.uuid)
    assert found is not None and (found.total_tokens, found.model) == (5, "m")
