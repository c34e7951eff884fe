"""Pruning a large tasks table while agents write: how long it takes, and how long the agents' writes waited.

Fills the table with `--rows` finished tasks of 200 days ago (and a raw-driver copy of a tenth of them), then
runs `tasks prune`'s machinery (batches of `--batch-size`) while `--agents` threads create tasks and add to
their counters. Prints the prune's rate beside the raw driver deleting the same kind of batches in the same run,
the agents' write latency before and during the prune, and checks that every token figure is unchanged.

    python -m bench.prune [--backend postgresql|sqlite] [--rows 1000000] [--agents 4] [--batch-size 200]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

from db import DatabaseConfig, DatabaseConnection, TaskRepository, TaskRetention, TaskUsageQuery
from db.schema import upgrade_schema
from ops.prune import SQLITE_YIELD, prune
from tools.postgres_server import start_postgres

OLD = datetime.now(UTC) - timedelta(days=200)
CUTOFF = datetime.now(UTC) - timedelta(days=100)

# Rows made by the server itself: a million in seconds, spread over 100 users and 30 days.
FILL_POSTGRESQL = """
INSERT INTO tasks (uuid, task_source, owner, repo, task_type, task_id, status, created_at, updated_at,
                     completed_at, llm_call_count, tool_call_count, total_tokens, compression_count, "user")
SELECT gen_random_uuid(), 'github', %(owner)s, 'web', 'issue', n::text, 'completed',
       %(old)s - (n %% 43200) * interval '1 minute', %(old)s, %(old)s, 1, 1, n %% 5000, 0, 'user' || (n %% 100)
FROM generate_series(1, %(rows)s) AS n
"""
FILL_SQLITE = """
WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?)
INSERT INTO tasks (uuid, task_source, owner, repo, task_type, task_id, status, created_at, updated_at,
                     completed_at, llm_call_count, tool_call_count, total_tokens, compression_count, "user")
SELECT lower(hex(randomblob(4)) || '-' || hex(randomblob(2)) || '-4' || substr(hex(randomblob(2)), 2) || '-a'
             || substr(hex(randomblob(2)), 2) || '-' || hex(randomblob(6))),
       'github', ?, 'web', 'issue', i, 'completed',
       strftime('%Y-%m-%dT%H:%M:%f000+00:00', ?, '-' || (i % 43200) || ' minutes'), ?, ?, 1, 1, i % 5000, 0,
       'user' || (i % 100)
FROM n
"""


def fill(connection: DatabaseConnection, rows: int, owner: str, old: datetime = OLD) -> None:
    raw = connection.engine.raw_connection()
    try:
        cursor = raw.cursor()
        if connection.config.backend == "postgresql":
            cursor.execute(FILL_POSTGRESQL, {"old": old, "rows": rows, "owner": owner})
        else:
            text = old.strftime("%Y-%m-%dT%H:%M:%S.%f+00:00")
            cursor.execute(FILL_SQLITE, (rows, owner, old.strftime("%Y-%m-%d %H:%M:%S"), text, text))
        raw.commit()
        # As the server's autovacuum, or SQLite's optimize, would after such a load: plans see the real table.
        cursor.execute("ANALYZE tasks")
        raw.commit()
    finally:
        raw.close()


def raw_driver_prune(connection: DatabaseConnection, rows: int, batch_size: int) -> float:
    """Rows per second of the raw driver deleting the `rows` oldest finished rows (written older than the others),
    in batches of the same size, from the same table with the same indexes (and the same agents writing): the
    same keyset walk of the created_at index as the prune's, then a DELETE by uuid, a transaction per batch."""
    raw = connection.engine.raw_connection()
    postgresql = connection.config.backend == "postgresql"
    mark = "%s" if postgresql else "?"
    cutoff = CUTOFF if postgresql else CUTOFF.strftime("%Y-%m-%dT%H:%M:%S.%f+00:00")
    last: tuple[object, object] = ("", "") if not postgresql else (OLD - timedelta(days=400), "")
    deleted = 0
    started = time.perf_counter()
    try:
        cursor = raw.cursor()
        while deleted < rows:
            cursor.execute(
                "SELECT uuid, created_at FROM tasks WHERE coalesce(status, '') IN ('completed', 'failed', 'stopped') "
                f"AND completed_at < {mark} AND created_at < {mark} AND created_at >= {mark} "
                f"AND (created_at, uuid{'::text' if postgresql else ''}) > ({mark}, {mark}) "
                f"ORDER BY created_at, uuid LIMIT {batch_size}",
                (cutoff, cutoff, last[0], last[0], last[1]),
            )
            found = cursor.fetchall()
            if not found:
                break
            keys = [row[0] for row in found]
            last = (found[-1][1], str(found[-1][0]))
            cursor.execute(f"DELETE FROM tasks WHERE uuid IN ({', '.join([mark] * len(keys))})", keys)
            raw.commit()
            deleted += len(keys)
    finally:
        raw.close()
    return rows / (time.perf_counter() - started)


