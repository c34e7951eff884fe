"""Shared fixtures: every behaviour test runs on in-memory SQLite, file SQLite and a real PostgreSQL."""

from __future__ import annotations

import os
import socket
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


POSTGRES_FIXTURES = frozenset(
    {
        "postgres_server",
        "postgres_url",
        "own_cluster",
        "ssl_server",
        "cluster_with_statistics",
        "scratch_database",
        "bouncer",
    }
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that needs a PostgreSQL server, so `-m "not postgres"` runs the SQLite ones alone."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        backend = callspec.params.get("backend") if callspec is not None else None
        if backend == "postgresql" or POSTGRES_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.postgres)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A real PostgreSQL server for the whole session."""
    yield from _running_postgres(need_cluster=False)


@pytest.fixture(scope="session")
def cluster_with_statistics(postgres_server: PostgresServer) -> Iterator[PostgresServer]:
    """A server with pg_stat_statements preloaded: the session's throwaway cluster, or else (a server named by
    TEST_DATABASE_URL, a container) one of the suite's own."""
    if postgres_server.cluster is not None:
        yield postgres_server
    else:
        yield from _running_postgres(need_cluster=True)


@pytest.fixture
def scratch_database(cluster_with_statistics: PostgresServer) -> Iterator[URL]:
    """A database of the test's own on `cluster_with_statistics`, dropped afterwards."""
    yield from _database_of_our_own(cluster_with_statistics, f"scratch_{uuid.uuid4().hex[:12]}")


@pytest.fixture
def own_cluster() -> Iterator[PostgresServer]:
    """A throwaway cluster of the test's own, which it may stop, restart or crash."""
    yield from _running_postgres(need_cluster=True)


@pytest.fixture(scope="session")
def postgres_url(postgres_server: PostgresServer) -> Iterator[URL]:
    """URL of a database the suite creates for itself on the server, and drops at the end: the server's other
    databases (TEST_DATABASE_URL may name a server in use) are never touched."""
    yield from _database_of_our_own(postgres_server, f"{TEST_DATABASE}_{os.getpid()}_{uuid.uuid4().hex[:8]}")


def _database_of_our_own(server: PostgresServer, name: str) -> Iterator[URL]:
    server.execute_admin(f"CREATE DATABASE {name}")
    try:
        yield server.database_url(name)
    finally:
        DatabaseConnection.reset()
        server.execute_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A loopback port that refuses connections for the whole test: bound (so nobody else can take it) but
    never listening. A port merely found free could be taken by another process before it is used."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        yield int(held.getsockname()[1])


@pytest.fixture(scope="session", autouse=True)
def _settings_of_the_tests_only() -> Iterator[None]:
    """The suite runs on the settings it gives, not on DATABASE_* or APP_ENV of the shell (or a container)."""
    inherited = {key: value for key, value in os.environ.items() if key.startswith("DATABASE_") or key == "APP_ENV"}
    for key in inherited:
        del os.environ[key]
    try:
        yield
    finally:
        os.environ.update(inherited)


def child_environment() -> dict[str, str]:
    """The environment for a program a test starts: no DATABASE_* or APP_ENV of the shell. Under mutation
    testing's coverage pass (MUTANT_UNDER_TEST=stats), which only works inside its own directory, the child
    runs the code unmutated."""
    return {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("DATABASE_", "APP_ENV")) and not (key == "MUTANT_UNDER_TEST" and value == "stats")
    }


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


def empty_tasks_table(config: DatabaseConfig) -> DatabaseConnection:
    """The connection initialised with `config`, on an empty schema (the autouse fixture resets it)."""
    conn = DatabaseConnection.initialize(config)
    Base.metadata.drop_all(conn.engine)
    conn.create_tables()
    return conn


@pytest.fixture
def connection(db_config: DatabaseConfig) -> Iterator[DatabaseConnection]:
    """An initialised connection on an empty schema."""
    yield empty_tasks_table(db_config)
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
