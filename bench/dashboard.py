"""Dashboard latency over HTTP at 1M tasks, on a SQLite file and on PostgreSQL, against the raw driver.

Fills each database with N tasks (1,000,000 by default) over a year: 200 users, 5% failed, 5% stopped,
50 running. Starts `python main.py serve` on it and requests every page and API answer `--repeat` times
over one keep-alive connection, then prints p50 and p95 per path, and beside them the raw driver's time for
the SQL statements that answer needs at least (the same run, the same database). The paths that show token
sums over every task are timed twice: as served (the sums reused for 30 s, recomputed in the background)
and with that cache off. Asserts nothing.

    .venv/bin/python -m bench.dashboard [--rows 1000000] [--repeat 40] [--backends sqlite,postgresql]
"""

from __future__ import annotations

import argparse
import http.client
import re
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg2

from bench.run import connect
from db import DatabaseConfig, DatabaseConnection
from db.schema import upgrade_schema
from tools.postgres_server import start_postgres

MAIN = Path(__file__).resolve().parent.parent / "main.py"
TARGET_P95_MS = 300.0
ZONE = "Asia/Tokyo"

SQLITE_FILL = """
WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < :rows)
INSERT INTO tasks (uuid, task_source, owner, repo, task_type, task_id, status, created_at, updated_at, "user",
                   total_tokens, llm_call_count, hostname, process_id, error_message)
SELECT lower(hex(randomblob(4)) || '-' || hex(randomblob(2)) || '-4' || substr(hex(randomblob(2)), 2) || '-a'
             || substr(hex(randomblob(2)), 2) || '-' || hex(randomblob(6))),
       'github', 'acme', 'web', 'issue', CAST(i % 9999 AS TEXT),
       CASE WHEN i % 20000 = 0 THEN 'running' WHEN i % 20 = 1 THEN 'failed' WHEN i % 20 = 2 THEN 'stopped'
            ELSE 'completed' END,
       strftime('%Y-%m-%dT%H:%M:%f000+00:00', :now, '-' || (i % 31536000) || ' seconds'),
       strftime('%Y-%m-%dT%H:%M:%f000+00:00', :now),
       'user' || (i % 200), i % 100000, i % 50, 'agent-' || (i % 16), i % 32768,
       CASE WHEN i % 20 = 1 THEN 'provider answered 429' END
FROM n
"""

POSTGRES_FILL = """
INSERT INTO tasks (uuid, task_source, owner, repo, task_type, task_id, status, created_at, updated_at, "user",
                   total_tokens, llm_call_count, hostname, process_id, error_message)
SELECT gen_random_uuid(), 'github', 'acme', 'web', 'issue', (i % 9999)::text,
       CASE WHEN i % 20000 = 0 THEN 'running' WHEN i % 20 = 1 THEN 'failed' WHEN i % 20 = 2 THEN 'stopped'
            ELSE 'completed' END,
       now() - (i % 31536000) * interval '1 second', now(), 'user' || (i % 200), i % 100000, i % 50,
       'agent-' || (i % 16), i % 32768, CASE WHEN i % 20 = 1 THEN 'provider answered 429' END
FROM generate_series(1, {rows}) AS i
"""

# What each answer needs at least, as the raw driver would send it (%s: a task's uuid, a deep page's anchor).
LIST = "SELECT * FROM tasks WHERE {} ORDER BY created_at DESC, uuid LIMIT 51"
COUNTS = "SELECT status, count(*) FROM tasks GROUP BY status"
PER_USER = (
    'SELECT "user", sum(CASE WHEN created_at >= {since} THEN total_tokens ELSE 0 END), sum(total_tokens) '
    'FROM tasks GROUP BY "user"'
)
DAILY = "SELECT {day}, sum(total_tokens) FROM tasks WHERE created_at >= {since} {user} GROUP BY 1"


def sqlite_baseline() -> dict[str, list[str]]:
    since = "strftime('%Y-%m-%dT%H:%M:%f000+00:00', 'now', '-30 days')"
    return _baseline(since, "substr(created_at, 1, 10)", "?")


def postgres_baseline() -> dict[str, list[str]]:
    return _baseline("now() - interval '30 days'", f"(created_at AT TIME ZONE '{ZONE}')::date", "%s")


