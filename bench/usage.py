"""Token-usage sums computed by the database, against a hand-written GROUP BY on the same data, same run.

Fills PostgreSQL with N tasks created within the last 30 days (1,000,000 by default), then times
`TaskUsageQuery.daily(days=30)` and `.per_user()` in Asia/Tokyo against raw psycopg2 running
`SELECT (created_at AT TIME ZONE 'Asia/Tokyo')::date, sum(total_tokens) ... GROUP BY 1` (and the per-user
equivalent), and `python main.py tasks usage` end to end. Prints best-of-3 times and ratios.

    .venv/bin/python -m bench.usage [--rows 1000000]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg2

from bench.context_files import best
from bench.run import connect
from db import DatabaseConnection, TaskUsageQuery
from tools.postgres_server import start_postgres

ZONE = "Asia/Tokyo"
MAIN = Path(__file__).resolve().parent.parent / "main.py"


def populate(connection: DatabaseConnection, rows: int) -> None:
    with connection.engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO tasks (uuid, task_source, owner, repo, task_type, task_id, status, created_at, updated_at, "
            '"user", total_tokens) '
            "SELECT gen_random_uuid(), 'github', 'acme', 'web', 'issue', (i %% 9999)::text, 'completed', "
            "now() - (i %% 2592000) * interval '1 second', now(), 'user' || (i %% 50), i %% 100000 "
            f"FROM generate_series(1, {rows}) AS i"
        )
        conn.exec_driver_sql("ANALYZE tasks")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args()
    server = start_postgres(need_cluster=True)
    try:
        connection = connect(server, "bench_usage")
        populate(connection, args.rows)
        url = server.database_url("bench_usage")
        raw = psycopg2.connect(
            host=url.host, port=url.port, user=url.username, password=url.password, dbname=url.database
        )
        query = TaskUsageQuery(connection)

        def raw_daily() -> Any:
            with raw.cursor() as cursor:
                cursor.execute(
                    "SELECT (created_at AT TIME ZONE %s)::date AS day, sum(total_tokens) FROM tasks "
                    "WHERE created_at >= now() - interval '30 days' GROUP BY 1 ORDER BY 1",
                    (ZONE,),
                )
                return cursor.fetchall()

        def raw_per_user() -> Any:
            with raw.cursor() as cursor:
                cursor.execute(
                    "SELECT \"user\", sum(total_tokens) FILTER (WHERE created_at >= date_trunc('day', now())), "
                    "sum(total_tokens) FILTER (WHERE created_at >= date_trunc('week', now())), "
                    "sum(total_tokens) FILTER (WHERE created_at >= date_trunc('month', now())), sum(total_tokens) "
                    'FROM tasks GROUP BY "user"'
                )
                return cursor.fetchall()

        print(f"{args.rows:,} tasks in the last 30 days, PostgreSQL, zone {ZONE}; best of 3")
        for name, ours, baseline in (
            ("daily(days=30)", lambda: query.daily(days=30, zone=ZONE), raw_daily),
            ("per_user()", lambda: query.per_user(zone=ZONE), raw_per_user),
        ):
            mine, theirs = best(ours), best(baseline)
            print(
                f"{name:<16} {mine * 1000:8.0f} ms   hand-written GROUP BY {theirs * 1000:8.0f} ms   "
                f"{mine / theirs:.2f}x"
            )
        raw.close()
        env = {**os.environ, "DATABASE_URL": url.render_as_string(hide_password=False), "APP_ENV": "production"}
        command = [sys.executable, str(MAIN), "tasks", "usage", "--tz", ZONE, "--user", "user7", "--days", "30"]
        whole = best(lambda: subprocess.run(command, env=env, capture_output=True, check=True))
        print(f"python main.py tasks usage --user user7 --days 30: {whole:.2f} s (process start included)")
    finally:
        DatabaseConnection.reset()
        server.stop()


if __name__ == "__main__":
    main()
