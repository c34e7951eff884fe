"""Many agent processes through a real PgBouncer in transaction pooling mode, with PgBouncer and the server
restarted under load: every total exact, no error reaching an agent."""

from __future__ import annotations

import json
import multiprocessing
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from db import DatabaseConfig, DatabaseConnection, TaskRepository
from db.schema import upgrade_schema
from tests.support.workers import agent_life_cycles
from tools.pgbouncer import PgBouncer, PgBouncerUnavailableError
from tools.postgres_server import PostgresUnavailableError, ThrowawayCluster, find_bindir

PROCESSES, TASKS, ROUNDS = 16, 2, 15
SERVER_CONNECTIONS = 5


@pytest.fixture
def bouncer() -> Iterator[tuple[ThrowawayCluster, PgBouncer]]:
    """A cluster that takes 30 connections at most, and PgBouncer holding 5 of them for 'agent'."""
    bindir = find_bindir()
    if bindir is None:
        pytest.fail("PgBouncer tests need PostgreSQL's binaries: install the postgresql package", pytrace=False)
    cluster = ThrowawayCluster(bindir, {"max_connections": "30"})
    pgbouncer: PgBouncer | None = None
    try:
        try:
            cluster.start()
        except PostgresUnavailableError as exc:
            pytest.fail(f"the cluster for the PgBouncer tests did not start: {exc}", pytrace=False)
        admin = cluster.url
        import psycopg2

        conn = psycopg2.connect(
            host=admin.host, port=admin.port, user=admin.username, password=admin.password, dbname="postgres"
        )
        conn.autocommit = True
        with conn.cursor() as cursor:
            cursor.execute("CREATE ROLE agent LOGIN PASSWORD 'agent-pass'")
            cursor.execute("CREATE DATABASE agents OWNER agent")
        conn.close()
        try:
            pgbouncer = PgBouncer(admin, "agents", "agent", "agent-pass", pool_size=SERVER_CONNECTIONS)
            pgbouncer.start()
        except PgBouncerUnavailableError as exc:
            pytest.fail(f"PgBouncer tests need PgBouncer: {exc}", pytrace=False)
        yield cluster, pgbouncer
    finally:
        DatabaseConnection.reset()
        if pgbouncer is not None:
            pgbouncer.stop()
        cluster.stop()


def test_sixteen_agents_through_pgbouncer_and_its_server_restarted_under_load(
    bouncer: tuple[ThrowawayCluster, PgBouncer], tmp_path: Path
) -> None:
    cluster, pgbouncer = bouncer
    direct = cluster.url.set(username="agent", password="agent-pass", database="agents")
    upgrade_schema(DatabaseConnection.initialize(DatabaseConfig(url=direct.render_as_string(hide_password=False))))
    DatabaseConnection.reset()
    through = pgbouncer.url.render_as_string(hide_password=False)
    context = multiprocessing.get_context("spawn")
    outputs = [tmp_path / f"agent-{index}.json" for index in range(PROCESSES)]
    workers = [
        context.Process(target=agent_life_cycles, args=(through, str(tmp_path / "contexts"), TASKS, ROUNDS, str(out)))
        for out in outputs
    ]
    for worker in workers:
        worker.start()
    # Restart PgBouncer once the agents are at work: every client connection drops at once.
    deadline = time.monotonic() + 120
    while sum(1 for out in outputs if out.exists()) == 0 and time.monotonic() < deadline:
        if any((tmp_path / "contexts" / "completed").glob("*")):
            break
        time.sleep(0.2)
    pgbouncer.restart()
    # Then the server behind it, cleanly and as a crash: statements in flight lose their answers.
    for mode in ("fast", "immediate"):
        time.sleep(1.0)
        cluster.restart(mode)
    for worker in workers:
        worker.join(timeout=300)
    assert [worker.exitcode for worker in workers] == [0] * PROCESSES, pgbouncer.log_tail()
    results = [json.loads(out.read_text(encoding="utf-8")) for out in outputs]
    assert [result["errors"] for result in results if result["errors"]] == []
    # The restarts were felt (connections dropped and were retried), and reached no caller.
    assert sum(len(result["retried"]) for result in results) > 0
    DatabaseConnection.initialize(DatabaseConfig(url=direct.render_as_string(hide_password=False)))
    repository = TaskRepository()
    keys = [key for result in results for key in result["tasks"]]
    assert len(keys) == PROCESSES * TASKS
    for key in keys:
        task = repository.get_by_uuid(key)
        assert task is not None and task.status == "completed"
        assert (task.llm_call_count, task.tool_call_count, task.total_tokens) == (ROUNDS, 2 * ROUNDS, 10 * ROUNDS)
    with DatabaseConnection.get_instance().engine.connect() as conn:
        peak = conn.exec_driver_sql("SELECT count(*) FROM pg_stat_activity WHERE usename = 'agent'").scalar_one()
    assert peak <= SERVER_CONNECTIONS + 1
