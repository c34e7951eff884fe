"""Benchmark of the repository against the raw drivers, measured in the same run; prints tables, asserts nothing.

1. SQLite file: TaskRepository against the code path before the migration (a sqlite3.connect per call).
2. PostgreSQL: TaskRepository against raw psycopg2 on one connection (BEGIN, the statement, COMMIT per
   operation), on loopback and through a proxy adding `--delay-ms` each way (round trips as between hosts),
   with the upstream agent's read-modify-write update_statistics beside.
3. Scale: get_by_uuid and list_by_status(limit=50) latency on PostgreSQL at 10k, 100k and 1M rows, with the
   plan the server chose.
4. Memory: resident size of this process over 100,000 repository operations.

    python -m bench.run [--ops 2000] [--sizes 10000,100000,1000000] [--memory-ops 100000]
"""

from __future__ import annotations

import argparse
import functools
import gc
import sqlite3
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg2
from sqlalchemy.engine import URL
from sqlalchemy.orm import Session

from bench.delay_proxy import DelayProxy
from db import DatabaseConfig, DatabaseConnection, Task, TaskRepository
from db.schema import upgrade_schema
from tools.legacy_db import LEGACY_SCHEMA
from tools.postgres_server import PostgresServer, start_postgres

OPERATIONS = ("create", "get_by_uuid", "update_statistics", "list_by_status(limit=50)")
ROW = ("github", "acme", "web", "issue", "42")


def rate(count: int, call: Callable[[int], Any]) -> float:
    """Operations per second of `call(i)` for i in range(count)."""
    started = time.perf_counter()
    for index in range(count):
        call(index)
    return count / (time.perf_counter() - started)


Calls = dict[str, Callable[[int], Any]]


def repository_calls(repo: TaskRepository, count: int) -> Calls:
    keys = [str(uuid.uuid4()) for _ in range(count)]
    fields = dict(zip(("task_source", "owner", "repo", "task_type", "task_id"), ROW, strict=True))
    return {
        "create": lambda i: repo.create({"uuid": keys[i], **fields, "user": "alice"}),
        "get_by_uuid": lambda i: repo.get_by_uuid(keys[i]),
        "update_statistics": lambda i: repo.update_statistics(keys[i], llm_calls=1, tokens=100),
        "list_by_status(limit=50)": lambda _: repo.list_by_status("running", limit=50),
    }


def repository_ops(repo: TaskRepository, count: int) -> dict[str, float]:
    return {name: rate(count, call) for name, call in repository_calls(repo, count).items()}


def interleaved(clients: dict[str, Calls], count: int, chunk: int = 25) -> dict[str, dict[str, float]]:
    """Operations per second of each client for each operation, the clients taking turns `chunk` calls at a
    time: a machine that slows down or speeds up meanwhile does so for all of them alike."""
    spent = {client: dict.fromkeys(OPERATIONS, 0.0) for client in clients}
    for name in OPERATIONS:
        for start in range(0, count, chunk):
            for client, calls in clients.items():
                began = time.perf_counter()
                for index in range(start, min(start + chunk, count)):
                    calls[name](index)
                spent[client][name] += time.perf_counter() - began
    return {client: {name: count / seconds for name, seconds in times.items()} for client, times in spent.items()}


def old_sqlite_ops(path: Path, count: int) -> dict[str, float]:
    """The pre-migration code path: open the file, run one statement, commit, close, every call."""
    with sqlite3.connect(path) as conn:
        for statement in LEGACY_SCHEMA:
            conn.execute(statement)
    conn.close()
    keys = [str(uuid.uuid4()) for _ in range(count)]

    def call(sql: str, parameters: tuple[Any, ...], fetch: bool = False) -> None:
        conn = sqlite3.connect(path)
        try:
            cursor = conn.execute(sql, parameters)
            if fetch:
                cursor.fetchall()
            conn.commit()
        finally:
            conn.close()

    now = datetime.now(UTC).isoformat()
    insert = (
        "INSERT INTO tasks (uuid, task_source, owner, repo, task_type, task_id, status, created_at, user) "
        "VALUES (?, ?, ?, ?, ?, ?, 'running', ?, 'alice')"
    )
    return {
        "create": rate(count, lambda i: call(insert, (keys[i], *ROW, now))),
        "get_by_uuid": rate(count, lambda i: call("SELECT * FROM tasks WHERE uuid = ?", (keys[i],), True)),
        "update_statistics": rate(
            count,
            lambda i: call(
                "UPDATE tasks SET llm_call_count = llm_call_count + ?, total_tokens = total_tokens + ? WHERE uuid = ?",
                (1, 100, keys[i]),
            ),
        ),
        "list_by_status(limit=50)": rate(
            count,
            lambda _: call(
                "SELECT * FROM tasks WHERE status = ? ORDER BY created_at DESC, uuid LIMIT 50", ("running",), True
            ),
        ),
    }


