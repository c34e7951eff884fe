"""The agent's side: its LLM settings, configurations, and reading back what a manager wrote."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from context_storage.unsaved import add_statistics, batches_in_flight
from db import Task, TaskRepository

LLM = {"provider": "openai", "openai": {"model": "gpt-4o", "context_length": 128000}}


def unreachable_database_config(tmp_path: Path, port: int, *, startup_timeout: float) -> dict[str, Any]:
    """The agent's configuration with PostgreSQL on a port that refuses connections."""
    return {
        "context_storage": {"base_dir": str(tmp_path / "contexts")},
        "llm": LLM,
        "database": {
            "type": "postgresql",
            "postgresql": {"host": "127.0.0.1", "port": port},
            "startup_timeout": startup_timeout,
        },
    }


def stored(task_uuid: str) -> Task:
    task = TaskRepository().get_by_uuid(task_uuid)
    assert task is not None
    return task


def counters(task: Task) -> tuple[int, int, int, int]:
    return task.llm_call_count, task.tool_call_count, task.total_tokens, task.compression_count


def kept_statistics(metadata: dict[str, Any]) -> dict[str, int]:
    """Every increment metadata.json keeps for the database: never sent, and in flight (with their ids)."""
    unsaved = metadata.get("unsaved") or {}
    total = add_statistics(unsaved.get("statistics") or {}, {})
    for batch in batches_in_flight(unsaved):
        total = add_statistics(total, batch["statistics"])
    return total
