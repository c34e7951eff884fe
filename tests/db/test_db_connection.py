"""DatabaseConnection: singleton, transaction scope, per-backend settings, start-up retry and recovery."""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import select, text
from sqlalchemy.engine import URL

from db import (
    DatabaseConfig,
    DatabaseConnection,
    DatabaseUnavailableError,
    Task,
    TaskRepository,
)
from tests.support.data import count_rows, task_data, url_config
from tools.postgres_server import SUPERUSER_PASSWORD as METACHARACTER_PASSWORD
from tools.postgres_server import PostgresServer


def test_initialize_is_a_singleton(tmp_path: Path) -> None:
    config = DatabaseConfig(sqlite_path=str(tmp_path / "a.db"))
    first = DatabaseConnection.initialize(config)
    assert DatabaseConnection.initialize(config) is first
    assert DatabaseConnection.initialize() is first
    assert DatabaseConnection.get_instance() is first
    with pytest.raises(RuntimeError, match="reset"):
        DatabaseConnection.initialize(DatabaseConfig(sqlite_path=str(tmp_path / "b.db")))
    DatabaseConnection.reset()
    assert not DatabaseConnection.is_initialized()
    assert DatabaseConnection.initialize(config) is not first


def test_concurrent_initialize_builds_one_instance(tmp_path: Path) -> None:
    config = DatabaseConfig(sqlite_path=str(tmp_path / "t.db"))
    seen: list[DatabaseConnection] = []
    barrier = threading.Barrier(8)

    def initialise() -> None:
        barrier.wait()
        seen.append(DatabaseConnection.initialize(config))

    threads = [threading.Thread(target=initialise) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(seen) == 8 and len({id(item) for item in seen}) == 1


def test_get_instance_loads_config_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.delenv("DATABASE_TYPE", raising=False)
    monkeypatch.delenv("DATABASE_SQLITE_PATH", raising=False)
    (tmp_path / "config.yaml").write_text(
        "context_storage:\n  base_dir: state\ndatabase:\n  sqlite:\n    path: agent.db\n", encoding="utf-8"
    )
    connection = DatabaseConnection.get_instance()
    connection.create_tables()
    assert (tmp_path / "state" / "agent.db").exists()


def test_session_scope_commits(connection: DatabaseConnection) -> None:
    with connection.session_scope() as session:
        session.add(Task(**task_data()))
    assert count_rows(connection) == 1


def test_session_scope_rolls_back_and_reraises(connection: DatabaseConnection) -> None:
    with pytest.raises(KeyError), connection.session_scope() as session:
        session.add(Task(**task_data()))
        session.flush()
        raise KeyError("boom")
    assert count_rows(connection) == 0


def test_nested_scope_joins_the_outer_transaction(connection: DatabaseConnection) -> None:
    with pytest.raises(RuntimeError), connection.session_scope() as outer:
        outer.add(Task(**task_data()))
        with connection.session_scope() as inner:
            assert inner is outer
            inner.add(Task(**task_data()))
        assert outer.in_transaction()
        raise RuntimeError("outer fails after the inner scope ended")
    assert count_rows(connection) == 0


def test_objects_stay_readable_after_the_scope(connection: DatabaseConnection) -> None:
    data = task_data()
    with connection.session_scope() as session:
        session.add(Task(**data))
    with connection.session_scope() as session:
        task = session.scalars(select(Task)).one()
    assert task.owner == data["owner"]


def test_health_check(connection: DatabaseConnection, refused_port: int) -> None:
    assert connection.health_check()
    broken = DatabaseConnection(DatabaseConfig(type="postgresql", host="127.0.0.1", port=refused_port))
    assert broken.health_check() is False
    broken.dispose()


def test_sqlite_file_pragmas(tmp_path: Path) -> None:
    connection = DatabaseConnection.initialize(DatabaseConfig(sqlite_path=str(tmp_path / "p.db")))
    with connection.engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA busy_timeout")).scalar() == 30_000
        assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1


def test_in_memory_sqlite_is_shared_between_threads() -> None:
    connection = DatabaseConnection.initialize(DatabaseConfig(sqlite_path=":memory:"))
    connection.create_tables()
    TaskRepository(connection).create(task_data())
    counts: list[int] = []
    thread = threading.Thread(target=lambda: counts.append(count_rows(connection)))
    thread.start()
    thread.join()
    assert counts == [1]


def test_postgresql_pool_follows_the_config(postgres_url: URL) -> None:
    config = DatabaseConfig.load(
        {
            "database": {
                "url": postgres_url.render_as_string(hide_password=False),
                "pool": {"size": 3, "max_overflow": 2, "timeout": 7, "recycle": 90},
            }
        },
        env={},
    )
    connection = DatabaseConnection.initialize(config)
    pool = connection.engine.pool
    assert pool.size() == 3  # type: ignore[attr-defined]
    assert pool._max_overflow == 2  # type: ignore[attr-defined]
    assert pool._timeout == 7  # type: ignore[attr-defined]
    assert pool._recycle == 90


def test_password_full_of_url_metacharacters(postgres_server: PostgresServer, postgres_url: URL) -> None:
    role = f"meta_{os.getpid()}"
    quoted = METACHARACTER_PASSWORD.replace("'", "''")
    postgres_server.execute_admin(f"DROP ROLE IF EXISTS {role}", f"CREATE ROLE {role} LOGIN PASSWORD '{quoted}'")
    try:
        raw = DatabaseConfig.load(
            {"database": {"type": "postgresql"}},
            env={
                "DATABASE_HOST": str(postgres_url.host),
                "DATABASE_PORT": str(postgres_url.port),
                "DATABASE_NAME": str(postgres_url.database),
                "DATABASE_USER": role,
                "DATABASE_PASSWORD": METACHARACTER_PASSWORD,
            },
        )
        assert DatabaseConnection.initialize(raw).health_check()
        DatabaseConnection.reset()
        url = postgres_url.set(username=role, password=METACHARACTER_PASSWORD)
        encoded = DatabaseConfig.load({}, env={"DATABASE_URL": url.render_as_string(hide_password=False)})
        assert "%40" in encoded.url  # type: ignore[operator]
        assert DatabaseConnection.initialize(encoded).health_check()
    finally:
        DatabaseConnection.reset()
        postgres_server.execute_admin(f"DROP ROLE IF EXISTS {role}")


def test_unreachable_server_fails_in_bounded_time_without_the_password(refused_port: int) -> None:
    password = "s3cret-Pa55"
    config = DatabaseConfig(
        type="postgresql", host="127.0.0.1", port=refused_port, user="agent", password=password, startup_timeout=1.5
    )
    started = time.monotonic()
    with pytest.raises(DatabaseUnavailableError) as caught:
        DatabaseConnection.initialize(config)
    elapsed = time.monotonic() - started
    message = str(caught.value)
    # It kept trying for the configured time, and stopped then (the bound allows a slow machine's last attempt).
    assert config.startup_timeout <= elapsed < config.startup_timeout + config.connect_timeout
    assert password not in message and "***" in message
    assert "Connection refused" in message or "could not connect" in message
    assert caught.value.__cause__ is None
    assert not DatabaseConnection.is_initialized()


def test_killed_pooled_connections_are_replaced(postgres_server: PostgresServer, postgres_url: URL) -> None:
    connection = DatabaseConnection.initialize(url_config(postgres_url))
    connection.create_tables()
    repo = TaskRepository(connection)
    task = repo.create(task_data())
    held = [connection.engine.connect() for _ in range(3)]  # fill the pool with several connections
    for conn in held:
        conn.execute(text("SELECT 1"))
    for conn in held:
        conn.close()
    killed = postgres_server.execute_admin(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        f"WHERE datname = '{postgres_url.database}' AND pid <> pg_backend_pid()"
    )
    assert len(killed) >= 3
    for _ in range(5):
        assert repo.update_statistics(task.uuid, llm_calls=1)
        assert repo.get_by_uuid(task.uuid) is not None
    stored = repo.get_by_uuid(task.uuid)
    assert stored is not None and stored.llm_call_count == 5


def _backend_pid(queue: multiprocessing.Queue[int]) -> None:
    with DatabaseConnection.get_instance().engine.connect() as conn:
        queue.put(int(conn.execute(text("SELECT pg_backend_pid()")).scalar_one()))


def test_forked_child_never_reuses_the_parents_connection(postgres_url: URL) -> None:
    connection = DatabaseConnection.initialize(url_config(postgres_url))
    with connection.engine.connect() as conn:
        parent_pid = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
    context = multiprocessing.get_context("fork")
    queue: multiprocessing.Queue[int] = context.Queue()
    child = context.Process(target=_backend_pid, args=(queue,))
    child.start()
    child_pid = queue.get(timeout=60)
    child.join(timeout=60)
    assert child.exitcode == 0
    assert child_pid != parent_pid
    with connection.engine.connect() as conn:
        assert conn.execute(text("SELECT pg_backend_pid()")).scalar_one() == parent_pid