def raw_psycopg2_calls(url: URL, count: int, *, autocommit: bool = False) -> tuple[Calls, Callable[[], None]]:
    """Raw psycopg2 on one connection: BEGIN, the statement, COMMIT per operation; or, with `autocommit`, the
    statement alone (one round trip: the physical limit of any client). With the function that closes it."""
    conn = psycopg2.connect(host=url.host, port=url.port, user=url.username, password=url.password, dbname=url.database)
    conn.autocommit = autocommit
    cursor = conn.cursor()
    keys = [str(uuid.uuid4()) for _ in range(count)]

    def run(sql: str, parameters: tuple[Any, ...], fetch: bool = False) -> None:
        cursor.execute(sql, parameters)
        if fetch:
            cursor.fetchall()
        if not autocommit:
            conn.commit()

    insert = (
        "INSERT INTO tasks (uuid, task_source, owner, repo, task_type, task_id, status, created_at, updated_at, "
        "\"user\") VALUES (%s, %s, %s, %s, %s, %s, 'running', now(), now(), 'alice')"
    )
    calls: Calls = {
        "create": lambda i: run(insert, (keys[i], *ROW)),
        "get_by_uuid": lambda i: run("SELECT * FROM tasks WHERE uuid = %s", (keys[i],), True),
        "update_statistics": lambda i: run(
            "UPDATE tasks SET llm_call_count = llm_call_count + %s, total_tokens = total_tokens + %s, "
            "updated_at = now() WHERE uuid = %s",
            (1, 100, keys[i]),
        ),
        "list_by_status(limit=50)": lambda _: run(
            "SELECT * FROM tasks WHERE status = %s ORDER BY created_at DESC, uuid LIMIT 50", ("running",), True
        ),
    }
    return calls, conn.close


def upstream_update_statistics(connection: DatabaseConnection, count: int) -> float:
    """The upstream agent's own SQLAlchemy version: read the row, add in Python, merge, commit, refresh."""
    keys = [str(uuid.uuid4()) for _ in range(count)]
    repo = TaskRepository(connection)
    fields = dict(zip(("task_source", "owner", "repo", "task_type", "task_id"), ROW, strict=True))
    for key in keys:
        repo.create({"uuid": key, **fields})

    def add(index: int) -> None:
        with Session(connection.engine, expire_on_commit=False) as session:
            task = session.get(Task, keys[index])
            assert task is not None
            task.llm_call_count += 1
            task.total_tokens += 100
            session.merge(task)
            session.commit()
            session.refresh(task)

    return rate(count, add)


