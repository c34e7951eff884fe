"""Shared fixtures: every behaviour test runs on in-memory SQLite, file SQLite and a real PostgreSQL."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.engine import URL

from db import Base, DatabaseConfig, DatabaseConnection, Task, TaskRepository
from tests.postgres_server import PostgresServer, PostgresUnavailableError, start_postgres

BACKENDS = ("sqlite-memory", "sqlite-file", "postgresql")
TEST_DATABASE = "agent_test"


def _running_postgres(*, need_cluster: bool) -> Iterator[PostgresServer]:
    # A missing server fails the tests that need it, loudly: they are never skipped.
    try:
        server = start_postgres(need_cluster=need_cluster)
    except PostgresUnavailableError as exc:
        pytest.fail(f"PostgreSQL tests need a server and none could be had: {exc}", pytrace=False)
    try:
        yield server
    finally:
        DatabaseConnection.reset()
        server.stop()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A real PostgreSQL server for the whole session."""
    yield from _running_postgres(need_cluster=False)


@pytest.fixture
def own_cluster() -> Iterator[PostgresServer]:
    """A throwaway cluster of the test's own, which it may stop, restart or crash."""
    yield from _running_postgres(need_cluster=True)


@pytest.fixture(scope="session")
def postgres_url(postgres_server: PostgresServer) -> URL:
    """URL of a database reserved for the test session (created afresh unless TEST_DATABASE_URL names one)."""
    if postgres_server.cluster is None and postgres_server.description == "TEST_DATABASE_URL":
        return postgres_server.url
    postgres_server.execute_admin(f"DROP DATABASE IF EXISTS {TEST_DATABASE}", f"CREATE DATABASE {TEST_DATABASE}")
    return postgres_server.database_url(TEST_DATABASE)


def url_config(url: URL, **overrides: Any) -> DatabaseConfig:
    return DatabaseConfig(url=url.render_as_string(hide_password=False), **overrides)


@pytest.fixture(autouse=True)
def _forget_connection() -> Iterator[None]:
    DatabaseConnection.reset()
    yield
    DatabaseConnection.reset()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def db_config(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> DatabaseConfig:
    if backend == "sqlite-memory":
        return DatabaseConfig(sqlite_path=":memory:")
    if backend == "sqlite-file":
        return DatabaseConfig(sqlite_path=str(tmp_path / "tasks.db"))
    return url_config(request.getfixturevalue("postgres_url"))


@pytest.fixture
def connection(db_config: DatabaseConfig) -> Iterator[DatabaseConnection]:
    """An initialised connection on an empty schema."""
    conn = DatabaseConnection.initialize(db_config)
    Base.metadata.drop_all(conn.engine)
    conn.create_tables()
    yield conn
    DatabaseConnection.reset()


@pytest.fixture
def blank_connection(db_config: DatabaseConfig) -> Iterator[DatabaseConnection]:
    """An initialised connection on a database with no tables at all (no migration history either)."""
    conn = DatabaseConnection.initialize(db_config)
    with conn.engine.begin() as raw:
        raw.exec_driver_sql("DROP TABLE IF EXISTS alembic_version")
    Base.metadata.drop_all(conn.engine)
    yield conn
    DatabaseConnection.reset()


@pytest.fixture
def repo(connection: DatabaseConnection) -> TaskRepository:
    return TaskRepository(connection)


def task_data(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "uuid": str(uuid.uuid4()),
        "task_source": "github",
        "owner": "notfolder",
        "repo": "coding_agent",
        "task_type": "issue",
        "task_id": "42",
    }
    data.update(overrides)
    return data


@pytest.fixture
def make_task(repo: TaskRepository) -> Callable[..., Task]:
    def make(**overrides: Any) -> Task:
        return repo.create(task_data(**overrides))

    return make


def count_rows(connection: DatabaseConnection) -> int:
    with connection.session_scope() as session:
        return int(session.scalar(select(func.count()).select_from(Task)) or 0)
