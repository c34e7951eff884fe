"""Deployment files: the compose stack's shape, and the PostgreSQL role script on a real server."""

from __future__ import annotations

import os
import re
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import create_engine, text
from sqlalchemy.exc import DBAPIError, ProgrammingError

from db import DatabaseConfig, DatabaseConnection, TaskRepository
from db.schema import schema_state, upgrade_schema
from ops.backup import find_pg_tool
from tests.support.cli import ROOT
from tests.support.data import task_data
from tools.postgres_server import PostgresServer

INIT_SCRIPT = ROOT / "docker" / "postgres" / "initdb" / "10-roles.sh"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))
    return document


def test_postgres_service(compose: dict[str, Any]) -> None:
    postgres = compose["services"]["postgres"]
    assert postgres["image"] == "postgres:16"
    volumes = postgres["volumes"]
    assert any(volume.split(":")[0] in compose["volumes"] for volume in volumes)
    assert "./docker/postgres/initdb:/docker-entrypoint-initdb.d:ro" in volumes
    for name in ("POSTGRES_DB", "POSTGRES_USER", "POSTGRES_PASSWORD"):
        assert re.fullmatch(r"\$\{" + name + r"[:?-].*\}", postgres["environment"][name])
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])


def test_migrate_then_agent(compose: dict[str, Any]) -> None:
    migrate, agent = compose["services"]["migrate"], compose["services"]["agent"]
    assert migrate["command"] == ["python", "main.py", "db", "upgrade"]
    assert migrate["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    assert agent["depends_on"] == {
        "postgres": {"condition": "service_healthy"},
        "migrate": {"condition": "service_completed_successfully"},
    }
    for service in (migrate, agent):
        environment = service["environment"]
        assert environment["DATABASE_TYPE"] == "postgresql" and environment["DATABASE_HOST"] == "postgres"
        assert environment["DATABASE_PASSWORD"].startswith("${")
    assert "OWNER" in migrate["environment"]["DATABASE_USER"]
    assert "RUNTIME" in agent["environment"]["DATABASE_USER"]
    assert agent["healthcheck"]["test"] == ["CMD", "python", "main.py", "db", "check"]


def test_pgbouncer_is_an_optional_profile_in_transaction_mode(compose: dict[str, Any]) -> None:
    pgbouncer, pooled = compose["services"]["pgbouncer"], compose["services"]["agent-pooled"]
    assert pgbouncer["profiles"] == ["pgbouncer"] and pooled["profiles"] == ["pgbouncer"]
    assert "profiles" not in compose["services"]["agent"]
    assert pgbouncer["environment"]["POOL_MODE"] == "transaction"
    assert pooled["environment"]["DATABASE_HOST"] == "pgbouncer"
    # PgBouncer refuses startup options: the timeouts come from the role instead.
    assert pooled["environment"]["DATABASE_STATEMENT_TIMEOUT"] == "0" == pooled["environment"]["DATABASE_LOCK_TIMEOUT"]
    assert 'ALTER ROLE :"runtime" SET statement_timeout' in INIT_SCRIPT.read_text(encoding="utf-8")


def test_env_example_names_every_required_variable_and_no_real_secret(compose: dict[str, Any]) -> None:
    example = (ROOT / ".env.example").read_text(encoding="utf-8")
    defined = dict(line.split("=", 1) for line in example.splitlines() if line and not line.startswith("#"))
    required = set(re.findall(r"\$\{(\w+):\?", (ROOT / "docker-compose.yml").read_text(encoding="utf-8")))
    assert required <= set(defined)
    assert all(defined[name].startswith("CHANGE-ME") for name in required if "PASSWORD" in name)
    assert ".env" in (ROOT / ".gitignore").read_text(encoding="utf-8").split()