def postgres_comparison(server: PostgresServer, count: int, delay_ms: float) -> None:
    """Repository, raw psycopg2 and the upstream loop on one server: on loopback, or through a proxy that
    delays each way by `delay_ms`, so that round trips cost what they cost between hosts. The repository and
    the raw loops take turns, so that the machine's noise falls on each alike."""
    for name in ("bench_raw", "bench_limit", "bench_repo", "bench_upstream"):
        connect(server, name)
        DatabaseConnection.reset()
    with DelayProxy((str(server.url.host), int(server.url.port or 5432)), delay_ms / 1000) as proxy:

        def through(name: str) -> URL:
            url = server.database_url(name)
            return url.set(port=proxy.port) if delay_ms else url

        raw_calls, close_raw = raw_psycopg2_calls(through("bench_raw"), count)
        limit_calls, close_limit = raw_psycopg2_calls(through("bench_limit"), count, autocommit=True)
        connection = DatabaseConnection.initialize(
            DatabaseConfig(url=through("bench_repo").render_as_string(hide_password=False))
        )
        try:
            rates = interleaved(
                {"raw": raw_calls, "limit": limit_calls, "ours": repository_calls(TaskRepository(connection), count)},
                count,
            )
        finally:
            close_raw()
            close_limit()
        raw, limit, ours = rates["raw"], rates["limit"], rates["ours"]
        DatabaseConnection.reset()
        upstream = upstream_update_statistics(
            DatabaseConnection.initialize(
                DatabaseConfig(url=through("bench_upstream").render_as_string(hide_password=False))
            ),
            count,
        )
        DatabaseConnection.reset()
    where = f"through a proxy adding {delay_ms:g} ms each way" if delay_ms else "on loopback"
    print_comparison(f"PostgreSQL {where}: repository vs raw psycopg2 on one connection", "raw psycopg2", raw, ours)
    print_targets(TARGETS_THROUGH_PROXY if delay_ms else TARGETS_ON_LOOPBACK, raw, limit, ours)
    print(
        f"{'update_statistics, upstream':<26} {'(read, add, merge, commit, refresh)':>22} {upstream:>18,.0f} "
        f"{upstream / raw['update_statistics']:>6.2f}x"
    )


# The ratios to raw psycopg2's BEGIN/statement/COMMIT loop the repository is held to.
TARGETS_ON_LOOPBACK = {"create": 0.85, "get_by_uuid": 0.85, "update_statistics": 0.85}
TARGETS_THROUGH_PROXY = {"update_statistics": 2.2}


def print_targets(
    targets: dict[str, float], raw: dict[str, float], limit: dict[str, float], ours: dict[str, float]
) -> None:
    """Each target beside the raw single-statement autocommit loop (one round trip, no transaction around it):
    the physical limit of any client, and our distance to it."""
    print(f"{'':<26} {'target':>8} {'met':>5} {'limit ops/s':>12} {'limit ratio':>12} {'ours/limit':>11}")
    for name, target in targets.items():
        ratio = ours[name] / raw[name]
        print(
            f"{name:<26} {target:>7.2f}x {'yes' if ratio >= target else 'MISS':>5} {limit[name]:>12,.0f} "
            f"{limit[name] / raw[name]:>11.2f}x {ours[name] / limit[name]:>10.2f}x"
        )


def print_comparison(title: str, baseline_name: str, baseline: dict[str, float], ours: dict[str, float]) -> None:
    print(f"\n{title}")
    print(f"{'operation':<26} {baseline_name + ' ops/s':>22} {'repository ops/s':>18} {'ratio':>7}")
    for name in OPERATIONS:
        print(f"{name:<26} {baseline[name]:>22,.0f} {ours[name]:>18,.0f} {ours[name] / baseline[name]:>6.2f}x")


def connect(server: PostgresServer, database: str) -> DatabaseConnection:
    server.execute_admin(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)", f"CREATE DATABASE {database}")
    DatabaseConnection.reset()
    connection = DatabaseConnection.initialize(
        DatabaseConfig(url=server.database_url(database).render_as_string(hide_password=False))
    )
    upgrade_schema(connection)
    return connection


def populate(connection: DatabaseConnection, rows: int) -> None:
    """`rows` tasks spread over 90 days, a fifth of them running, generated by the server itself."""
    with connection.engine.begin() as conn:
        conn.exec_driver_sql("TRUNCATE tasks")
        conn.exec_driver_sql(
            "INSERT INTO tasks (uuid, task_source, owner, repo, task_type, task_id, status, created_at, updated_at, "
            '"user", total_tokens) '
            "SELECT gen_random_uuid(), 'github', 'acme', 'web', 'issue', (i %% 9999)::text, "
            "(ARRAY['running','completed','completed','failed','stopped'])[1 + i %% 5], "
            "now() - (i %% 7776000) * interval '1 second', now(), 'user' || (i %% 50), i %% 100000 "
            f"FROM generate_series(1, {rows}) AS i"
        )
        conn.exec_driver_sql("ANALYZE tasks")