def _baseline(since: str, day: str, mark: str) -> dict[str, list[str]]:
    running = LIST.format("status = 'running'")
    failed = LIST.format("status = 'failed'")
    one = f"SELECT * FROM tasks WHERE uuid = {mark}"
    deep = LIST.format(f"created_at < (SELECT created_at FROM tasks WHERE uuid = {mark})")
    per_user = PER_USER.format(since=since)
    daily_all = DAILY.format(day=day, since=since, user="")
    daily_one = DAILY.format(day=day, since=since, user="AND \"user\" = 'user7'")
    return {
        "/": [COUNTS, running, failed],
        "/tasks": [LIST.format("true")],
        "/tasks?status=failed&user=user7": [LIST.format("status = 'failed' AND \"user\" = 'user7'")],
        "/tasks?after={anchor}": [one, deep],
        "/tasks/{task}": [one, LIST.format("owner = 'acme' AND repo = 'web' AND task_id = '7'")],
        "/usage": [per_user, daily_all],
        "/usage?user=user7": [per_user, daily_one],
        "/api/tasks?limit=50": [LIST.format("true")],
        "/api/tasks?after={anchor}": [one, deep],
        "/api/tasks/{task}": [one],
        "/api/tasks/{task}/history": [one, LIST.format("owner = 'acme' AND repo = 'web' AND task_id = '7'")],
        "/api/token-usage/summary": [per_user],
        "/api/token-usage/user7": [PER_USER.format(since=since) + " HAVING \"user\" = 'user7'"],
        f"/api/token-usage/user7/history?days=30&tz={ZONE}": [LIST.format("\"user\" = 'user7'"), daily_one],
    }


