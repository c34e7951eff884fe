"""Operations: backup and restore, monitoring figures, the slow-query log, SSL settings."""

from __future__ import annotations

import json
import logging
import subprocess
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, bindparam, event, text
from sqlalchemy.engine import URL

from db import DatabaseConfig, DatabaseConnection, DatabaseError, DatabaseUnavailableError, TaskRepository
from db.schema import upgrade_schema
from ops.backup import backup_database, restore_database
from ops.stats import database_stats
from tests.support.cli import run_here as run
from tests.support.data import all_tasks, task_data, url_config


@pytest.fixture(params=["sqlite-file", "postgresql"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _drop_everything(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE IF EXISTS tasks")
        conn.exec_driver_sql("DROP TABLE IF EXISTS task_operations")
        conn.exec_driver_sql("DROP TABLE IF EXISTS task_heartbeats")
        conn.exec_driver_sql("DROP TABLE IF EXISTS token_usage_buckets")
        conn.exec_driver_sql("DROP TABLE IF EXISTS alembic_version")


def test_backup_wipe_restore_gives_identical_rows(
    blank_connection: DatabaseConnection, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    upgrade_schema(blank_connection)
    repo = TaskRepository(blank_connection)
    for index in range(40):
        task = repo.create(task_data(user="田中" if index % 2 else "o'brien", total_tokens=index))
        if index % 3 == 0:
            repo.fail(task.uuid, "boom\nTraceback")
    expected = {key: task.to_dict() for key, task in all_tasks(blank_connection).items()}
    commands: list[list[str]] = []
    real_run = subprocess.run

    def recording_run(args: list[str], **kwargs: Any) -> Any:
        commands.append(list(args))
        return real_run(args, **kwargs)

    monkeypatch.setattr(subprocess, "run", recording_run)
    backup = backup_database(blank_connection, tmp_path / "backups" / "tasks.dump")
    assert backup.stat().st_size > 0
    with pytest.raises(DatabaseError, match="exists"):
        backup_database(blank_connection, backup)

    _drop_everything(blank_connection.engine)
    restore_database(blank_connection, backup)
    assert {key: task.to_dict() for key, task in all_tasks(blank_connection).items()} == expected
    if blank_connection.config.backend == "postgresql":
        # pg_dump and pg_restore ran, and got the password through their environment, not their command line.
        password = blank_connection.config.sqlalchemy_url.password
        assert password and {Path(command[0]).name for command in commands} >= {"pg_dump", "pg_restore"}
        assert all(password not in " ".join(command) for command in commands)
    else:
        assert commands == []  # SQLite copies through its own backup API


def test_restore_refuses_what_is_not_a_backup(blank_connection: DatabaseConnection, tmp_path: Path) -> None:
    with pytest.raises(DatabaseError, match="no such backup file"):
        restore_database(blank_connection, tmp_path / "missing.dump")
    junk = tmp_path / "junk.dump"
    junk.write_bytes(b"not a backup at all" * 100)
    with pytest.raises(DatabaseError, match=r"not a SQLite database|pg_restore failed"):
        restore_database(blank_connection, junk)


def test_cli_backup_and_restore_drill(tmp_path: Path) -> None:
    assert run(tmp_path).returncode == 0
    database = tmp_path / "contexts" / "tasks.db"
    DatabaseConnection.initialize(DatabaseConfig(sqlite_path=str(database)))
    TaskRepository().create(task_data())
    DatabaseConnection.reset()
    made = run(tmp_path, "db", "backup", "--output", str(tmp_path / "b.db"))
    assert made.returncode == 0 and "written to" in made.stdout
    refused = run(tmp_path, "db", "restore", str(tmp_path / "b.db"))
    assert refused.returncode == 2 and "--yes" in refused.stderr
    done = run(tmp_path, "db", "restore", str(tmp_path / "b.db"), "--yes")
    assert done.returncode == 0 and "1 tasks" in done.stdout


def test_stats_on_sqlite(tmp_path: Path) -> None:
    connection = DatabaseConnection.initialize(DatabaseConfig(sqlite_path=str(tmp_path / "s.db")))
    upgrade_schema(connection)
    TaskRepository(connection).create(task_data())
    stats = database_stats(connection)
    assert stats["backend"] == "sqlite" and stats["tasks_rows"] == 1
    assert stats["pragmas"]["journal_mode"] == "wal" and stats["pragmas"]["page_count"] > 0
    assert stats["file_bytes"] > 0 and stats["wal_bytes"] > 0


def test_stats_on_postgresql(scratch_database: URL) -> None:
    postgres_url = scratch_database
    connection = DatabaseConnection.initialize(url_config(postgres_url))
    upgrade_schema(connection)
    TaskRepository(connection).create(task_data())
    with connection.engine.begin() as conn:
        conn.exec_driver_sql("DROP EXTENSION IF EXISTS pg_stat_statements")
    stats = database_stats(connection)
    assert stats["connections"]["by_state"]["active"] >= 1
    with connection.engine.connect() as conn:
        configured = int(conn.exec_driver_sql("SHOW max_connections").scalar_one())
    assert stats["connections"]["max_connections"] == configured
    assert {"deadlocks", "xact_commit", "xact_rollback"} <= set(stats["database"])
    assert stats["table"]["total_bytes"] >= stats["table"]["index_bytes"] > 0
    assert {index["name"] for index in stats["table"]["indexes"]} >= {"ix_tasks_status", "pk_tasks"}
    assert stats["statements"]["available"] is False and "CREATE EXTENSION" in stats["statements"]["note"]

    with connection.engine.begin() as conn:
        conn.exec_driver_sql("CREATE EXTENSION pg_stat_statements")
    TaskRepository(connection).list_by_status("running")
    statements = database_stats(connection)["statements"]
    assert statements["available"] is True
    assert any("tasks" in row["query"] for row in statements["top_by_total_time"])

    env = {"DATABASE_URL": postgres_url.render_as_string(hide_password=False)}
    printed = json.loads(run(Path.cwd(), "db", "stats", "--json", **env).stdout)
    assert printed["backend"] == "postgresql" and "table" in printed


def test_slow_queries_are_logged_without_parameters(
    db_config: DatabaseConfig, backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    threshold_ms = 100
    connection = DatabaseConnection.initialize(replace(db_config, slow_query_ms=threshold_ms))
    if backend != "postgresql":
        # SQLite has no sleep of its own: give each connection one, so both backends run the same statement.
        @event.listens_for(connection.engine, "connect")
        def add_sleep(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.create_function("pg_sleep", 1, time.sleep)

        connection.engine.dispose()
    secret = "user-data-that-must-not-be-logged"
    with caplog.at_level(logging.WARNING, logger="db.slow_query"), connection.session_scope() as session:
        session.execute(text("SELECT 'fast one', :value").bindparams(bindparam("value", secret)))
        session.execute(
            text("SELECT pg_sleep(:seconds), :value"), {"seconds": 2.5 * threshold_ms / 1000, "value": secret}
        )
    records = [record.getMessage() for record in caplog.records if record.name == "db.slow_query"]
    assert len(records) == 1, records
    message = records[0]
    assert message.startswith("slow query (") and " ms): SELECT pg_sleep(" in message
    assert float(message.removeprefix("slow query (").split(" ms")[0]) >= threshold_ms
    assert secret not in caplog.text


def test_sslmode_require_against_a_server_without_ssl_fails_clearly(postgres_url: URL) -> None:
    config = DatabaseConfig.load(
        {},
        env={
            "DATABASE_URL": postgres_url.render_as_string(hide_password=False),
            "DATABASE_SSLMODE": "require",
            "DATABASE_STARTUP_TIMEOUT": "0",
        },
    )
    assert config.sqlalchemy_url.query["sslmode"] == "require"
    with pytest.raises(DatabaseUnavailableError, match="SSL") as caught:
        DatabaseConnection.initialize(config)
    assert str(postgres_url.password) not in str(caught.value)


def test_sslrootcert_reaches_the_url() -> None:
    """The URL the driver gets; tests/deployment/test_ssl.py shows the driver using it against a real SSL server."""
    config = DatabaseConfig.load(
        {"database": {"type": "postgresql", "postgresql": {"sslmode": "verify-full", "sslrootcert": "/etc/ca.pem"}}},
        env={},
    )
    assert dict(config.sqlalchemy_url.query) == {"sslmode": "verify-full", "sslrootcert": "/etc/ca.pem"}
    from_env = DatabaseConfig.load({}, env={"DATABASE_URL": "postgresql://u@h/d", "DATABASE_SSLROOTCERT": "/ca.pem"})
    assert from_env.sqlalchemy_url.query["sslrootcert"] == "/ca.pem"
