"""Clauses of the contract that need a test of their own: round trips, COMMIT failures, logs, timestamps,
the schema, sessions, SQLite contention and the layers' boundaries."""

from __future__ import annotations

import ast
import logging
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, event, func, insert, inspect, select, text

from context_storage import GitHubIssueTaskKey, TaskContextManager
from db import DatabaseConfig, DatabaseConnection, DatabaseUnavailableError, TaskAlreadyExistsError, TaskRepository
from db.errors import DatabaseConfigError
from db.models import OPERATION_RETENTION, TaskOperation, utcnow
from db.repositories.statements import EXPIRY_BATCH
from db.schema import upgrade_schema
from tests.support.agent import LLM, stored
from tests.support.cli import ROOT
from tests.support.data import EXPECTED_INDEXES, task_data
from tools.postgres_server import PostgresServer


@pytest.fixture(params=["sqlite-file", "postgresql"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# Round trips: a call sends its statement and nothing more (no pre-ping, no extra SELECT)


@pytest.fixture
def sent(connection: DatabaseConnection) -> Iterator[list[str]]:
    """Every statement the driver sends from now on, including those SQLAlchemy issues itself (a pre-ping)."""
    statements: list[str] = []
    if connection.config.backend == "sqlite":

        @event.listens_for(connection.engine, "connect")
        def trace(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.set_trace_callback(statements.append)
    else:
        import psycopg2.extensions

        class Counting(psycopg2.extensions.cursor):  # type: ignore[misc]
            def execute(self, query: Any, variables: Any = None) -> Any:
                statements.append(query if isinstance(query, str) else query.decode())
                return super().execute(query, variables)

        @event.listens_for(connection.engine, "connect")
        def count(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.cursor_factory = Counting

    connection.engine.dispose()
    yield statements


def test_each_call_sends_only_its_own_statement(
    connection: DatabaseConnection, repo: TaskRepository, sent: list[str]
) -> None:
    task = repo.create(task_data())
    sent.clear()
    calls = 20
    for _ in range(calls):
        assert repo.get_by_uuid(task.uuid) is not None
    assert not [statement for statement in sent if statement.strip().upper() in ("SELECT 1", "SELECT 1;")]
    selects = [statement for statement in sent if statement.lstrip().upper().startswith("SELECT")]
    assert len(selects) == calls
    if connection.config.backend == "sqlite":
        # BEGIN, the SELECT, COMMIT: three statements, no more.
        assert len(sent) == 3 * calls, sent[:6]
        assert sent[0] == "BEGIN IMMEDIATE"


# COMMIT failures: an increment is never redone once its COMMIT was sent; work that sets values is


def lose_the_answer_to_commit(engine: Engine) -> dict[str, int]:
    """The next COMMIT reaches the database and takes effect, then the connection drops before the answer:
    the caller sees a lost connection at COMMIT, as after a network failure."""
    state = {"left": 1}

    @event.listens_for(engine, "commit")
    def commit_then_drop(connection: Any) -> None:
        if state["left"]:
            state["left"] -= 1
            raw = connection.connection.dbapi_connection
            raw.commit()
            raw.close()

    return state


Hook = Callable[[Any, str], None]
_DRIVER_HOOKS: weakref.WeakKeyDictionary[Engine, tuple[list[Hook], list[Hook]]] = weakref.WeakKeyDictionary()


def driver_hooks(connection: DatabaseConnection) -> tuple[list[Hook], list[Hook]]:
    """Hooks run by every psycopg2 cursor of `connection` before and after it sends a statement (given the
    driver connection and the SQL): at the driver itself, which every path reaches, SQLAlchemy's or not."""
    engine = connection.engine
    hooks = _DRIVER_HOOKS.get(engine)
    if hooks is None:
        import psycopg2.extensions

        before: list[Hook] = []
        after: list[Hook] = []
        hooks = _DRIVER_HOOKS[engine] = (before, after)

        class Hooked(psycopg2.extensions.cursor):  # type: ignore[misc]
            def execute(self, query: Any, variables: Any = None) -> Any:
                statement = query if isinstance(query, str) else query.decode()
                for hook in before:
                    hook(self.connection, statement)
                result = super().execute(query, variables)
                for hook in after:
                    hook(self.connection, statement)
                return result

        @event.listens_for(engine, "connect")
        def hook_cursors(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.cursor_factory = Hooked

        engine.dispose()
    return hooks


def _once(prefix: str, action: Callable[[Any], None]) -> Hook:
    state = {"left": 1}

    def hook(driver: Any, statement: str) -> None:
        if state["left"] and statement.lstrip().upper().startswith(prefix):
            state["left"] -= 1
            action(driver)

    return hook


def lose_the_answer(connection: DatabaseConnection, statement: str) -> None:
    """Lose the answer to the next `statement`: on PostgreSQL to the statement itself (it ran, and in
    autocommit committed, then the connection drops), on SQLite to the COMMIT after it."""
    if connection.config.backend != "postgresql":
        lose_the_answer_to_commit(connection.engine)
        return

    def drop(driver: Any) -> None:
        driver.close()
        raise driver.OperationalError("server closed the connection unexpectedly")  # the driver's own

    driver_hooks(connection)[1].append(_once(statement, drop))


def drop_before_sending(connection: DatabaseConnection, prefix: str) -> None:
    """The connection drops just before the next statement starting with `prefix` leaves: it never runs."""
    if connection.config.backend == "postgresql":
        driver_hooks(connection)[0].append(_once(prefix, lambda driver: driver.close()))
        return
    state = {"left": 1}

    @event.listens_for(connection.engine, "before_cursor_execute")
    def drop(conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if state["left"] and statement.lstrip().upper().startswith(prefix):
            state["left"] -= 1
            conn.connection.dbapi_connection.close()


def count_statements(connection: DatabaseConnection, prefix: str) -> list[str]:
    """Every statement starting with `prefix` sent from now on."""
    seen: list[str] = []

    def record(_driver: Any, statement: str) -> None:
        if statement.lstrip().upper().startswith(prefix):
            seen.append(statement)

    if connection.config.backend == "postgresql":
        driver_hooks(connection)[0].append(record)
    else:

        @event.listens_for(connection.engine, "before_cursor_execute")
        def recorded(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
            record(None, statement)

    return seen


def test_an_increment_whose_commit_answer_was_lost_is_sent_again_and_counts_once(
    connection: DatabaseConnection, repo: TaskRepository
) -> None:
    task = repo.create(task_data())
    # PostgreSQL: one statement (WITH added AS (UPDATE ... unless the id is recorded) INSERT the id) that commits
    # on its own. SQLite: the UPDATE, then INSERT the id, in one transaction.
    first = "WITH" if connection.config.backend == "postgresql" else "UPDATE"
    sent = count_statements(connection, first)
    lose_the_answer(connection, first)
    assert repo.update_statistics(task.uuid, llm_calls=1, tokens=5) is True
    assert len(sent) == 2 and "task_operations" in sent[0] and sent[0] == sent[1]
    found = repo.get_by_uuid(task.uuid)
    assert found is not None and (found.llm_call_count, found.total_tokens) == (1, 5)


def test_a_refused_increment_whose_answer_was_lost_stays_refused_and_leaves_its_id_unused(
    connection: DatabaseConnection, repo: TaskRepository
) -> None:
    first = "WITH" if connection.config.backend == "postgresql" else "UPDATE"
    missing, operation = str(uuid.uuid4()), str(uuid.uuid4())
    lose_the_answer(connection, first)
    assert repo.update_statistics(missing, llm_calls=3, operation_id=operation) is False
    full = repo.create(task_data())
    assert repo.update_statistics(full.uuid, tokens=2_147_483_647) is True
    lose_the_answer(connection, first)
    with pytest.raises(ValueError, match="past"):
        repo.update_statistics(full.uuid, tokens=1, operation_id=operation)
    # The id was never spent: the same call, once its task exists, counts.
    repo.create(task_data(uuid=missing))
    assert repo.update_statistics(missing, llm_calls=3, operation_id=operation) is True
    found = repo.get_by_uuid(missing)
    assert found is not None and found.llm_call_count == 3


def test_a_create_of_a_known_uuid_whose_connection_dropped_is_still_refused(
    connection: DatabaseConnection, repo: TaskRepository
) -> None:
    earlier = repo.create(task_data(status="failed"))
    drop_before_sending(connection, "INSERT")
    # The row found after the drop is the earlier task's, not one this call wrote.
    with pytest.raises(TaskAlreadyExistsError):
        repo.create(task_data(uuid=earlier.uuid))
    found = repo.get_by_uuid(earlier.uuid)
    assert found is not None and found.status == "failed"


def test_expired_operation_ids_are_deleted_in_batches_and_recent_ones_kept(
    connection: DatabaseConnection, repo: TaskRepository
) -> None:
    task = repo.create(task_data())
    old = utcnow() - OPERATION_RETENTION - timedelta(hours=1)
    recent = utcnow() - OPERATION_RETENTION + timedelta(hours=1)
    rows = [{"operation_id": str(uuid.uuid4()), "recorded_at": old} for _ in range(EXPIRY_BATCH * 2 + 10)]
    kept = [{"operation_id": str(uuid.uuid4()), "recorded_at": recent} for _ in range(5)]
    with connection.engine.begin() as raw:
        raw.execute(insert(TaskOperation), rows + kept)
    TaskRepository.next_expiry = 0.0  # this process's first increment expires
    assert repo.update_statistics(task.uuid, llm_calls=1) is True
    with connection.engine.connect() as raw:
        left = {str(value).lower() for value in raw.execute(select(TaskOperation.operation_id)).scalars()}
    assert {row["operation_id"] for row in kept} <= left and len(left) == len(kept) + 1
    # Once an hour per process: ids that expire meanwhile wait for the next hour.
    with connection.engine.begin() as raw:
        raw.execute(insert(TaskOperation), rows[:3])
    assert repo.update_statistics(task.uuid, llm_calls=1) is True
    with connection.engine.connect() as raw:
        assert raw.execute(select(func.count()).select_from(TaskOperation)).scalar_one() == len(kept) + 2 + 3


def test_work_that_sets_values_is_redone_after_a_lost_commit(
    connection: DatabaseConnection, repo: TaskRepository
) -> None:
    task = repo.create(task_data())
    updates = count_statements(connection, "UPDATE")
    lose_the_answer(connection, "UPDATE")
    assert repo.complete(task.uuid) is True
    assert len(updates) == 2
    assert (found := repo.get_by_uuid(task.uuid)) is not None and found.status == "completed"


def test_a_create_whose_commit_answer_was_lost_is_looked_up(
    connection: DatabaseConnection, repo: TaskRepository
) -> None:
    inserts = count_statements(connection, "INSERT")
    lose_the_answer(connection, "INSERT")
    task = repo.create(task_data())
    # Looked up and found: not sent again (which would have reported the task's own row as a duplicate).
    assert len(inserts) == 1 and repo.get_by_uuid(task.uuid) is not None


def test_a_delete_whose_answer_was_lost_is_looked_up(connection: DatabaseConnection, repo: TaskRepository) -> None:
    task = repo.create(task_data())
    deletes = count_statements(connection, "DELETE")
    lose_the_answer(connection, "DELETE")
    assert repo.delete(task.uuid) is True
    assert len(deletes) == 1 and repo.get_by_uuid(task.uuid) is None


def test_a_delete_that_never_left_is_sent_again(connection: DatabaseConnection, repo: TaskRepository) -> None:
    task = repo.create(task_data())
    deletes = count_statements(connection, "DELETE")
    drop_before_sending(connection, "DELETE")
    assert repo.delete(task.uuid) is True
    assert len(deletes) == 2 and repo.get_by_uuid(task.uuid) is None


def test_an_increment_that_never_left_is_sent_again_once(connection: DatabaseConnection, repo: TaskRepository) -> None:
    task = repo.create(task_data())
    first = "WITH" if connection.config.backend == "postgresql" else "UPDATE"
    sent = count_statements(connection, first)
    drop_before_sending(connection, first)
    assert repo.update_statistics(task.uuid, llm_calls=1, tokens=5) is True
    assert len(sent) == 2
    found = repo.get_by_uuid(task.uuid)
    assert found is not None and (found.llm_call_count, found.total_tokens) == (1, 5)


# Start-up retry: a server that comes up inside the window is reached


def test_start_up_waits_for_a_server_that_comes_up_in_time(own_cluster: PostgresServer) -> None:
    cluster = own_cluster.cluster
    assert cluster is not None
    cluster.shutdown("fast")
    threading.Timer(1.5, cluster.resume).start()
    config = DatabaseConfig(url=own_cluster.url.render_as_string(hide_password=False), startup_timeout=60)
    started = time.monotonic()
    connection = DatabaseConnection.initialize(config)
    assert connection.health_check()
    assert 1.0 < time.monotonic() - started < config.startup_timeout


def test_start_up_gives_up_after_its_timeout(refused_port: int) -> None:
    config = DatabaseConfig(type="postgresql", host="127.0.0.1", port=refused_port, startup_timeout=1.0)
    started = time.monotonic()
    with pytest.raises(DatabaseUnavailableError, match=r"gave up after \d"):
        DatabaseConnection.initialize(config)
    assert config.startup_timeout <= time.monotonic() - started < config.startup_timeout + 5


# Logs: a miss is DEBUG for get_by_uuid, WARNING for what changes data


def test_misses_are_logged_at_the_right_level(repo: TaskRepository, caplog: pytest.LogCaptureFixture) -> None:
    missing = str(uuid.uuid4())
    calls: dict[str, Callable[[], object]] = {
        "get_by_uuid": lambda: repo.get_by_uuid(missing),
        "update": lambda: repo.update(missing, {"model": "m"}),
        "update_status": lambda: repo.update_status(missing, "stopped"),
        "update_statistics": lambda: repo.update_statistics(missing, tokens=1),
        "complete": lambda: repo.complete(missing),
        "fail": lambda: repo.fail(missing, "x"),
        "delete": lambda: repo.delete(missing),
    }
    for name, call in calls.items():
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="db.repositories.task_repository"):
            assert call() in (None, False)
        levels = {record.levelname for record in caplog.records if missing in record.getMessage()}
        if name == "get_by_uuid":
            assert levels == {"DEBUG"}
        else:
            assert "WARNING" in levels, name


# updated_at moves with every change


def test_every_mutation_moves_updated_at(repo: TaskRepository) -> None:
    task = repo.create(task_data())
    assert task.updated_at == task.created_at or task.updated_at >= task.created_at
    mutations: list[Callable[[], object]] = [
        lambda: repo.update(task.uuid, {"model": "m"}),
        lambda: repo.update_status(task.uuid, "running"),
        lambda: repo.update_statistics(task.uuid, tokens=1),
        lambda: repo.complete(task.uuid),
        lambda: repo.fail(task.uuid, "boom"),
        lambda: repo.update_status(task.uuid, "stopped", "by the user"),
    ]
    previous = task.updated_at
    for mutation in mutations:
        time.sleep(0.002)
        mutation()
        found = repo.get_by_uuid(task.uuid)
        assert found is not None and found.updated_at > previous
        previous = found.updated_at


# The schema itself


EXPECTED_COLUMNS: dict[str, tuple[bool, int | None]] = {
    # column: (nullable, length of a string column)
    "uuid": (False, None),
    "task_source": (False, 50),
    "owner": (False, 255),
    "repo": (False, 255),
    "task_type": (False, 50),
    "task_id": (False, 50),
    "status": (False, 20),
    "started_at": (True, None),
    "completed_at": (True, None),
    "process_id": (True, None),
    "hostname": (True, 255),
    "llm_provider": (True, 50),
    "model": (True, 100),
    "context_length": (True, None),
    "llm_call_count": (False, None),
    "tool_call_count": (False, None),
    "total_tokens": (False, None),
    "compression_count": (False, None),
    "error_message": (True, None),
    "user": (True, 255),
    "created_at": (False, None),
    "updated_at": (False, None),
}


def test_the_migrated_schema_is_the_designed_one(blank_connection: DatabaseConnection) -> None:
    upgrade_schema(blank_connection)
    inspector = inspect(blank_connection.engine)
    columns = {column["name"]: column for column in inspector.get_columns("tasks")}
    assert set(columns) == set(EXPECTED_COLUMNS)
    for name, (nullable, length) in EXPECTED_COLUMNS.items():
        column = columns[name]
        assert bool(column["nullable"]) == nullable, name
        if length is not None:
            assert getattr(column["type"], "length", None) == length, name
    for counter in ("llm_call_count", "tool_call_count", "total_tokens", "compression_count"):
        assert str(columns[counter]["default"]).strip("'()") == "0", counter
    assert inspector.get_pk_constraint("tasks")["constrained_columns"] == ["uuid"]
    indexes = {index["name"]: index["column_names"] for index in inspector.get_indexes("tasks")}
    assert indexes == EXPECTED_INDEXES
    repo = TaskRepository(blank_connection)
    task = repo.create(task_data())
    assert (task.status, task.llm_call_count, task.total_tokens) == ("running", 0, 0)
    assert isinstance(task.created_at, datetime) and task.created_at.utcoffset() is not None


# Configuration: a URL of another dialect


def test_a_url_of_another_dialect_is_taken_at_its_word() -> None:
    config = DatabaseConfig(url="mysql://agent:hunter2@db.example/tasks")
    assert (config.type, config.backend) == ("mysql", "mysql")
    assert "hunter2" not in config.safe_url and "hunter2" not in repr(config)
    with pytest.raises(DatabaseConfigError, match="unknown database type") as refused:
        DatabaseConfig(url="nosuchdb://agent:hunter2@db.example/tasks")
    assert "hunter2" not in str(refused.value)


# Sessions: a scope closes and removes its session


def test_session_scope_closes_its_session(connection: DatabaseConnection) -> None:
    with connection.session_scope() as session:
        assert connection.session_factory.registry.has()
        assert session.in_transaction()
    assert not connection.session_factory.registry.has()
    assert not session.in_transaction()
    with pytest.raises(RuntimeError), connection.session_scope() as failing:
        raise RuntimeError("boom")
    assert not connection.session_factory.registry.has() and not failing.in_transaction()


# SQLite: writers that read, then write, wait their turn instead of failing or retrying


def test_sqlite_writers_reading_then_writing_wait_their_turn(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    connection = DatabaseConnection.initialize(DatabaseConfig(sqlite_path=str(tmp_path / "tasks.db")))
    upgrade_schema(connection)
    repo = TaskRepository(connection)
    task = repo.create(task_data())
    failures: list[BaseException] = []
    start = threading.Barrier(8)

    def writer(index: int) -> None:
        try:
            start.wait()
            for round_ in range(25):
                assert repo.update(task.uuid, {"model": f"m{index}-{round_}", "process_id": index}) is not None
        except BaseException as exc:
            failures.append(exc)

    with caplog.at_level(logging.WARNING):
        threads = [threading.Thread(target=writer, args=(index,)) for index in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert failures == []
    assert not [record.getMessage() for record in caplog.records if "retrying" in record.getMessage()]


# The TaskContextManager: stop() moves the directory; an injected repository is the one used


def test_stop_moves_the_directory_to_completed(agent_config: dict[str, Any]) -> None:
    key = str(uuid.uuid4())
    manager = TaskContextManager(GitHubIssueTaskKey("a", "b", 1), key, agent_config)
    manager.get_message_store().add_message("user", "hello")
    manager.stop()
    base = Path(agent_config["context_storage"]["base_dir"])
    assert not (base / "running" / key).exists()
    assert (base / "completed" / key / "messages.jsonl").is_file()
    assert stored(key).status == "stopped"


def test_an_injected_repository_is_the_one_written(tmp_path: Path) -> None:
    elsewhere = DatabaseConnection(DatabaseConfig(sqlite_path=str(tmp_path / "elsewhere.db")))
    upgrade_schema(elsewhere)
    config = {
        "context_storage": {"base_dir": str(tmp_path / "contexts")},
        "llm": LLM,
        "database": {"sqlite": {"path": "configured.db"}},
    }
    manager = TaskContextManager(
        GitHubIssueTaskKey("a", "b", 1), str(uuid.uuid4()), config, repository=TaskRepository(elsewhere)
    )
    manager.update_statistics(tokens=3)
    manager.complete()
    task = TaskRepository(elsewhere).get_by_uuid(manager.uuid)
    assert task is not None and (task.status, task.total_tokens) == ("completed", 3)
    assert not (tmp_path / "contexts" / "configured.db").exists()
    elsewhere.dispose()


# Layers: context_storage never touches sqlite3 or SQLAlchemy itself


def test_context_storage_imports_neither_sqlite3_nor_sqlalchemy() -> None:
    for path in (ROOT / "context_storage").glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        imported = {
            alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
        }
        imported |= {(node.module or "").split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        assert not imported & {"sqlite3", "sqlalchemy"}, path.name


def test_single_statements_reach_postgresql_alone(scratch_database: Any) -> None:
    """No BEGIN, COMMIT or SET around a read or a single-statement write: one round trip each."""
    connection = DatabaseConnection.initialize(
        DatabaseConfig(url=scratch_database.render_as_string(hide_password=False))
    )
    upgrade_schema(connection)
    repo = TaskRepository(connection)
    tasks = [repo.create(task_data()) for _ in range(5)]
    with connection.engine.begin() as conn:
        conn.exec_driver_sql("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
    with connection.autocommit_session() as session:  # the bookkeeping itself sends no BEGIN or COMMIT
        session.execute(text("SELECT pg_stat_statements_reset()"))
    for task in tasks:
        assert repo.get_by_uuid(task.uuid) is not None
        assert repo.update_status(task.uuid, "running")
        assert repo.complete(task.uuid)
        assert repo.fail(task.uuid, "x")
        assert repo.update(task.uuid, {"model": "m"}) is not None
    repo.create(task_data())
    repo.list_by_status("failed")
    repo.count_by_status()
    assert repo.delete(tasks[0].uuid)
    with connection.autocommit_session() as session:
        calls = dict(
            session.execute(
                text(
                    "SELECT query, sum(calls) FROM pg_stat_statements "
                    "WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) GROUP BY query"
                )
            ).all()
        )
    assert not {
        query: count for query, count in calls.items() if query.split()[0].upper() in ("BEGIN", "COMMIT", "SET")
    }
    assert sum(count for query, count in calls.items() if query.lstrip().upper().startswith("UPDATE")) == 20
    assert sum(count for query, count in calls.items() if query.lstrip().upper().startswith("DELETE")) == 1
