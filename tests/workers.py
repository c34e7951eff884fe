"""Functions run in child processes by the concurrency tests (importable, so `spawn` can find them)."""

from __future__ import annotations

from db import DatabaseConfig, DatabaseConnection, TaskRepository


def add_statistics_inherited(task_uuid: str, rounds: int) -> None:
    """Use the connection inherited from the parent through `fork`."""
    repository = TaskRepository()
    for _ in range(rounds):
        assert repository.update_statistics(task_uuid, llm_calls=1, tool_calls=2, tokens=3, compressions=1)


def add_statistics_fresh(url: str, task_uuid: str, rounds: int) -> None:
    """Initialise this process's own connection, as a `spawn`ed agent does."""
    DatabaseConnection.initialize(DatabaseConfig(url=url))
    add_statistics_inherited(task_uuid, rounds)
    DatabaseConnection.reset()
