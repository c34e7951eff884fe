"""Shared fixtures: every behaviour test runs on in-memory SQLite, file SQLite and a real PostgreSQL."""

from __future__ import annotations

import gc
import os
import socket
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import URL

from db import Base, DatabaseConfig, DatabaseConnection, Task, TaskRepository
from tests.support.agent import LLM
from tests.support.data import empty_tasks_table, task_data, url_config
from tools.postgres_server import TEST_DATABASE, PostgresServer, PostgresUnavailableError, start_postgres

BACKENDS = ("sqlite-memory", "sqlite-file", "postgresql")


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


@pytest.fixture
def make_task(repo: TaskRepository) -> Callable[..., Task]:
    def make(**overrides: Any) -> Task:
        return repo.create(task_data(**overrides))

    return make


@pytest.fixture
def agent_config(tmp_path: Path, backend: str, request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    """A configuration as the agent passes it: context storage, the LLM, the database. Managers the test left
    unfinished let go of their tasks at its end, not in the middle of another test."""
    database: dict[str, Any] = {"type": "sqlite", "sqlite": {"path": "tasks.db"}}
    if backend == "postgresql":
        request.getfixturevalue("blank_connection")
        DatabaseConnection.reset()
        url: URL = request.getfixturevalue("postgres_url")
        database = {"url": url.render_as_string(hide_password=False)}
    yield {"context_storage": {"base_dir": str(tmp_path / "contexts")}, "llm": LLM, "database": database}
    gc.collect()