class Agents:
    """Threads that create tasks and add to their counters, timing every write, until told to stop."""

    def __init__(self, repository: TaskRepository, count: int) -> None:
        self.repository = repository
        self.stop = threading.Event()
        self.latencies: list[tuple[float, float]] = []
        self.threads = [threading.Thread(target=self._work, args=(index,)) for index in range(count)]

    def _work(self, index: int) -> None:
        while not self.stop.is_set():
            started = time.perf_counter()
            task = self.repository.create(
                {
                    "uuid": str(uuid.uuid4()),
                    "task_source": "github",
                    "owner": "o",
                    "repo": "r",
                    "task_type": "issue",
                    "task_id": str(index),
                    "user": f"agent{index}",
                }
            )
            self._record(started)
            for _ in range(5):
                started = time.perf_counter()
                self.repository.update_statistics(task.uuid, llm_calls=1, tokens=10)
                self._record(started)

    def _record(self, started: float) -> None:
        self.latencies.append((time.perf_counter(), (time.perf_counter() - started) * 1000))

    def between(self, start: float, end: float) -> list[float]:
        return [latency for moment, latency in self.latencies if start <= moment < end]


def summary(latencies: list[float]) -> str:
    if len(latencies) < 2:
        return "no writes"
    cuts = statistics.quantiles(latencies, n=100)
    return f"{len(latencies):>7} writes  p50 {cuts[49]:6.2f} ms  p99 {cuts[98]:7.2f} ms  max {max(latencies):8.2f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=("postgresql", "sqlite"), default="postgresql")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--agents", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=200)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench-prune-"))
    server = start_postgres() if args.backend == "postgresql" else None
    try:
        if server is not None:
            server.execute_admin("DROP DATABASE IF EXISTS bench_prune", "CREATE DATABASE bench_prune")
            # Filling a million rows is one long statement: no statement timeout for it.
            url = server.database_url("bench_prune").render_as_string(hide_password=False)
            config = DatabaseConfig(url=url, statement_timeout=0)
        else:
            config = DatabaseConfig(url=f"sqlite:///{workdir / 'tasks.db'}")
        connection = DatabaseConnection.initialize(config)
        upgrade_schema(connection)
        started = time.perf_counter()
        fill(connection, args.rows, "acme")
        raw_rows = max(args.rows // 10, args.batch_size)
        fill(connection, raw_rows, "raw", OLD - timedelta(days=60))
        print(
            f"{args.backend}: {args.rows + raw_rows:,} finished tasks written in {time.perf_counter() - started:.1f}s"
        )
        agents = Agents(TaskRepository(connection), args.agents)
        for thread in agents.threads:
            thread.start()
        raw_rate = raw_driver_prune(connection, raw_rows, args.batch_size)
        usage = TaskUsageQuery(connection)
        before = (usage.per_user(), usage.daily_by_user(days=400))
        time.sleep(3)
        begun = time.perf_counter()
        result = prune(
            workdir / "contexts",
            TaskRetention(connection),
            TaskRepository(connection),
            CUTOFF,
            batch_size=args.batch_size,
            yield_to_writers=SQLITE_YIELD if args.backend == "sqlite" else 0.0,
        )
        ended = time.perf_counter()
        time.sleep(3)
        agents.stop.set()
        for thread in agents.threads:
            thread.join()
        seconds = ended - begun
        rate = result.tasks / seconds
        print(
            f"pruned {result.tasks:,} tasks in {seconds:.1f}s: {rate:,.0f} rows/s, "
            f"{rate / raw_rate:.2f}x the raw driver's batched DELETE ({raw_rate:,.0f} rows/s, same batches)"
        )
        print("agents' writes (create, update_statistics), with", args.agents, "agents:")
        print("  before the prune ", summary(agents.between(begun - 3, begun)))
        print("  during the prune ", summary(agents.between(begun, ended)))
        print("  after the prune  ", summary(agents.between(ended, ended + 3)))
        after = (usage.per_user(), usage.daily_by_user(days=400))
        agent_users = {f"agent{index}" for index in range(args.agents)}
        unchanged = [[entry for entry in figures if entry.user not in agent_users] for figures in before] == [
            [entry for entry in figures if entry.user not in agent_users] for figures in after
        ]
        print("token usage of the pruned users, all time and by day:", "unchanged" if unchanged else "CHANGED")
    finally:
        DatabaseConnection.reset()
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()