@pytest.fixture
def initialised_database(cluster_with_statistics: PostgresServer) -> Iterator[dict[str, str]]:
    """A new database prepared by the init script exactly as the postgres container runs it."""
    suffix = uuid.uuid4().hex[:8]
    names = {
        "POSTGRES_DB": f"roles_{suffix}",
        "DB_OWNER_USER": f"owner_{suffix}",
        "DB_OWNER_PASSWORD": "own'er:p@ss/%",
        "DB_RUNTIME_USER": f"runtime_{suffix}",
        "DB_RUNTIME_PASSWORD": 'run"time p@ss#',
        "DB_READER_USER": f"reader_{suffix}",
        "DB_READER_PASSWORD": "read'er p@ss",
    }
    url = cluster_with_statistics.url
    cluster_with_statistics.execute_admin(f"CREATE DATABASE {names['POSTGRES_DB']}")
    env = {
        **os.environ,
        **names,
        "POSTGRES_USER": str(url.username),
        "PGHOST": str(url.host),
        "PGPORT": str(url.port),
        "PGPASSWORD": str(url.password),
    }
    env["PATH"] = f"{_psql_dir()}:{env.get('PATH', '')}"
    result = subprocess.run(["bash", str(INIT_SCRIPT)], env=env, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert names["DB_OWNER_PASSWORD"] not in result.stdout + result.stderr
    yield names
    DatabaseConnection.reset()
    cluster_with_statistics.execute_admin(
        f"DROP DATABASE IF EXISTS {names['POSTGRES_DB']} WITH (FORCE)",
        f"DROP ROLE IF EXISTS {names['DB_OWNER_USER']}",
        f"DROP ROLE IF EXISTS {names['DB_RUNTIME_USER']}",
        f"DROP ROLE IF EXISTS {names['DB_READER_USER']}",
    )


def _psql_dir() -> str:
    return str(Path(find_pg_tool("psql")).parent)


def _config(server: PostgresServer, names: dict[str, str], role: str) -> DatabaseConfig:
    return DatabaseConfig(
        type="postgresql",
        host=str(server.url.host),
        port=int(server.url.port or 5432),
        name=names["POSTGRES_DB"],
        user=names[f"DB_{role}_USER"],
        password=names[f"DB_{role}_PASSWORD"],
    )


def test_owner_migrates_and_runtime_only_reads_and_writes_rows(
    cluster_with_statistics: PostgresServer, initialised_database: dict[str, str]
) -> None:
    postgres_server = cluster_with_statistics
    owner = DatabaseConnection.initialize(_config(postgres_server, initialised_database, "OWNER"))
    upgrade_schema(owner)
    DatabaseConnection.reset()

    runtime = DatabaseConnection.initialize(_config(postgres_server, initialised_database, "RUNTIME"))
    assert schema_state(runtime).at_head
    repo = TaskRepository(runtime)
    task = repo.create(task_data())
    assert repo.update_statistics(task.uuid, llm_calls=2)
    assert repo.complete(task.uuid)
    assert repo.delete(task.uuid)

    engine = create_engine(runtime.config.sqlalchemy_url)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SHOW statement_timeout").scalar_one() == "30s"  # the role's, not ours
    refused = [
        "CREATE TABLE intruder (id int)",
        "CREATE TEMP TABLE scratch (id int)",
        "ALTER TABLE tasks ADD COLUMN extra text",
        "DROP TABLE tasks",
        "CREATE INDEX ix_extra ON tasks (owner)",
        "TRUNCATE tasks",
        "CREATE SCHEMA side",
        "UPDATE alembic_version SET version_num = '0001'",
        "DELETE FROM alembic_version",
        "INSERT INTO alembic_version VALUES ('9999')",
    ]
    try:
        for statement in refused:
            with pytest.raises(ProgrammingError, match=r"permission denied|must be owner"), engine.begin() as conn:
                conn.execute(text(statement))
    finally:
        engine.dispose()


def test_the_dashboard_service_reads_as_a_role_that_can_only_read(compose: dict[str, Any]) -> None:
    dashboard = compose["services"]["dashboard"]
    assert dashboard["profiles"] == ["dashboard"]
    assert dashboard["command"][:5] == ["python", "main.py", "serve", "--host", "0.0.0.0"]
    environment = dashboard["environment"]
    assert "READER" in environment["DATABASE_USER"] and "READER" in environment["DATABASE_PASSWORD"]
    assert environment["DASHBOARD_TOKEN"].startswith("${DASHBOARD_TOKEN")
    assert dashboard["ports"] == ["${DASHBOARD_BIND:-127.0.0.1}:${DASHBOARD_PORT:-8080}:8080"]
    assert "/healthz" in " ".join(dashboard["healthcheck"]["test"])
    assert dashboard["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}
    assert "DB_READER_PASSWORD" in compose["services"]["postgres"]["environment"]


def test_the_reader_role_reads_the_tables_and_nothing_else(
    cluster_with_statistics: PostgresServer, initialised_database: dict[str, str]
) -> None:
    owner = DatabaseConnection.initialize(_config(cluster_with_statistics, initialised_database, "OWNER"))
    upgrade_schema(owner)
    TaskRepository(owner).create(task_data(user="reader-test"))
    DatabaseConnection.reset()

    reader = DatabaseConnection.initialize(_config(cluster_with_statistics, initialised_database, "READER"))
    assert schema_state(reader).at_head
    assert [task.user for task in TaskRepository(reader).list_tasks()] == ["reader-test"]
    engine = create_engine(reader.config.sqlalchemy_url)
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SHOW default_transaction_read_only").scalar_one() == "on"
        for statement in (
            "INSERT INTO tasks (uuid, task_source, owner, repo, task_type, task_id) "
            "VALUES (gen_random_uuid(), 'g', 'o', 'r', 't', '1')",
            "UPDATE tasks SET total_tokens = 1",
            "DELETE FROM tasks",
            "UPDATE alembic_version SET version_num = '0001'",
            "CREATE TABLE intruder (id int)",
        ):
            with pytest.raises(DBAPIError, match=r"permission denied|read-only transaction"), engine.begin() as conn:
                conn.execute(text(f"SET TRANSACTION READ WRITE; {statement}"))
    finally:
        engine.dispose()


def test_role_passwords_stay_out_of_the_statement_statistics(
    cluster_with_statistics: PostgresServer, initialised_database: dict[str, str]
) -> None:
    postgres_server = cluster_with_statistics
    url = postgres_server.database_url(initialised_database["POSTGRES_DB"])
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            preloaded = conn.exec_driver_sql("SHOW shared_preload_libraries").scalar_one()
            assert "pg_stat_statements" in str(preloaded), "the test server must record statements"
            queries = [str(row[0]) for row in conn.exec_driver_sql("SELECT query FROM pg_stat_statements")]
    finally:
        engine.dispose()
    assert queries
    for secret in (
        initialised_database["DB_OWNER_PASSWORD"],
        initialised_database["DB_RUNTIME_PASSWORD"],
        initialised_database["DB_READER_PASSWORD"],
    ):
        assert all(secret not in query for query in queries)
