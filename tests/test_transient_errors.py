"""Which failures are worth another try, decided on real driver errors from real databases."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL, Engine
from sqlalchemy.exc import DBAPIError

from db import DatabaseConfig, DatabaseConnection, unit_of_work
from db.errors import DatabaseError
from db.unit_of_work import (
    _connection_lost,
    _FailedBeforeCommitError,
    _known_rolled_back,
    is_transient_error,
    postgresql_transaction_committed,
)


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


def _transaction(engine: Engine, finish: str) -> tuple[str, str]:
    with engine.connect() as conn:
        conn.exec_driver_sql("BEGIN")
        xid, started = conn.exec_driver_sql("SELECT pg_current_xact_id()::text, pg_postmaster_start_time()::text").one()
        conn.exec_driver_sql(finish)
    return str(xid), str(started)


def test_a_transactions_outcome_is_looked_up_on_the_server(
    server_engine: Engine, postgres_url: URL, monkeypatch: pytest.MonkeyPatch
) -> None:
    connection = DatabaseConnection(DatabaseConfig(url=postgres_url.render_as_string(hide_password=False)))
    try:
        assert postgresql_transaction_committed(connection, *_transaction(server_engine, "COMMIT")) is True
        assert postgresql_transaction_committed(connection, *_transaction(server_engine, "ROLLBACK")) is False
        xid, _ = _transaction(server_engine, "COMMIT")
        with pytest.raises(DatabaseError) as raised:
            postgresql_transaction_committed(connection, xid, "2000-01-01 00:00:00+00")
        assert str(raised.value) == (
            f"the commit of transaction {xid} was cut off and its outcome is unknown (the server restarted meanwhile)"
        )
        # Still in progress: polled until it ends, within the polls allowed.
        monkeypatch.setattr(unit_of_work, "STATUS_POLLS", 400)  # up to 20 s: the COMMIT comes after 0.3 s
        with server_engine.connect() as open_one:
            open_one.exec_driver_sql("BEGIN")
            xid, started = open_one.exec_driver_sql(
                "SELECT pg_current_xact_id()::text, pg_postmaster_start_time()::text"
            ).one()
            ender = threading.Timer(0.3, lambda: open_one.exec_driver_sql("COMMIT"))
            ender.start()
            try:
                assert postgresql_transaction_committed(connection, str(xid), str(started)) is True
            finally:
                ender.join()
        monkeypatch.setattr(unit_of_work, "STATUS_POLLS", 2)
        with server_engine.connect() as open_one:
            open_one.exec_driver_sql("BEGIN")
            xid, started = open_one.exec_driver_sql(
                "SELECT pg_current_xact_id()::text, pg_postmaster_start_time()::text"
            ).one()
            with pytest.raises(DatabaseError, match="outcome is unknown"):
                postgresql_transaction_committed(connection, str(xid), str(started))
            open_one.exec_driver_sql("ROLLBACK")
    finally:
        connection.dispose()
