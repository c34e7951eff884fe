"""Writes a tasks.db the way the pre-SQLAlchemy code did: plain sqlite3, text date-times, idx_tasks_* indexes."""

from __future__ import annotations

import random
import sqlite3
import uuid
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

LEGACY_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS tasks (
        uuid TEXT PRIMARY KEY, task_source TEXT NOT NULL, owner TEXT NOT NULL, repo TEXT NOT NULL,
        task_type TEXT NOT NULL, task_id TEXT NOT NULL, status TEXT NOT NULL, created_at TEXT NOT NULL,
        started_at TEXT, completed_at TEXT, process_id INTEGER, hostname TEXT, llm_provider TEXT, model TEXT,
        context_length INTEGER, llm_call_count INTEGER DEFAULT 0, tool_call_count INTEGER DEFAULT 0,
        total_tokens INTEGER DEFAULT 0, compression_count INTEGER DEFAULT 0, error_message TEXT, user TEXT)""",
    "CREATE INDEX IF NOT EXISTS idx_tasks_status ON tasks(status)",
    "CREATE INDEX IF NOT EXISTS idx_tasks_created_at ON tasks(created_at)",
    "CREATE INDEX IF NOT EXISTS idx_tasks_user ON tasks(user)",
)
COLUMNS = (
    "uuid",
    "task_source",
    "owner",
    "repo",
    "task_type",
    "task_id",
    "status",
    "created_at",
    "started_at",
    "completed_at",
    "process_id",
    "hostname",
    "llm_provider",
    "model",
    "context_length",
    "llm_call_count",
    "tool_call_count",
    "total_tokens",
    "compression_count",
    "error_message",
    "user",
)
DATETIME_COLUMNS = ("created_at", "started_at", "completed_at")
COUNTER_COLUMNS = ("llm_call_count", "tool_call_count", "total_tokens", "compression_count")
KINDS = (("github", "issue"), ("github", "pull_request"), ("gitlab", "issue"), ("gitlab", "merge_request"))
STATUSES = ("running", "completed", "completed", "failed", "stopped")
USERS = ("alice", "bob", "田中", "o'brien", None)
TOKYO = timezone(timedelta(hours=9))
START = datetime(2025, 9, 1, tzinfo=UTC)


def _stamp(moment: datetime, rng: random.Random) -> str:
    """The forms old rows hold: isoformat() in UTC (with or without microseconds), another offset, no offset."""
    shape = rng.random()
    if shape < 0.1:
        return moment.replace(microsecond=0).isoformat()
    if shape < 0.15:
        return moment.astimezone(TOKYO).isoformat()
    if shape < 0.2:
        return moment.replace(tzinfo=None).isoformat()
    return moment.isoformat()


def legacy_row(rng: random.Random) -> dict[str, Any]:
    source, kind = rng.choice(KINDS)
    status = rng.choice(STATUSES)
    created = START + timedelta(seconds=rng.randrange(90 * 86400), microseconds=rng.randrange(1_000_000))
    counters: list[int | None] = [rng.randrange(400), rng.randrange(2000), rng.randrange(5_000_000), rng.randrange(20)]
    if rng.random() < 0.05:
        counters = [None, None, None, None]
    return dict(
        zip(
            COLUMNS,
            (
                str(uuid.UUID(int=rng.getrandbits(128), version=4)),
                source,
                "" if source == "gitlab" else rng.choice(("acme", "octo-org")),
                str(rng.randrange(1, 500)) if source == "gitlab" else rng.choice(("web", "infra")),
                kind,
                str(rng.randrange(1, 10_000)),
                status,
                _stamp(created, rng),
                _stamp(created + timedelta(seconds=1), rng),
                _stamp(created + timedelta(minutes=rng.randrange(1, 600)), rng) if status != "running" else None,
                rng.randrange(2, 65_000),
                rng.choice(("consumer-1", "9f2c1d")),
                rng.choice(("openai", "ollama")),
                rng.choice(("gpt-4o", "qwen3-30b-a3b-mlx")),
                rng.choice((128000, 32768)),
                *counters,
                "LLM timeout\nTraceback ..." if status == "failed" else None,
                rng.choice(USERS),
            ),
            strict=True,
        )
    )


def write_legacy_db(path: Path, rows: int, seed: int = 0) -> list[dict[str, Any]]:
    """Create `path` with `rows` legacy rows; return them as written."""
    rng = random.Random(seed)
    written = [legacy_row(rng) for _ in range(rows)]
    connection = sqlite3.connect(path)
    try:
        for statement in LEGACY_SCHEMA:
            connection.execute(statement)
        placeholders = ", ".join(f":{name}" for name in COLUMNS)
        connection.executemany(f"INSERT INTO tasks ({', '.join(COLUMNS)}) VALUES ({placeholders})", written)
        connection.commit()
    finally:
        connection.close()
    return written


def read_rows(path: Path) -> dict[str, dict[str, Any]]:
    """Every row of the tasks table by uuid, as stored."""
    connection = sqlite3.connect(path)
    connection.row_factory = sqlite3.Row
    try:
        return {row["uuid"]: dict(row) for row in connection.execute("SELECT * FROM tasks")}
    finally:
        connection.close()


def as_instant(text: str | None) -> datetime | None:
    """A stored date-time as an aware instant (no offset means UTC)."""
    if text is None:
        return None
    moment = datetime.fromisoformat(text)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