def latency(call: Callable[[], Any], repeat: int = 300) -> tuple[float, float]:
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        call()
        samples.append((time.perf_counter() - started) * 1000)
    quantiles = statistics.quantiles(samples, n=20)
    return statistics.median(samples), quantiles[18]


def plan(connection: DatabaseConnection, sql: str) -> str:
    with connection.engine.connect() as conn:
        lines = [str(row[0]) for row in conn.exec_driver_sql("EXPLAIN " + sql)]
    return next((line.strip() for line in lines if "Index" in line), lines[0].strip())


def scale_curve(server: PostgresServer, sizes: list[int]) -> None:
    print("\nPostgreSQL scale: latency in ms (p50 / p95), and the plan's index")
    connection = connect(server, "bench_scale")
    repo = TaskRepository(connection)
    for rows in sizes:
        populate(connection, rows)
        with connection.engine.connect() as conn:
            keys = [str(row[0]) for row in conn.exec_driver_sql("SELECT uuid FROM tasks ORDER BY random() LIMIT 300")]
        cycle = iter(keys * 3)
        get_p50, get_p95 = latency(functools.partial(lambda keys: repo.get_by_uuid(next(keys)), cycle))
        list_p50, list_p95 = latency(lambda: repo.list_by_status("running", limit=50))
        print(
            f"{rows:>9,} rows  get_by_uuid {get_p50:6.2f} / {get_p95:6.2f}   "
            f"list_by_status(limit=50) {list_p50:6.2f} / {list_p95:6.2f}"
        )
        by_uuid = f"SELECT * FROM tasks WHERE uuid = '{keys[0]}'"
        by_status = "SELECT * FROM tasks WHERE status = 'running' ORDER BY created_at DESC, uuid LIMIT 50"
        print(f"{'':>16}plan: {plan(connection, by_uuid)}")
        print(f"{'':>16}plan: {plan(connection, by_status)}")
    DatabaseConnection.reset()


def resident_kib() -> int:
    with open("/proc/self/statm", encoding="ascii") as statm:
        return int(statm.read().split()[1]) * 4


def memory_curve(operations: int, workdir: Path) -> None:
    print(f"\nMemory of this process over {operations:,} repository operations (SQLite file)")
    DatabaseConnection.reset()
    connection = DatabaseConnection.initialize(DatabaseConfig(sqlite_path=str(workdir / "memory.db")))
    upgrade_schema(connection)
    repo = TaskRepository(connection)
    keys = [
        repo.create(
            {
                "uuid": str(uuid.uuid4()),
                "task_source": "github",
                "owner": "a",
                "repo": "b",
                "task_type": "issue",
                "task_id": str(i),
            }
        ).uuid
        for i in range(100)
    ]
    step = operations // 10
    for done in range(0, operations + 1, step):
        if done:
            for index in range(step):
                key = keys[index % len(keys)]
                (repo.update_statistics(key, tokens=1) if index % 2 else repo.get_by_uuid(key))
        gc.collect()
        print(f"{done:>9,} operations  resident {resident_kib() / 1024:8.1f} MiB")
    DatabaseConnection.reset()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", type=int, default=2000)
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--memory-ops", type=int, default=100_000)
    parser.add_argument("--delay-ms", type=float, default=1.0, help="delay each way through the proxy (default 1)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        old = old_sqlite_ops(workdir / "old.db", args.ops)
        DatabaseConnection.initialize(DatabaseConfig(sqlite_path=str(workdir / "new.db")))
        upgrade_schema(DatabaseConnection.get_instance())
        ours = repository_ops(TaskRepository(), args.ops)
        DatabaseConnection.reset()
        print_comparison(
            "SQLite file: repository vs the pre-migration code (sqlite3.connect per call)", "old sqlite3", old, ours
        )

        server = start_postgres(need_cluster=True)
        try:
            print(f"\nserver: {server.description}")
            postgres_comparison(server, args.ops, 0)
            postgres_comparison(server, max(200, args.ops // 10), args.delay_ms)
            scale_curve(server, [int(size) for size in args.sizes.split(",") if size])
        finally:
            DatabaseConnection.reset()
            server.stop()
        memory_curve(args.memory_ops, workdir)


if __name__ == "__main__":
    main()
