"""A live manager shows a sign of life while its agent waits; `tasks stale` finds and fails the silent ones; a
manager marked failed while alive goes on, and says so."""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

from context_storage import GitHubIssueTaskKey, TaskContextManager
from db import DatabaseConnection, Task, TaskLiveness
from db.models import NO_SIGN_OF_LIFE, TaskHeartbeat, utcnow
from db.startup import start_database
from tests.support.agent import stored
from tests.support.cli import run_here

KEY = GitHubIssueTaskKey("acme", "web", 3)


def with_heartbeat(config: dict[str, Any], seconds: float) -> dict[str, Any]:
    return {**config, "context_storage": {**config["context_storage"], "heartbeat": seconds}}


def last_beat(key: str) -> tuple[Any, ...] | None:
    with DatabaseConnection.get_instance().engine.connect() as conn:
        row = conn.execute(
            select(TaskHeartbeat.beat_at, TaskHeartbeat.hostname, TaskHeartbeat.process_id).where(
                TaskHeartbeat.task_uuid == key
            )
        ).first()
    return None if row is None else tuple(row)


def wait_for(value: Callable[[], Any], seconds: float = 20.0) -> Any:
    deadline = time.monotonic() + seconds
    while not (found := value()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return found


def test_a_waiting_agent_still_beats_and_a_finished_one_stops(agent_config: dict[str, Any]) -> None:
    manager = TaskContextManager(KEY, str(uuid.uuid4()), with_heartbeat(agent_config, 0.1))
    # The agent waits on a long LLM call, writing nothing of its own: the beats come all the same (waited for
    # up to a bound, so that a loaded machine only makes the test slower).
    first = wait_for(lambda: last_beat(manager.uuid))
    assert first is not None and first[1:] == (socket.gethostname(), os.getpid())
    second = wait_for(lambda: (beat := last_beat(manager.uuid)) is not None and beat[0] != first[0] and beat)
    assert second
    manager.complete()
    time.sleep(0.3)
    stopped = last_beat(manager.uuid)
    time.sleep(0.3)
    assert last_beat(manager.uuid) == stopped
    assert stored(manager.uuid).status == "completed"


@pytest.mark.parametrize("backend", ["sqlite-file"])  # refused before any database is touched
@pytest.mark.parametrize("heartbeat", [0, -1, True, "60", float("nan"), 86401])
def test_a_heartbeat_that_is_not_a_number_of_seconds_is_refused_before_any_file(
    agent_config: dict[str, Any], heartbeat: Any
) -> None:
    with pytest.raises(ValueError, match=r"context_storage\.heartbeat"):
        TaskContextManager(KEY, str(uuid.uuid4()), with_heartbeat(agent_config, heartbeat))
    assert not Path(agent_config["context_storage"]["base_dir"], "running").exists()


def test_tasks_stale_lists_and_fails_silent_tasks_and_a_live_one_goes_on_recorded(
    agent_config: dict[str, Any], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    manager = TaskContextManager(KEY, str(uuid.uuid4()), with_heartbeat(agent_config, 3600))
    busy = TaskContextManager(GitHubIssueTaskKey("acme", "web", 4), str(uuid.uuid4()), agent_config)
    two_hours_ago = utcnow() - timedelta(hours=2)
    with DatabaseConnection.get_instance().engine.begin() as raw:
        raw.execute(update(Task).where(Task.uuid == manager.uuid).values(updated_at=two_hours_ago))
    (tmp_path / "config.yaml").write_text(json.dumps(agent_config), encoding="utf-8")
    DatabaseConnection.reset()  # each command starts the one database of its process
    listed = run_here(tmp_path, "tasks", "stale", "--minutes", "60")
    assert listed.returncode == 1, listed.stderr
    assert manager.uuid in listed.stdout and busy.uuid not in listed.stdout
    assert "acme/web#3" in listed.stdout and "2h 0m" in listed.stdout
    asked = run_here(tmp_path, "tasks", "stale", "--minutes", "60", "--fail")
    assert "1 would be marked failed: add --yes" in asked.stdout and asked.returncode == 1
    assert run_here(tmp_path, "tasks", "stale", "--minutes", "0").returncode == 2
    DatabaseConnection.reset()
    start_database(agent_config)
    assert stored(manager.uuid).status == "running"
    DatabaseConnection.reset()
    failed = run_here(tmp_path, "tasks", "stale", "--minutes", "60", "--fail", "--yes")
    assert failed.returncode == 0 and "marked 1 of 1 failed" in failed.stdout, failed.stderr
    DatabaseConnection.reset()
    start_database(agent_config)
    row = stored(manager.uuid)
    assert row.status == "failed" and row.error_message is not None
    assert row.error_message.startswith(f"{NO_SIGN_OF_LIFE} from {socket.gethostname()} since ")
    DatabaseConnection.reset()
    assert run_here(tmp_path, "tasks", "stale", "--minutes", "60").returncode == 0
    DatabaseConnection.reset()
    start_database(agent_config)
    # The agent lived: its next beat finds the failure, logs it and goes on; its finish then stands.
    heartbeat = manager._claim.heartbeat
    assert heartbeat is not None
    with caplog.at_level(logging.WARNING, logger="context_storage.task_context_manager"):
        heartbeat.beat()
    assert any("was marked failed while its agent lived" in message for message in caplog.messages)
    revived = stored(manager.uuid)
    assert revived.status == "running" and "the agent was alive and went on" in (revived.error_message or "")
    manager.complete()
    busy.complete()
    assert stored(manager.uuid).status == "completed"
    assert TaskLiveness().stale(timedelta(minutes=1)) == []
