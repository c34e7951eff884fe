"""Every task ends in one consistent state: the TaskContextManager against crashes, outages and misuse."""

from __future__ import annotations

import functools
import json
import logging
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg2
import pytest
from sqlalchemy import create_engine

from context_storage import GitHubIssueTaskKey, TaskContextManager, task_context_manager, unsaved
from context_storage.jsonl_log import JsonlLog
from context_storage.reconcile import find_discrepancies
from context_storage.task_lock import TaskAlreadyRunningError
from db import DatabaseConnection, TaskRepository
from db.models import INT_MAX
from db.schema import upgrade_schema
from db.startup import start_database
from tests.support.agent import LLM, counters, kept_statistics, stored
from tests.support.cli import ROOT, run
from tests.support.data import child_environment
from tools.postgres_server import PostgresServer

KEY = GitHubIssueTaskKey("acme", "web", 1)


@pytest.fixture(params=["sqlite-file", "postgresql"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def child(point: str, config: dict[str, Any], task_uuid: str, *, resume: bool = False) -> subprocess.Popen[str]:
    """An agent process that dies by SIGKILL at `point` (see tests/support/crash_child.py)."""
    env = child_environment()
    args = [sys.executable, "-m", "tests.support.crash_child", point, json.dumps(config), task_uuid]
    return subprocess.Popen(
        [*args, *(["resume"] if resume else [])],
        cwd=ROOT,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def killed(process: subprocess.Popen[str]) -> str:
    assert process.stdout is not None and process.stderr is not None
    if process.stdin is not None and not process.stdin.closed:
        process.stdin.close()
    out, err = process.stdout.read(), process.stderr.read()
    assert process.wait(timeout=120) == -9, err
    return out


def metadata(directory: Path) -> dict[str, Any]:
    return dict(json.loads((directory / "metadata.json").read_text(encoding="utf-8")))


# 1. A second finish leaves the first outcome and the directory as they are


def test_finishing_twice_keeps_the_first_outcome_and_the_files(
    agent_config: dict[str, Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    key = str(uuid.uuid4())
    manager = TaskContextManager(KEY, key, agent_config)
    manager.get_message_store().add_message("user", "one")
    manager.fail("tests failed")
    with caplog.at_level(logging.WARNING):
        manager.update_statistics(tokens=5)
        manager.complete()
    completed = Path(agent_config["context_storage"]["base_dir"]) / "completed"
    assert sorted(path.name for path in completed.iterdir()) == [key]
    assert (stored(key).status, stored(key).error_message, stored(key).total_tokens) == ("failed", "tests failed", 5)
    assert any("already finished as failed" in record.getMessage() for record in caplog.records)
    resumed = TaskContextManager(KEY, key, agent_config, is_resumed=True)
    assert resumed.get_message_store().count_messages() == 1
    assert resumed.get_message_store().add_message("user", "two") == 2


# 2. Torn last lines are set apart, readers skip them, nothing raises


def test_a_torn_multibyte_line_is_set_apart_in_every_file(agent_config: dict[str, Any]) -> None:
    manager = TaskContextManager(KEY, str(uuid.uuid4()), agent_config)
    store = manager.get_message_store()
    store.add_message("user", "éé" * 100)
    manager.get_tool_store().add_tool_call("sh", {}, "ok", "success", 1.0)
    manager.get_summary_store().add_summary(1, 1, "short", 10, 2)
    directory = manager.context_dir
    for name in ("messages.jsonl", "current.jsonl", "tools.jsonl", "summaries.jsonl"):
        line = ('{"seq": 9, "content": "' + "é" * 50).encode("utf-8")
        with (directory / name).open("ab") as handle:
            handle.write(line[:-1])  # a crash in the middle of a two-byte character
    assert store.get_current_token_count() == 50
    assert store.get_current_context_file().read_bytes().count(b"\n") == 1
    assert store.add_message("assistant", "après") == 2
    assert manager.get_tool_store().add_tool_call("sh", {}, "ok", "success", 1.0) == 2
    assert manager.get_summary_store().add_summary(1, 2, "later", 10, 2) == 2
    assert store.get_current_token_count() == 51
    for name in ("messages.jsonl", "current.jsonl", "tools.jsonl", "summaries.jsonl"):
        lines = (directory / name).read_bytes().splitlines()
        assert len(lines) == 2 and all(json.loads(line) for line in lines), name
        assert (directory / f"{name}.torn").read_bytes().startswith(b'{"seq": 9'), name
    combined = store.get_current_context_file(directory / "tools.jsonl")
    assert len(combined.read_text(encoding="utf-8").splitlines()) == 4


def test_long_records_are_read_whole_across_chunks(tmp_path: Path) -> None:
    log = JsonlLog(tmp_path / "log.jsonl")
    sizes = [10, 70_000, 5, 200_000, 65_536, 1]
    for size in sizes:
        log.append({"text": "ü" * size})
    assert [len(record["text"]) for record in log.reversed_records()] == sizes[::-1]
    assert log.last_number() == len(sizes)
    assert [len(record["text"]) for record in log.tail(3)] == sizes[-3:]


# 3. A database lost after registration: one wait, then the task goes on; the outcome is kept


def test_a_lost_database_is_waited_for_once_and_the_outcome_is_kept(
    own_cluster: PostgresServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cluster = own_cluster.cluster
    assert cluster is not None
    config = {
        "context_storage": {"base_dir": str(tmp_path / "contexts")},
        "llm": LLM,
        "database": {"url": own_cluster.url.render_as_string(hide_password=False), "retry_timeout": 1},
    }
    key = str(uuid.uuid4())
    manager = TaskContextManager(KEY, key, config)
    cluster.shutdown("immediate")
    with caplog.at_level(logging.ERROR, logger="context_storage.task_context_manager"):
        for _ in range(5):
            manager.update_statistics(tokens=10)
        manager.complete()
    failed_writes = [record for record in caplog.records if "failed, the task goes on" in record.getMessage()]
    assert len(failed_writes) == 1, [record.getMessage() for record in caplog.records]
    kept = metadata(manager.context_dir)["unsaved"]
    assert kept["outcome"]["status"] == "completed"
    assert kept_statistics(metadata(manager.context_dir))["tokens"] == 50
    cluster.resume()
    DatabaseConnection.reset()
    start_database(config)
    assert stored(key).status == "running"
    (tmp_path / "config.yaml").write_text(json.dumps(config), encoding="utf-8")
    listed = run(tmp_path, "tasks", "reconcile")
    assert listed.returncode == 1 and "the row says running, the task ended completed" in listed.stdout
    fixed = run(tmp_path, "tasks", "reconcile", "--yes")
    assert fixed.returncode == 0, fixed.stderr + fixed.stdout
    row = stored(key)
    assert (row.status, row.total_tokens) == ("completed", 50)
    assert "unsaved" not in metadata(manager.context_dir)
    assert run(tmp_path, "tasks", "reconcile").returncode == 0


# 4. Statistics kept on disk leave it only once written, and are written once


def _finished_with_kept_statistics(config: dict[str, Any], key: str) -> Path:
    """A task that ended while its database was away: {tokens 60} and its outcome wait in metadata.json."""
    manager = TaskContextManager(KEY, key, config)
    manager.complete()
    data = metadata(manager.context_dir)
    data["unsaved"] = {"statistics": {"llm_calls": 2, "tool_calls": 4, "tokens": 60, "compressions": 0}}
    (manager.context_dir / "metadata.json").write_text(json.dumps(data), encoding="utf-8")
    return manager.context_dir


def test_kept_statistics_survive_a_crash_before_they_are_written(
    agent_config: dict[str, Any],
    refused_port: int,
) -> None:
    key = str(uuid.uuid4())
    _finished_with_kept_statistics(agent_config, key)
    down = json.loads(json.dumps(agent_config))
    down["database"] = {
        "type": "postgresql",
        "postgresql": {"host": "127.0.0.1", "port": refused_port},
        "startup_timeout": 0,
    }
    killed(child("after-registration", down, key, resume=True))
    running = Path(agent_config["context_storage"]["base_dir"]) / "running" / key
    assert kept_statistics(metadata(running))["tokens"] == 60
    again = child("never", agent_config, key, resume=True)
    assert again.communicate(timeout=120)[0].endswith("finished\n")
    assert counters(stored(key)) == (2 + 1, 4, 60 + 10, 0)


def test_kept_statistics_are_not_written_twice_after_a_crash_that_follows_the_write(
    agent_config: dict[str, Any],
) -> None:
    key = str(uuid.uuid4())
    _finished_with_kept_statistics(agent_config, key)
    killed(child("after-kept-statistics-write", agent_config, key, resume=True))
    assert counters(stored(key)) == (2, 4, 60, 0)
    again = child("never", agent_config, key, resume=True)
    assert again.communicate(timeout=120)[0].endswith("finished\n")
    assert counters(stored(key)) == (2 + 1, 4, 60 + 10, 0)


@pytest.mark.parametrize("backend", ["postgresql"])
def test_kept_statistics_sent_by_an_agent_killed_before_the_answer_count_once(agent_config: dict[str, Any]) -> None:
    key = str(uuid.uuid4())
    _finished_with_kept_statistics(agent_config, key)
    url = DatabaseConnection.get_instance().config.sqlalchemy_url
    connect = functools.partial(
        psycopg2.connect, host=url.host, port=url.port, user=url.username, password=url.password, dbname=url.database
    )
    holder, watcher = connect(), connect()
    watcher.autocommit = True

    def waiting() -> int:
        with watcher.cursor() as cursor:
            cursor.execute(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE wait_event_type = 'Lock' AND query LIKE '%%INSERT INTO task_operations%%'"
            )
            return int(cursor.fetchone()[0])

    def until(condition: Callable[[], bool]) -> None:
        deadline = time.monotonic() + 30
        while not condition() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert condition()

    try:
        # Operation ids cannot be written for now: the kept batch's statement reaches the server and waits there.
        holder.cursor().execute("LOCK TABLE task_operations IN EXCLUSIVE MODE")
        sender = child("sending-kept-statistics", agent_config, key, resume=True)
        until(lambda: waiting() >= 1)
        sender.kill()  # the agent dies; its statement lives on in the server and will commit
        killed(sender)
        again = child("never", agent_config, key, resume=True)
        until(lambda: waiting() >= 2)
        holder.commit()
        assert again.communicate(timeout=120)[0].endswith("finished\n")
    finally:
        holder.close()
        watcher.close()
    # The batch landed once, by whichever send; the resumed run added its own.
    assert counters(stored(key)) == (2 + 1, 4, 60 + 10, 0)


def test_many_kept_batches_are_sent_with_one_rewrite_of_metadata_json(
    agent_config: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    key = str(uuid.uuid4())
    directory = _finished_with_kept_statistics(agent_config, key)
    data = metadata(directory)
    sent_at = datetime.now(UTC).isoformat()
    data["unsaved"] = {
        "in_flight": [
            {"statistics": {"tokens": 1}, "operation_id": str(uuid.uuid4()), "sent_at": sent_at} for _ in range(300)
        ]
    }
    (directory / "metadata.json").write_text(json.dumps(data), encoding="utf-8")
    writes: list[int] = []
    real = unsaved.write_metadata
    monkeypatch.setattr(unsaved, "write_metadata", lambda *args: (writes.append(1), real(*args))[1])
    TaskContextManager(KEY, key, agent_config, is_resumed=True).complete()
    assert counters(stored(key))[2] == 300
    assert len(writes) == 1


def test_reconcile_writes_kept_statistics_before_the_outcome_that_would_move_the_row(
    agent_config: dict[str, Any],
) -> None:
    key = str(uuid.uuid4())
    directory = _finished_with_kept_statistics(agent_config, key)
    repository = TaskRepository()
    repository.update(key, {"status": "running", "completed_at": None})
    row = stored(key)
    data = metadata(directory)
    # A batch from before operation ids, decided by its row: it never landed while updated_at is unchanged.
    batch = {"statistics": {"tokens": 60}, "row_version": row.updated_at.isoformat()}
    data["unsaved"] = {"in_flight": batch, "outcome": {"status": "completed", "error_message": None}}
    (directory / "metadata.json").write_text(json.dumps(data), encoding="utf-8")
    found = find_discrepancies(Path(agent_config["context_storage"]["base_dir"]), repository)
    outcome = next(item for item in found if item.fix and item.fix.startswith("set the row to"))
    assert outcome.apply is not None
    outcome.apply()  # alone, first: it must not leave the batch to a row it moved on
    after = stored(key)
    assert (after.status, after.total_tokens) == ("completed", 60)
    for item in find_discrepancies(Path(agent_config["context_storage"]["base_dir"]), repository):
        if item.apply is not None:
            item.apply()
    assert stored(key).total_tokens == 60


# 5. An increment the counters cannot hold is refused at its call; the task finishes


def test_an_increment_past_integer_is_refused_and_the_task_goes_on(agent_config: dict[str, Any]) -> None:
    key = str(uuid.uuid4())
    manager = TaskContextManager(KEY, key, agent_config)
    manager.update_statistics(tokens=INT_MAX - 1)
    with pytest.raises(ValueError, match="cannot take"):
        manager.update_statistics(llm_calls=1, tokens=2)
    assert manager.pending_statistics["tokens"] == 0
    manager.update_statistics(llm_calls=1)
    manager.update_status("running")
    manager.complete()
    row = stored(key)
    assert (row.status, row.llm_call_count, row.total_tokens) == ("completed", 1, INT_MAX - 1)


# 6. A duplicate start is refused while the first is alive, taken over once it is gone


def test_a_duplicate_start_is_refused_while_the_first_lives(agent_config: dict[str, Any]) -> None:
    key = str(uuid.uuid4())
    first = TaskContextManager(KEY, key, agent_config)
    with pytest.raises(TaskAlreadyRunningError, match=f"process {os.getpid()}"):
        TaskContextManager(KEY, key, agent_config)
    first.complete()
    holder = child("hold", agent_config, key, resume=True)
    assert holder.stdout is not None and holder.stdout.readline() == "started\n"
    with pytest.raises(TaskAlreadyRunningError, match=f"process {holder.pid}"):
        TaskContextManager(KEY, key, agent_config, is_resumed=True)
    assert holder.stdin is not None
    holder.stdin.close()
    killed(holder)
    taken_over = TaskContextManager(KEY, key, agent_config, is_resumed=True)
    assert taken_over.get_message_store().count_messages() == 1
    taken_over.complete()
    assert stored(key).status == "completed"


def test_threads_starting_the_same_task_get_one_manager(agent_config: dict[str, Any]) -> None:
    key = str(uuid.uuid4())
    outcomes: list[str] = []
    start = threading.Barrier(4)

    def begin() -> None:
        start.wait()
        try:
            TaskContextManager(KEY, key, agent_config)
            outcomes.append("started")
        except TaskAlreadyRunningError:
            outcomes.append("refused")

    workers = [threading.Thread(target=begin) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert sorted(outcomes) == ["refused"] * 3 + ["started"]


# 7. Resuming a failed task clears its old outcome


def test_resume_clears_the_old_outcome(agent_config: dict[str, Any]) -> None:
    key = str(uuid.uuid4())
    TaskContextManager(KEY, key, agent_config).fail("LLM timeout")
    resumed = TaskContextManager(KEY, key, agent_config, is_resumed=True)
    row = stored(key)
    assert (row.status, row.error_message, row.completed_at) == ("running", None, None)
    data = metadata(resumed.context_dir)
    assert data["status"] == "running" and "error_message" not in data and "completed_at" not in data
    resumed.complete()
    assert (stored(key).status, stored(key).error_message) == ("completed", None)


# 8. A crash between the row and the move: tasks reconcile


def test_reconcile_moves_a_directory_left_behind_by_a_crash(agent_config: dict[str, Any], tmp_path: Path) -> None:
    start_database(agent_config)
    key = str(uuid.uuid4())
    killed(child("before-move", agent_config, key))
    base = Path(agent_config["context_storage"]["base_dir"])
    assert stored(key).status == "completed" and (base / "running" / key).is_dir()
    found = find_discrepancies(base, TaskRepository())
    assert [(item.uuid, item.fix) for item in found] == [(key, f"move it to completed/{key}")]
    for item in found:
        assert item.apply is not None
        item.apply()
    assert (base / "completed" / key / "messages.jsonl").is_file() and not (base / "running" / key).exists()
    assert find_discrepancies(base, TaskRepository()) == []


# 10. A damaged metadata.json never loses the task


@pytest.mark.parametrize("content", [b"", b'{"uuid": "abc", "task_k'])
def test_a_damaged_metadata_file_is_set_aside_on_resume(agent_config: dict[str, Any], content: bytes) -> None:
    key = str(uuid.uuid4())
    first = TaskContextManager(KEY, key, agent_config)
    first.get_message_store().add_message("user", "kept")
    first.complete()
    (first.context_dir / "metadata.json").write_bytes(content)
    resumed = TaskContextManager(KEY, key, agent_config, is_resumed=True)
    assert resumed.context_dir.parent.name == "running"
    assert resumed.get_message_store().count_messages() == 1
    assert metadata(resumed.context_dir)["task_key"] == KEY.to_dict()
    assert [path.read_bytes() for path in resumed.context_dir.glob("metadata.json.damaged-*")] == [content]
    resumed.complete()


# 11. A lock held on tasks makes a write give up, not the agent wait


@pytest.mark.parametrize("backend", ["postgresql"])
def test_a_locked_table_makes_a_write_give_up_and_keep_its_statistics(
    agent_config: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(task_context_manager, "START_AGAIN_AFTER_SECONDS", 0.0)
    config = json.loads(json.dumps(agent_config))
    config["database"].update(lock_timeout=0.3, retry_timeout=0.5)
    key = str(uuid.uuid4())
    manager = TaskContextManager(KEY, key, config)
    url = DatabaseConnection.get_instance().config.sqlalchemy_url
    engine = create_engine(url)
    try:
        with engine.connect() as other, caplog.at_level(logging.ERROR):
            transaction = other.begin()
            other.exec_driver_sql("LOCK TABLE tasks IN ACCESS EXCLUSIVE MODE")
            manager.update_statistics(llm_calls=1, tokens=7)
            assert manager.pending_statistics["tokens"] == 7
            assert any("lock timeout" in record.getMessage() for record in caplog.records)
            transaction.rollback()
    finally:
        engine.dispose()
    manager.complete()
    row = stored(key)
    assert (row.status, row.total_tokens) == ("completed", 7)


@pytest.mark.parametrize("backend", ["postgresql"])
def test_a_migration_takes_its_locks_with_a_short_timeout_and_tries_again(
    blank_connection: DatabaseConnection, caplog: pytest.LogCaptureFixture
) -> None:
    engine = create_engine(blank_connection.config.sqlalchemy_url)
    upgrade_schema(blank_connection)
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP INDEX ix_tasks_status_created_at")
        conn.exec_driver_sql("DROP INDEX ix_tasks_user_created_at")
        conn.exec_driver_sql("DROP TABLE task_operations")
        conn.exec_driver_sql("DROP TABLE task_heartbeats")
        conn.exec_driver_sql("DROP TABLE token_usage_buckets")
        conn.exec_driver_sql("UPDATE alembic_version SET version_num = '0001'")
    holder = engine.connect()
    transaction = holder.begin()
    # Another transaction holds a lock the migration's CREATE INDEX must wait for.
    holder.exec_driver_sql("LOCK TABLE tasks IN SHARE ROW EXCLUSIVE MODE")
    released = threading.Timer(3.0, transaction.rollback)
    released.start()
    try:
        with caplog.at_level(logging.WARNING, logger="db.schema"):
            upgrade_schema(blank_connection)
    finally:
        released.join()
        holder.close()
        engine.dispose()
    assert any("trying again" in record.getMessage() for record in caplog.records)
    assert TaskRepository(blank_connection).count_by_status()["running"] == 0


def test_statement_and_lock_timeouts_reach_the_server(postgres_url: Any) -> None:
    from db import DatabaseConfig

    connection = DatabaseConnection.initialize(
        DatabaseConfig(url=postgres_url.render_as_string(hide_password=False), lock_timeout=2.5)
    )
    with connection.engine.connect() as conn:
        assert conn.exec_driver_sql("SHOW lock_timeout").scalar_one() == "2500ms"
        assert conn.exec_driver_sql("SHOW statement_timeout").scalar_one() == "30s"


# 9. Counting costs what changed: the running count always equals a count made afresh


def test_the_running_token_count_equals_a_fresh_count(tmp_path: Path) -> None:
    from context_storage import MessageStore

    store = MessageStore(tmp_path, {})
    rest = tmp_path / "rest.jsonl"
    for index in range(30):
        store.add_message("user", "x" * (index * 7))
        if index % 4 == 0:
            assert store.get_current_token_count() == MessageStore(tmp_path, {}).get_current_token_count()
        if index == 20:
            rest.write_text('{"role": "user", "content": "kept"}\n', encoding="utf-8")
            store.recreate_current_context("summary " * 10, 25, rest)
            assert store.get_current_token_count() == MessageStore(tmp_path, {}).get_current_token_count()
    # current.jsonl: the summary, the kept line, then 9 messages: the last 11 messages by the counting rule.
    expected = (20 * 7) // 4 + 25 + sum((index * 7) // 4 for index in range(21, 30))
    assert store.get_current_token_count() == expected
    assert MessageStore(tmp_path, {}).get_current_token_count() == expected


# 2 and 10, killed for real: half a line or half a metadata.json on disk when the process dies


def test_a_process_killed_mid_append_leaves_files_the_next_run_reads(agent_config: dict[str, Any]) -> None:
    key = str(uuid.uuid4())
    killed(child("mid-append", agent_config, key))
    resumed = TaskContextManager(KEY, key, agent_config, is_resumed=True)
    store = resumed.get_message_store()
    assert store.count_messages() == 0  # the torn message is not counted...
    assert store.get_current_token_count() == 0
    assert store.add_message("user", "again") == 1  # ...and the next one is numbered as if it never was
    for name in ("messages.jsonl", "current.jsonl"):
        lines = (resumed.context_dir / name).read_bytes().splitlines()
        assert all(isinstance(json.loads(line), dict) for line in lines), name
    assert (resumed.context_dir / "messages.jsonl.torn").stat().st_size > 0
    resumed.complete()
    assert stored(key).status == "completed"


def test_a_process_killed_mid_metadata_write_loses_nothing(agent_config: dict[str, Any]) -> None:
    key = str(uuid.uuid4())
    killed(child("mid-metadata", agent_config, key))
    base = Path(agent_config["context_storage"]["base_dir"])
    running = base / "running" / key
    assert metadata(running)["uuid"] == key  # the old file, whole: the torn one was never renamed over it
    resumed = TaskContextManager(KEY, key, agent_config, is_resumed=True)
    assert resumed.get_message_store().add_message("user", "again") == 1
    resumed.complete()
    assert metadata(base / "completed" / key)["status"] == "completed"
    assert stored(key).status == "completed"
