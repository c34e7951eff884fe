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


def hammer(url: str, retry_timeout: float, stop_file: str, out: str) -> None:
    """Register tasks and add to them until `stop_file` appears, recording exactly which calls reported success."""
    import json
    import time
    import uuid

    from db import DatabaseError

    DatabaseConnection.initialize(DatabaseConfig(url=url, retry_timeout=retry_timeout, connect_timeout=3))
    repository = TaskRepository()
    successes: dict[str, int] = {}
    failures = 0
    unknown = 0
    messages: list[str] = []
    longest = 0.0
    last_success = 0.0
    from pathlib import Path

    stop = Path(stop_file)
    deadline = time.monotonic() + 300  # a bound in case the test dies before it says stop
    calls = 0
    while not stop.exists() and time.monotonic() < deadline:
        started = time.monotonic()
        try:
            if calls % 25 == 0:
                key = str(uuid.uuid4())
                repository.create(
                    {
                        "uuid": key,
                        "task_source": "github",
                        "owner": "o",
                        "repo": "r",
                        "task_type": "issue",
                        "task_id": str(calls),
                    }
                )
                successes[key] = 0
            else:
                key = list(successes)[calls % len(successes)]
                if repository.update_statistics(key, llm_calls=1, tokens=3):
                    successes[key] += 1
            last_success = time.time()
        except DatabaseError as exc:
            failures += 1
            unknown += "outcome is unknown" in str(exc)
            messages.append(str(exc)[:300])
        longest = max(longest, time.monotonic() - started)
        calls += 1
    with open(out, "w", encoding="utf-8") as handle:
        json.dump(
            {
                "successes": successes,
                "failures": failures,
                "messages": messages[:10],
                "unknown": unknown,
                "longest": longest,
                "last_success": last_success,
            },
            handle,
        )
    DatabaseConnection.reset()


def write_concurrently(path: str, task_uuid: str, rounds: int) -> None:
    """One of many agent processes writing to the same SQLite file."""
    import uuid

    DatabaseConnection.initialize(DatabaseConfig(sqlite_path=path))
    repository = TaskRepository()
    mine = str(uuid.uuid4())
    repository.create(
        {"uuid": mine, "task_source": "gitlab", "owner": "", "repo": "7", "task_type": "issue", "task_id": "1"}
    )
    for _ in range(rounds):
        assert repository.update_statistics(task_uuid, llm_calls=1, tool_calls=1, tokens=10)
        assert repository.update_statistics(mine, tokens=1)
    assert repository.complete(mine)
    DatabaseConnection.reset()


def agent_life_cycles(url: str, base_dir: str, tasks: int, rounds: int, out: str) -> None:
    """An agent process: `tasks` full TaskContextManager life cycles of `rounds` statistics each, counting
    every error the manager logged (a connection error that reached it)."""
    import json
    import logging
    import uuid

    from context_storage import GitHubIssueTaskKey, TaskContextManager

    errors: list[str] = []
    retried: list[str] = []

    class Count(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            (errors if record.levelno >= logging.ERROR else retried).append(record.getMessage())

    logging.getLogger("context_storage").addHandler(Count(level=logging.ERROR))
    logging.getLogger("db").addHandler(Count(level=logging.WARNING))
    logging.getLogger("db").setLevel(logging.WARNING)
    config = {
        "context_storage": {"base_dir": base_dir},
        "database": {
            "url": url,
            "pool": {"size": 1, "max_overflow": 1},
            # Behind PgBouncer the timeouts belong to the role: no startup options.
            "statement_timeout": 0,
            "lock_timeout": 0,
            "retry_timeout": 20,
        },
    }
    done = []
    for index in range(tasks):
        key = str(uuid.uuid4())
        manager = TaskContextManager(GitHubIssueTaskKey("acme", "web", index), key, config)
        for _ in range(rounds):
            manager.update_statistics(llm_calls=1, tool_calls=2, tokens=10)
        manager.complete()
        done.append(key)
    with open(out, "w", encoding="utf-8") as handle:
        json.dump({"tasks": done, "errors": errors, "retried": retried}, handle)
    DatabaseConnection.reset()
