"""Benchmark: `db migrate-data` of N legacy rows into PostgreSQL against PostgreSQL's own COPY of the same rows.

Both load into an empty `tasks` table with its indexes, on the same throwaway server, in the same run; the
ratio is what matters on a noisy machine. Target: migrate-data within 1.25x the COPY time.

    python -m bench.migrate_data [--rows 1000000] [--repeat 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import psycopg2

from db import DatabaseConfig, DatabaseConnection
from db.legacy_rows import COLUMNS
from db.schema import upgrade_schema
from ops.migrate_data import migrate_data
from ops.migrate_data_source import TaskSource
from tools.legacy_db import write_legacy_db
from tools.postgres_server import PostgresServer, start_postgres


def fresh_database(server: PostgresServer, name: str) -> DatabaseConnection:
    server.execute_admin(f"DROP DATABASE IF EXISTS {name}", f"CREATE DATABASE {name}")
    DatabaseConnection.reset()
    connection = DatabaseConnection.initialize(
        DatabaseConfig(url=server.database_url(name).render_as_string(hide_password=False), slow_query_ms=10**9)
    )
    upgrade_schema(connection)
    return connection


def copy_file(legacy: Path, out: Path) -> None:
    """The legacy rows, normalised, as CSV (not timed: this is the input COPY is given)."""
    source = TaskSource(str(legacy))
    with out.open("w", encoding="utf-8") as handle:
        for chunk in source.copy_chunks(50_000):
            handle.write(chunk)
    source.close()


def time_copy(server: PostgresServer, data: Path) -> float:
    connection = fresh_database(server, "bench_copy")
    url = connection.config.sqlalchemy_url
    DatabaseConnection.reset()
    raw = psycopg2.connect(host=url.host, port=url.port, user=url.username, password=url.password, dbname=url.database)
    names = ", ".join(f'"{name}"' for name in COLUMNS)
    started = time.perf_counter()
    with raw, raw.cursor() as cursor, data.open(encoding="utf-8") as handle:
        cursor.copy_expert(f"COPY tasks ({names}) FROM STDIN (FORMAT csv)", handle)
    elapsed = time.perf_counter() - started
    raw.close()
    return elapsed


def time_migrate(server: PostgresServer, legacy: Path, rows: int) -> float:
    connection = fresh_database(server, "bench_migrate")
    started = time.perf_counter()
    report = migrate_data(str(legacy), connection, batch_size=20_000)
    elapsed = time.perf_counter() - started
    assert report.copied == rows and not report.differences, report
    DatabaseConnection.reset()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        legacy = Path(workdir) / "tasks.db"
        started = time.perf_counter()
        write_legacy_db(legacy, rows=args.rows, seed=1)
        print(f"generated {args.rows:,} legacy rows in {time.perf_counter() - started:.1f}s")
        data = Path(workdir) / "tasks.copy"
        copy_file(legacy, data)
        server = start_postgres(need_cluster=True)
        try:
            print(f"server: {server.description}")
            print(f"{'run':>4}  {'COPY (s)':>9}  {'migrate-data (s)':>16}  {'ratio':>6}")
            for attempt in range(1, args.repeat + 1):
                copy_seconds = time_copy(server, data)
                migrate_seconds = time_migrate(server, legacy, args.rows)
                ratio = migrate_seconds / copy_seconds
                print(f"{attempt:>4}  {copy_seconds:>9.1f}  {migrate_seconds:>16.1f}  {ratio:>5.2f}x")
        finally:
            DatabaseConnection.reset()
            server.stop()


if __name__ == "__main__":
    main()
