"""Monitoring figures: connections, transactions, deadlocks, query times, table size."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Connection, text
from sqlalchemy.exc import DBAPIError

from db.connection import DatabaseConnection
from db.redaction import redact_secrets


def database_stats(connection: DatabaseConnection) -> dict[str, Any]:
    """What the configured database reports about itself, as a JSON-ready dict."""
    with connection.engine.connect() as conn:
        if conn.dialect.name == "postgresql":
            return {"backend": "postgresql", **_postgresql(conn)}
        if conn.dialect.name == "sqlite":
            return {"backend": "sqlite", **_sqlite(conn, connection.config.sqlalchemy_url.database)}
    return {"backend": connection.config.backend}


def _rows(conn: Connection, sql: str) -> list[dict[str, Any]]:
    return [dict(row) for row in conn.execute(text(sql)).mappings()]


def _postgresql(conn: Connection) -> dict[str, Any]:
    connections = {
        row["state"]: row["count"]
        for row in _rows(
            conn,
            "SELECT coalesce(state, 'background') AS state, count(*) AS count FROM pg_stat_activity "
            "WHERE datname = current_database() GROUP BY 1 ORDER BY 1",
        )
    }
    database = _rows(
        conn,
        "SELECT numbackends, xact_commit, xact_rollback, deadlocks, conflicts, blks_read, blks_hit, temp_files "
        "FROM pg_stat_database WHERE datname = current_database()",
    )[0]
    limits = _rows(conn, "SELECT current_setting('max_connections')::int AS max_connections")[0]
    table = _rows(
        conn,
        "SELECT pg_total_relation_size('tasks') AS total_bytes, pg_relation_size('tasks') AS table_bytes, "
        "pg_indexes_size('tasks') AS index_bytes, "
        "(SELECT reltuples::bigint FROM pg_class WHERE oid = 'tasks'::regclass) AS estimated_rows",
    )[0]
    table["indexes"] = _rows(
        conn,
        "SELECT indexrelname AS name, pg_relation_size(indexrelid) AS bytes, idx_scan AS scans "
        "FROM pg_stat_user_indexes WHERE relname = 'tasks' ORDER BY indexrelname",
    )
    return {
        "connections": {"by_state": connections, **limits},
        "database": database,
        "statements": _statements(conn),
        "table": table,
    }


def _statements(conn: Connection) -> dict[str, Any]:
    installed = conn.execute(text("SELECT 1 FROM pg_extension WHERE extname = 'pg_stat_statements'")).first()
    if installed is None:
        return {
            "available": False,
            "note": "pg_stat_statements is not installed: add it to shared_preload_libraries and run "
            "CREATE EXTENSION pg_stat_statements to see query execution times",
        }
    try:
        with conn.begin_nested():
            top = _rows(
                conn,
                "SELECT query, calls, round(total_exec_time::numeric, 3)::float AS total_ms, "
                "round(mean_exec_time::numeric, 3)::float AS mean_ms, rows FROM pg_stat_statements "
                "WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) "
                "ORDER BY total_exec_time DESC LIMIT 10",
            )
    except DBAPIError as exc:
        return {"available": False, "note": f"pg_stat_statements cannot be read: {str(exc.orig).strip()}"}
    for row in top:
        row["query"] = redact_secrets(str(row["query"]))
    return {"available": True, "top_by_total_time": top}


def _sqlite(conn: Connection, database: str | None) -> dict[str, Any]:
    pragmas = {
        name: conn.exec_driver_sql(f"PRAGMA {name}").scalar()
        for name in ("page_size", "page_count", "freelist_count", "journal_mode")
    }
    result: dict[str, Any] = {"pragmas": pragmas}
    if database and database != ":memory:":
        path = Path(database)
        wal = path.with_name(path.name + "-wal")
        result["file_bytes"] = path.stat().st_size if path.exists() else 0
        result["wal_bytes"] = wal.stat().st_size if wal.exists() else 0
    result["tasks_rows"] = conn.exec_driver_sql("SELECT count(*) FROM tasks").scalar()
    return result
