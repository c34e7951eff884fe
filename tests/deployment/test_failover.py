"""Failover on real servers: a streaming standby made by pg_basebackup -R, promoted with pg_ctl promote when the
primary dies while spawned agents count; with synchronous replication nothing acknowledged is lost."""

from __future__ import annotations

import json
import multiprocessing
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient

from cli.serve import dashboard_source
from dashboard import Access, DashboardSettings, create_app
from db import DatabaseConfig, DatabaseConnection, TaskRepository
from db.schema import upgrade_schema
from ops.backup import backup_database, find_pg_tool
from tests.support.workers import hammer
from tools.postgres_server import SUPERUSER, SUPERUSER_PASSWORD, PostgresServer, ThrowawayCluster

RETRY_TIMEOUT = 20.0


@pytest.fixture
def standby(own_cluster: PostgresServer) -> Iterator[ThrowawayCluster]:
    primary = own_cluster.cluster
    assert primary is not None
    copy = primary.standby()
    try:
        yield copy
    finally:
        copy.stop()


def both_hosts(primary: ThrowawayCluster, standby: ThrowawayCluster, database: str) -> str:
    """The URL of the agents: both servers, the writable one chosen by libpq."""
    return (
        f"postgresql://{SUPERUSER}:{quote(SUPERUSER_PASSWORD, safe='')}@/{database}"
        f"?host=127.0.0.1:{primary.port}&host=127.0.0.1:{standby.port}&target_session_attrs=read-write"
    )


def wait_until(condition: object, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:  # type: ignore[operator]
        time.sleep(0.1)


def test_agents_go_on_after_the_primary_dies_and_the_synchronous_standby_is_promoted_losing_nothing(
    own_cluster: PostgresServer, standby: ThrowawayCluster, tmp_path: Path
) -> None:
    primary = own_cluster.cluster
    assert primary is not None
    own_cluster.execute_admin("CREATE DATABASE failover")
    # Synchronous: a commit is acknowledged only once the standby has it on disk.
    own_cluster.execute_admin("ALTER SYSTEM SET synchronous_standby_names = '*'", "SELECT pg_reload_conf()")
    wait_until(lambda: own_cluster.execute_admin("SELECT sync_state FROM pg_stat_replication") == [("sync",)])
    assert own_cluster.execute_admin("SELECT sync_state FROM pg_stat_replication") == [("sync",)]
    url = both_hosts(primary, standby, "failover")
    upgrade_schema(DatabaseConnection.initialize(DatabaseConfig(url=url)))
    DatabaseConnection.reset()

    workers = 3
    stop = tmp_path / "stop"
    context = multiprocessing.get_context("spawn")
    outputs = [tmp_path / f"agent-{index}.json" for index in range(workers)]
    agents = [context.Process(target=hammer, args=(url, RETRY_TIMEOUT, str(stop), str(out))) for out in outputs]
    for agent in agents:
        agent.start()
    try:
        time.sleep(2.0)
        # The dashboard reads from the standby while the agents write to the primary.
        standby_url = standby.url.set(database="failover").render_as_string(hide_password=False)
        assert read_from(standby_url).get("/api/tasks").json()["tasks"], "the standby shows the agents' tasks"
        DatabaseConnection.reset()
        # A reader given the agents' URL, which asks for the writable host, reads from the primary.
        assert read_from(url).get("/api/tasks").json()["tasks"]
        DatabaseConnection.reset()
        primary.shutdown("immediate")  # the primary's host dies
        died = time.time()
        time.sleep(1.0)
        standby.promote()
        time.sleep(3.0)  # the agents must show they went on
    finally:
        stop.touch()
        for agent in agents:
            agent.join(timeout=120)
    assert [agent.exitcode for agent in agents] == [0] * workers

    results = [json.loads(out.read_text(encoding="utf-8")) for out in outputs]
    DatabaseConnection.initialize(DatabaseConfig(url=url))
    repository = TaskRepository()
    for result in results:
        assert (result["failures"], result["unknown"]) == (0, 0), result["messages"]
        assert result["last_success"] > died + 1, "an agent did not go on after the failover"
        assert result["longest"] < RETRY_TIMEOUT + 5, f"a call waited {result['longest']:.1f}s"
        for key, count in result["successes"].items():
            task = repository.get_by_uuid(key)
            assert task is not None, f"task {key} was reported created but is not on the promoted server"
            assert (task.llm_call_count, task.total_tokens) == (count, 3 * count), key
    assert sum(sum(result["successes"].values()) for result in results) > 100
    # The operators' tools reach the promoted server through the same URL, its dead first host skipped.
    backup = backup_database(DatabaseConnection.get_instance(), tmp_path / "after-failover.dump")
    assert "TABLE DATA public tasks" in subprocess.run(
        [find_pg_tool("pg_restore"), "--list", str(backup)], capture_output=True, text=True, check=True
    ).stdout


def read_from(url: str) -> TestClient:
    """The dashboard's app as `serve` builds it, configured with DASHBOARD_DATABASE_URL."""
    source = dashboard_source(None, {"DASHBOARD_DATABASE_URL": url})
    return TestClient(create_app(source, Access(token=None), DashboardSettings()))
