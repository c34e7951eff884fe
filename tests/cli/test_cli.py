"""main.py run as a user runs it: a subprocess, configured by config.yaml and the environment."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from sqlalchemy.engine import URL

from db import Base, DatabaseConfig, DatabaseConnection, TaskRepository
from tests.support.cli import assert_one_line_error
from tests.support.cli import run_here as run
from tests.support.data import task_data
from tools.legacy_db import write_legacy_db


def test_start_up_twice_on_a_fresh_directory(tmp_path: Path) -> None:
    first = run(tmp_path)
    assert first.returncode == 0, first.stderr
    assert "backend:     sqlite" in first.stdout
    assert "schema:      0005" in first.stdout
    assert "running 0, completed 0, failed 0, stopped 0" in first.stdout
    database = tmp_path / "contexts" / "tasks.db"
    assert database.exists()
    files = sorted(path.name for path in database.parent.iterdir())
    second = run(tmp_path)
    assert second.returncode == 0 and second.stdout == first.stdout
    assert sorted(path.name for path in database.parent.iterdir()) == files


def test_start_up_adopts_a_legacy_file_and_says_where_the_backup_is(tmp_path: Path) -> None:
    (tmp_path / "contexts").mkdir()
    write_legacy_db(tmp_path / "contexts" / "tasks.db", rows=100, seed=5)
    result = run(tmp_path)
    assert result.returncode == 0, result.stderr
    backups = list((tmp_path / "contexts").glob("tasks.before-*.db"))
    assert len(backups) == 1 and str(backups[0].name) in result.stderr
    counts = result.stdout.split("tasks:")[1]
    assert sum(int(part.split()[1]) for part in counts.split(",")) == 100


def test_production_refuses_to_start_before_migrations(tmp_path: Path) -> None:
    result = run(tmp_path, APP_ENV="production")
    assert_one_line_error(result, "python main.py db upgrade")
    assert run(tmp_path, "db", "check").returncode == 1
    upgraded = run(tmp_path, "db", "upgrade", APP_ENV="production")
    assert upgraded.returncode == 0 and "schema upgraded: empty -> 0005" in upgraded.stdout
    assert "schema already at head: 0005" in run(tmp_path, "db", "upgrade").stdout
    assert run(tmp_path, APP_ENV="production").returncode == 0
    current = run(tmp_path, "db", "current")
    assert "current: 0005" in current.stdout and "head:    0005" in current.stdout
    check = run(tmp_path, "db", "check")
    assert check.returncode == 0
    assert "journal_mode=wal" in check.stdout and "busy_timeout=30000ms" in check.stdout


def test_config_show_names_sources_and_hides_the_password(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text("database:\n  postgresql:\n    port: 6543\n", encoding="utf-8")
    result = run(tmp_path, "config", "show", DATABASE_PASSWORD="hunter2-secret", DATABASE_TYPE="postgresql")
    assert result.returncode == 0
    rows = {line.split()[0]: line for line in result.stdout.splitlines()}
    assert "***" in rows["password"] and "DATABASE_PASSWORD (environment)" in rows["password"]
    assert "6543" in rows["port"] and "database.postgresql.port (config.yaml)" in rows["port"]
    assert "default" in rows["host"]
    assert "hunter2" not in result.stdout + result.stderr


def test_tasks_list_and_show(tmp_path: Path) -> None:
    assert run(tmp_path).returncode == 0
    DatabaseConnection.initialize(DatabaseConfig(sqlite_path=str(tmp_path / "contexts" / "tasks.db")))
    repo = TaskRepository()
    done = repo.create(task_data(user="alice", task_source="gitlab", owner="", repo="77", task_type="merge_request"))
    repo.complete(done.uuid)
    repo.create(task_data(user="bob"))
    DatabaseConnection.reset()

    listed = json.loads(run(tmp_path, "tasks", "list", "--json").stdout)
    assert len(listed) == 2
    only = json.loads(run(tmp_path, "tasks", "list", "--status", "completed", "--json").stdout)
    assert [row["uuid"] for row in only] == [done.uuid]
    assert json.loads(run(tmp_path, "tasks", "list", "--user", "bob", "--json").stdout)[0]["user"] == "bob"
    table = run(tmp_path, "tasks", "list", "--limit", "1").stdout.splitlines()
    assert table[0].split()[:3] == ["uuid", "status", "task"] and len(table) == 2
    assert "gitlab 77!42" in run(tmp_path, "tasks", "list").stdout
    shown = json.loads(run(tmp_path, "tasks", "show", done.uuid.upper(), "--json").stdout)
    assert shown["uuid"] == done.uuid and shown["status"] == "completed"
    assert f"uuid               {done.uuid}" in run(tmp_path, "tasks", "show", done.uuid).stdout
    assert_one_line_error(run(tmp_path, "tasks", "show", str(uuid.uuid4())), "no task")
    assert_one_line_error(run(tmp_path, "tasks", "show", "nope"), "not a valid UUID")
    assert_one_line_error(run(tmp_path, "tasks", "list", "--status", "done"), "unknown task status")


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"DATABASE_PORT": "x"}, "DATABASE_PORT (environment): must be an integer"),
        ({"DATABASE_TYPE": "oracle"}, "unknown database type"),
        ({"DATABASE_URL": "postgresql://u:hunter2@h:port/db"}, "not a valid database URL"),
        ({"APP_ENV": "staging"}, "APP_ENV"),
    ],
)
def test_bad_settings_end_with_one_line(tmp_path: Path, env: dict[str, str], fragment: str) -> None:
    result = run(tmp_path, **env)
    assert_one_line_error(result, fragment)
    assert "hunter2" not in result.stderr


def test_unreachable_server_ends_with_one_line_and_no_password(tmp_path: Path, refused_port: int) -> None:
    result = run(
        tmp_path,
        DATABASE_TYPE="postgresql",
        DATABASE_HOST="127.0.0.1",
        DATABASE_PORT=str(refused_port),
        DATABASE_USER="agent",
        DATABASE_PASSWORD="hunter2-secret",
        DATABASE_STARTUP_TIMEOUT="1",
    )
    assert_one_line_error(result, "cannot reach the database", "agent:***@127.0.0.1")
    assert "hunter2" not in result.stdout + result.stderr


def test_top_level_help_lists_every_command(tmp_path: Path) -> None:
    overview = run(tmp_path, "--help").stdout.split("every command (each has --help):")[1]
    for command in (
        "config show",
        "db upgrade",
        "db current",
        "db check",
        "db migrate-data",
        "db backup",
        "db restore",
        "db stats",
        "tasks list",
        "tasks show",
        "tasks usage",
        "tasks history",
    ):
        assert f"  {command} " in overview


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["config"],
        ["db"],
        ["tasks"],
        ["config", "show"],
        ["db", "upgrade"],
        ["db", "current"],
        ["db", "check"],
        ["tasks", "list"],
        ["tasks", "show"],
    ],
)
def test_every_command_has_help(tmp_path: Path, command: list[str]) -> None:
    result = run(tmp_path, *command, "--help")
    assert result.returncode == 0 and result.stdout.startswith("usage: main.py")


def test_postgresql_start_up_and_check(tmp_path: Path, postgres_url: URL) -> None:
    connection = DatabaseConnection.initialize(DatabaseConfig(url=postgres_url.render_as_string(hide_password=False)))
    with connection.engine.begin() as raw:
        raw.exec_driver_sql("DROP TABLE IF EXISTS alembic_version")
    Base.metadata.drop_all(connection.engine)
    DatabaseConnection.reset()
    env = {
        "DATABASE_TYPE": "postgresql",
        "DATABASE_HOST": str(postgres_url.host),
        "DATABASE_PORT": str(postgres_url.port),
        "DATABASE_NAME": str(postgres_url.database),
        "DATABASE_USER": str(postgres_url.username),
        "DATABASE_PASSWORD": str(postgres_url.password),
    }
    assert run(tmp_path, "db", "check", **env).returncode == 1
    started = run(tmp_path, **env)
    assert started.returncode == 0, started.stderr
    assert "backend:     postgresql" in started.stdout and "postgres:***@" in started.stdout
    check = run(tmp_path, "db", "check", **env)
    assert check.returncode == 0 and "pool_size=5 max_overflow=10" in check.stdout
    assert str(postgres_url.password) not in started.stdout + started.stderr + check.stdout + check.stderr


@pytest.mark.parametrize(
    "url",
    [
        "not a url with s3cret-pw",
        "oracle://u:s3cret-pw@h/d",
        "mysql://u:s3cret-pw@h/d",
        "postgresql+asyncpg://u:s3cret-pw@h/d",
        "postgresql://u:s3cret-pw@h/d?sslmode=sometimes",
        "postgresql://u:s3cret-pw@h:99999/d",
        "postgresql://u:s3cret-pw@/d?host=a:5432&host=b:x",
        "postgresql://u:s3cret-pw@h/d?port=x",
    ],
)
def test_a_bad_dashboard_database_url_is_one_line_naming_it_and_never_its_password(tmp_path: Path, url: str) -> None:
    result = run(tmp_path, "serve", "--port", "0", DASHBOARD_DATABASE_URL=url)
    assert_one_line_error(result, "DASHBOARD_DATABASE_URL")
    assert "s3cret-pw" not in result.stdout + result.stderr
