"""Faults on real servers: restarts under load, answers lost after the commit, many writers on one SQLite file,
deadlocks."""

from __future__ import annotations

import json
import multiprocessing
import threading
import time
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.orm import Session

from db import DatabaseConfig, DatabaseConnection, TaskRepository
from db.schema import upgrade_schema
from db.unit_of_work import run_in_transaction
from tests.support.answer_cutter import AnswerCutter
from tests.support.data import task_data, url_config
from tests.support.workers import hammer, write_concurrently
from tools.postgres_server import PostgresServer

RETRY_TIMEOUT = 6.0


def test_restarts_under_load_reach_no_caller_and_count_every_call_once(
    own_cluster: PostgresServer, tmp_path: Path
) -> None:
    cluster = own_cluster.cluster
    assert cluster is not None
    own_cluster.execute_admin("CREATE DATABASE faults")
    url = own_cluster.database_url("faults").render_as_string(hide_password=False)
    upgrade_schema(DatabaseConnection.initialize(DatabaseConfig(url=url)))
    DatabaseConnection.reset()
    workers = 4
    stop = tmp_path / "stop"
    context = multiprocessing.get_context("spawn")
    outputs = [tmp_path / f"worker-{index}.json" for index in range(workers)]
    processes = [context.Process(target=hammer, args=(url, RETRY_TIMEOUT, str(stop), str(out))) for out in outputs]
    for process in processes:
        process.start()
    time.sleep(2.5)
    for mode in ("fast", "immediate", "fast", "immediate"):
        cluster.restart(mode)
        time.sleep(1.5)
    restarted = time.time() - 1.5
    time.sleep(2.0)  # the workers must show they recovered
    stop.touch()
    for process in processes:
        process.join(timeout=120)
    assert [process.exitcode for process in processes] == [0] * workers

    results = [json.loads(out.read_text(encoding="utf-8")) for out in outputs]
    DatabaseConnection.initialize(DatabaseConfig(url=url))
    repository = TaskRepository()
    for result in results:
        assert result["last_success"] > restarted, "a worker did not recover after the last restart"
        assert result["longest"] < RETRY_TIMEOUT + 5, f"a call waited {result['longest']:.1f}s"
        # Every call returned: none was told its outcome is unknown, none failed.
        assert (result["failures"], result["unknown"]) == (0, 0), result["messages"]
        for key, count in result["successes"].items():
            task = repository.get_by_uuid(key)
            assert task is not None, f"task {key} was reported created but is missing"
            # Each total is exactly the calls that returned: none lost, none counted twice.
            assert (task.llm_call_count, task.total_tokens) == (count, 3 * count), key
    assert sum(sum(result["successes"].values()) for result in results) > 100


def test_answers_lost_after_the_commit_are_sent_again_and_count_once(postgres_url: URL, tmp_path: Path) -> None:
    # Restarts cut few answers at the one instant that matters; this proxy cuts every 7th, after the commit.
    connection = DatabaseConnection.initialize(url_config(postgres_url))
    with connection.engine.begin() as raw:
        raw.exec_driver_sql(
            "DROP TABLE IF EXISTS alembic_version, tasks, task_operations, task_heartbeats, token_usage_buckets"
        )
    upgrade_schema(connection)
    DatabaseConnection.reset()
    server = (str(postgres_url.host), int(postgres_url.port or 5432))
    with AnswerCutter(server, b"INTO task_operations", every=7) as cutter:
        url = postgres_url.set(host="127.0.0.1", port=cutter.port).render_as_string(hide_password=False)
        stop = tmp_path / "stop"
        out = tmp_path / "worker.json"
        context = multiprocessing.get_context("spawn")
        process = context.Process(target=hammer, args=(url, RETRY_TIMEOUT, str(stop), str(out)))
        process.start()
        deadline = time.monotonic() + 60
        while cutter.cut < 20 and time.monotonic() < deadline and process.is_alive():
            time.sleep(0.1)
        stop.touch()
        process.join(timeout=60)
    assert process.exitcode == 0 and cutter.cut >= 20
    result = json.loads(out.read_text(encoding="utf-8"))
    assert (result["failures"], result["unknown"]) == (0, 0), result["messages"]
    DatabaseConnection.initialize(url_config(postgres_url))
    repository = TaskRepository()
    for key, count in result["successes"].items():
        task = repository.get_by_uuid(key)
        assert task is not None and (task.llm_call_count, task.total_tokens) == (count, 3 * count), key


def test_eight_processes_write_one_sqlite_file(tmp_path: Path) -> None:
    path = str(tmp_path / "tasks.db")
    connection = DatabaseConnection.initialize(DatabaseConfig(sqlite_path=path))
    upgrade_schema(connection)
    shared = TaskRepository(connection).create(task_data())
    DatabaseConnection.reset()
    processes, rounds = 8, 40
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=write_concurrently, args=(path, shared.uuid, rounds)) for _ in range(processes)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=300)
    assert [worker.exitcode for worker in workers] == [0] * processes
    connection = DatabaseConnection.initialize(DatabaseConfig(sqlite_path=path))
    repository = TaskRepository(connection)
    task = repository.get_by_uuid(shared.uuid)
    assert task is not None
    total = processes * rounds
    assert (task.llm_call_count, task.tool_call_count, task.total_tokens) == (total, total, 10 * total)
    completed = repository.list_by_status("completed", limit=100)
    assert len(completed) == processes and all(t.total_tokens == rounds for t in completed)


def test_a_deadlock_is_redone_transparently(postgres_url: URL) -> None:
    database = DatabaseConnection.initialize(url_config(postgres_url))
    with database.engine.begin() as raw:
        raw.exec_driver_sql("DROP TABLE IF EXISTS alembic_version")
        raw.exec_driver_sql("DROP TABLE IF EXISTS tasks")
        raw.exec_driver_sql("DROP TABLE IF EXISTS task_operations")
        raw.exec_driver_sql("DROP TABLE IF EXISTS task_heartbeats")
        raw.exec_driver_sql("DROP TABLE IF EXISTS token_usage_buckets")
    upgrade_schema(database)
    repository = TaskRepository(database)
    first, second = repository.create(task_data()), repository.create(task_data())
    barrier = threading.Barrier(2)
    attempts: list[str] = []

    def add_in_order(a: str, b: str) -> None:
        def work(session: Session) -> None:
            attempts.append(a)
            session.execute(text("UPDATE tasks SET tool_call_count = tool_call_count + 1 WHERE uuid = :u"), {"u": a})
            if len(attempts) <= 2:
                barrier.wait(timeout=10)  # both hold their first row: the second UPDATE deadlocks
            session.execute(text("UPDATE tasks SET tool_call_count = tool_call_count + 1 WHERE uuid = :u"), {"u": b})

        run_in_transaction(database, work, "deadlock test")

    threads = [
        threading.Thread(target=add_in_order, args=(first.uuid, second.uuid)),
        threading.Thread(target=add_in_order, args=(second.uuid, first.uuid)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(attempts) == 3, "one of the two transactions should have been chosen as the deadlock victim and redone"
    for key in (first.uuid, second.uuid):
        task = repository.get_by_uuid(key)
        assert task is not None and task.tool_call_count == 2