def percentile(samples: list[float], share: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


@contextmanager
def dashboard(config_file: Path, env: dict[str, str], cache: int) -> Iterator[tuple[str, int]]:
    server = subprocess.Popen(
        [sys.executable, str(MAIN), "--config", str(config_file), "serve", "--port", "0", "--usage-cache", str(cache)],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        found = re.search(r"http://([\d.]+):(\d+)/", server.stdout.readline())
        assert found, "the dashboard did not start"
        yield found.group(1), int(found.group(2))
    finally:
        server.terminate()
        server.wait(timeout=30)


def time_paths(host: str, port: int, paths: list[str], repeat: int) -> dict[str, list[float]]:
    connection = http.client.HTTPConnection(host, port, timeout=120)
    timings: dict[str, list[float]] = {}
    for path in paths:
        samples = []
        for _ in range(repeat + 2):
            started = time.perf_counter()
            connection.request("GET", path)
            answer = connection.getresponse()
            answer.read()
            samples.append((time.perf_counter() - started) * 1000)
            assert answer.status == 200, (path, answer.status)
        timings[path] = samples[2:]  # the first two warm the caches
    connection.close()
    return timings


def time_raw(
    run: Callable[[str, tuple[Any, ...]], None], statements: list[str], params: tuple[Any, ...], repeat: int
) -> list[float]:
    samples = []
    for _ in range(repeat + 2):
        started = time.perf_counter()
        for statement in statements:
            run(statement, params if "%s" in statement or "?" in statement else ())
        samples.append((time.perf_counter() - started) * 1000)
    return samples[2:]


def report(title: str, timings: dict[str, list[float]], raw: dict[str, list[float]]) -> None:
    print(f"\n{title}")
    print(f"{'path':<52} {'p50 ms':>8} {'p95 ms':>8} {'raw p95':>8} {'ratio':>6}  p95 <= {TARGET_P95_MS:.0f} ms")
    worst = 0.0
    for path, samples in timings.items():
        p95, raw_p95 = percentile(samples, 0.95), percentile(raw[path], 0.95)
        worst = max(worst, p95)
        shown = path if len(path) <= 52 else path[:49] + "..."
        verdict = "yes" if p95 <= TARGET_P95_MS else "NO"
        median = statistics.median(samples)
        print(f"{shown:<52} {median:>8.1f} {p95:>8.1f} {raw_p95:>8.1f} {p95 / raw_p95:>5.2f}x  {verdict}")
    print(f"slowest p95: {worst:.1f} ms")


def measure(
    title: str, config_file: Path, env: dict[str, str], paths: list[str], raw: dict[str, list[float]], repeat: int
) -> None:
    """Every path as served (whole-table sums from the default 30 s cache, computed in the background), then
    the paths that show such sums with the cache off: what computing them costs a viewer who must wait."""
    with dashboard(config_file, env, 30) as (host, port):
        time.sleep(5)  # the start-up computation of the default sums
        served = time_paths(host, port, paths, repeat)
    report(f"{title}, {repeat} requests per path, as served (--usage-cache 30)", served, raw)
    summing = [path for path in paths if path.startswith(("/usage", "/api/token-usage/summary"))]
    with dashboard(config_file, env, 0) as (host, port):
        uncached = time_paths(host, port, summing, max(5, repeat // 4))
    report(f"{title}, the same sums computed at every request (--usage-cache 0)", uncached, raw)


def run_sqlite(rows: int, repeat: int, workdir: Path, env: dict[str, str]) -> None:
    config_file = workdir / "sqlite.yaml"
    config_file.write_text(f'context_storage:\n  base_dir: "{workdir}"\n', encoding="utf-8")
    connection = DatabaseConnection(DatabaseConfig.load(str(config_file), env={}))
    upgrade_schema(connection)
    connection.dispose()
    path = workdir / "tasks.db"
    raw = sqlite3.connect(path)
    started = time.perf_counter()
    raw.execute(SQLITE_FILL, {"rows": rows, "now": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S")})
    raw.commit()
    raw.execute("ANALYZE")
    print(f"SQLite: {rows:,} tasks written in {time.perf_counter() - started:.0f} s")
    anchor, task = _anchors(lambda sql: raw.execute(sql).fetchone())
    baseline = sqlite_baseline()

    def execute(statement: str, params: tuple[Any, ...]) -> None:
        raw.execute(statement, params).fetchall()

    paths, raw_times = _both(baseline, anchor, task, execute, repeat)
    raw.close()
    measure(f"SQLite file, {rows:,} tasks", config_file, env, paths, raw_times, repeat)


def run_postgres(rows: int, repeat: int, workdir: Path, env: dict[str, str]) -> None:
    server = start_postgres(need_cluster=True)
    try:
        connect(server, "bench_dashboard").dispose()
        DatabaseConnection.reset()
        url = server.database_url("bench_dashboard")
        raw = psycopg2.connect(
            host=url.host, port=url.port, user=url.username, password=url.password, dbname=url.database
        )
        raw.autocommit = True
        cursor = raw.cursor()
        started = time.perf_counter()
        cursor.execute(POSTGRES_FILL.format(rows=int(rows)))
        cursor.execute("VACUUM ANALYZE tasks")
        print(f"PostgreSQL: {rows:,} tasks written in {time.perf_counter() - started:.0f} s")

        def one(sql: str) -> Any:
            cursor.execute(sql)
            return cursor.fetchone()

        anchor, task = _anchors(one)

        def execute(statement: str, params: tuple[Any, ...]) -> None:
            cursor.execute(statement, params or None)
            cursor.fetchall()

        paths, raw_times = _both(postgres_baseline(), anchor, task, execute, repeat)
        config_file = workdir / "postgres.yaml"
        config_file.write_text(f'context_storage:\n  base_dir: "{workdir}"\n', encoding="utf-8")
        raw.close()
        env = {**env, "DATABASE_URL": url.render_as_string(hide_password=False)}
        measure(f"PostgreSQL 15, {rows:,} tasks", config_file, env, paths, raw_times, repeat)
    finally:
        server.stop()


def _anchors(one: Callable[[str], Any]) -> tuple[str, str]:
    """A task half-way down the listing (a deep page starts after it), and one task of user7's issue 7."""
    anchor = one("SELECT uuid FROM tasks ORDER BY created_at DESC, uuid LIMIT 1 OFFSET 500000")
    if anchor is None:
        anchor = one("SELECT uuid FROM tasks ORDER BY created_at LIMIT 1")
    task = one("SELECT uuid FROM tasks WHERE task_id = '7' LIMIT 1")
    return str(anchor[0]), str(task[0])


def _both(
    baseline: dict[str, list[str]],
    anchor: str,
    task: str,
    execute: Callable[[str, tuple[Any, ...]], None],
    repeat: int,
) -> tuple[list[str], dict[str, list[float]]]:
    paths, raw_times = [], {}
    for template, statements in baseline.items():
        path = template.format(anchor=anchor, task=task)
        parameter = anchor if "after" in template else task
        raw_times[path] = time_raw(execute, statements, (parameter,), repeat)
        paths.append(path)
    return paths, raw_times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=40)
    parser.add_argument("--backends", default="sqlite,postgresql")
    args = parser.parse_args()
    env = {"PATH": "/usr/bin:/bin", "HOME": str(Path.home()), "DASHBOARD_TOKEN": ""}
    with tempfile.TemporaryDirectory() as directory:
        workdir = Path(directory)
        backends = args.backends.split(",")
        if "sqlite" in backends:
            run_sqlite(args.rows, args.repeat, workdir, env)
        if "postgresql" in backends:
            run_postgres(args.rows, args.repeat, workdir, env)


if __name__ == "__main__":
    main()
