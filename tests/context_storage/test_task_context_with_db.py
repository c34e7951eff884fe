"""TaskContextManager over a real database: life cycles on SQLite and PostgreSQL, and outages."""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from context_storage import (
    GitHubIssueTaskKey,
    GitHubPullRequestTaskKey,
    GitLabIssueTaskKey,
    GitLabMergeRequestTaskKey,
    TaskContextManager,
    TaskKey,
    task_context_manager,
)
from tests.support.agent import LLM, counters, kept_statistics, stored, unreachable_database_config
from tools.postgres_server import PostgresServer


@pytest.mark.parametrize(
    ("key", "row"),
    [
        (GitHubIssueTaskKey("acme", "web", 42), ("github", "acme", "web", "issue", "42")),
        (GitHubPullRequestTaskKey("acme", "web", 43), ("github", "acme", "web", "pull_request", "43")),
        (GitLabIssueTaskKey(321, 5), ("gitlab", "", "321", "issue", "5")),
        (GitLabMergeRequestTaskKey(321, 6), ("gitlab", "", "321", "merge_request", "6")),
    ],
)
def test_life_cycle_from_config_alone(agent_config: dict[str, Any], key: TaskKey, row: tuple[str, ...]) -> None:
    task_uuid = str(uuid.uuid4())
    manager = TaskContextManager(key, task_uuid, agent_config, user="alice")
    base = Path(agent_config["context_storage"]["base_dir"])
    assert manager.context_dir == base / "running" / task_uuid
    metadata = json.loads((manager.context_dir / "metadata.json").read_text(encoding="utf-8"))
    assert metadata["task_key"] == key.to_dict() and metadata["user"] == "alice"
    task = stored(task_uuid)
    assert (task.task_source, task.owner, task.repo, task.task_type, task.task_id) == row
    assert (task.status, task.user, task.llm_provider, task.model, task.context_length) == (
        "running",
        "alice",
        "openai",
        "gpt-4o",
        128000,
    )
    assert (task.process_id, task.hostname) == (os.getpid(), socket.gethostname())
    assert task.started_at is not None and task.completed_at is None

    manager.get_message_store().add_message("user", "please fix the bug")
    manager.get_tool_store().add_tool_call("read_file", {"path": "x"}, "ok", "success", 5)
    manager.update_statistics(llm_calls=1, tool_calls=1, tokens=120)
    manager.update_statistics(llm_calls=1, tokens=80, compressions=1)
    manager.update_status("running")
    manager.complete()

    task = stored(task_uuid)
    assert task.status == "completed" and task.completed_at is not None
    assert counters(task) == (2, 1, 200, 1)
    assert manager.context_dir == base / "completed" / task_uuid
    assert not (base / "running" / task_uuid).exists()
    assert (manager.context_dir / "messages.jsonl").exists() and (manager.context_dir / "tools.jsonl").exists()


def test_stop_then_resume_then_fail(agent_config: dict[str, Any]) -> None:
    key = GitHubIssueTaskKey("acme", "web", 7)
    task_uuid = str(uuid.uuid4())
    first = TaskContextManager(key, task_uuid, agent_config, user="bob")
    first.get_message_store().add_message("user", "start")
    first.update_statistics(llm_calls=3, tokens=300)
    first.stop()
    stopped = stored(task_uuid)
    assert stopped.status == "stopped" and stopped.completed_at is not None

    resumed = TaskContextManager(key, task_uuid, agent_config, user="bob", is_resumed=True)
    assert resumed.context_dir.parent.name == "running"
    assert resumed.get_message_store().add_message("user", "again") == 2
    running = stored(task_uuid)
    assert running.status == "running" and running.completed_at is None
    assert running.started_at is not None and stopped.started_at is not None
    assert running.started_at > stopped.started_at
    assert running.created_at == stopped.created_at
    assert counters(running) == (3, 0, 300, 0)

    resumed.update_statistics(llm_calls=1)
    resumed.fail("LLM timeout")
    failed = stored(task_uuid)
    assert (failed.status, failed.error_message, failed.llm_call_count) == ("failed", "LLM timeout", 4)
    assert resumed.context_dir.parent.name == "completed"


def test_resume_of_an_unknown_task_registers_it(agent_config: dict[str, Any]) -> None:
    task_uuid = str(uuid.uuid4())
    TaskContextManager(GitLabIssueTaskKey(9, 1), task_uuid, agent_config, is_resumed=True)
    assert stored(task_uuid).status == "running"


def test_statistics_survive_a_database_outage(
    own_cluster: PostgresServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pause = 1.0
    monkeypatch.setattr(task_context_manager, "START_AGAIN_AFTER_SECONDS", pause)
    cluster = own_cluster.cluster
    assert cluster is not None
    config = {
        "context_storage": {"base_dir": str(tmp_path / "contexts")},
        "llm": LLM,
        "database": {
            "url": own_cluster.url.render_as_string(hide_password=False),
            "retry_timeout": 0.3,
            "startup_timeout": 0.5,
            "connect_timeout": 2,
        },
    }
    manager = TaskContextManager(GitHubIssueTaskKey("acme", "web", 1), str(uuid.uuid4()), config, user="carol")
    manager.update_statistics(llm_calls=1, tool_calls=1, tokens=100)

    cluster.shutdown("fast")
    late = TaskContextManager(GitHubIssueTaskKey("acme", "web", 2), str(uuid.uuid4()), config)  # cannot register
    for round_ in range(3):
        assert manager.get_message_store().add_message("user", f"during the outage {round_}") == round_ + 1
        manager.update_statistics(llm_calls=2, tool_calls=3, tokens=200, compressions=1)
    late.update_statistics(tokens=5)
    assert manager.pending_statistics == {"llm_calls": 6, "tool_calls": 9, "tokens": 600, "compressions": 3}

    cluster.resume()
    time.sleep(pause)  # the pause after the failure ends
    manager.update_statistics(llm_calls=1)
    assert manager.pending_statistics == dict.fromkeys(manager.pending_statistics, 0)
    assert counters(stored(manager.uuid)) == (8, 10, 700, 3)

    cluster.shutdown("immediate")
    manager.update_statistics(tokens=50)
    manager.complete()  # the database is down: the files still move, the row waits
    assert manager.context_dir.parent.name == "completed"
    cluster.resume()
    time.sleep(pause)
    late.complete()
    late_row = stored(late.uuid)
    assert late_row.status == "completed" and late_row.total_tokens == 5

    # Finalisation failed while the server was down: what it could not write waits in metadata.json.
    assert stored(manager.uuid).total_tokens == 700
    unsaved = json.loads((manager.context_dir / "metadata.json").read_text(encoding="utf-8"))["unsaved"]
    assert kept_statistics({"unsaved": unsaved}) == {"llm_calls": 0, "tool_calls": 0, "tokens": 50, "compressions": 0}
    assert unsaved["outcome"]["status"] == "completed"
    resumed = TaskContextManager(manager.task_key, manager.uuid, config, is_resumed=True)
    assert counters(stored(manager.uuid)) == (8, 10, 750, 3)
    resumed.complete()
    assert stored(manager.uuid).status == "completed"
    assert "unsaved" not in json.loads((resumed.context_dir / "metadata.json").read_text(encoding="utf-8"))


def test_a_database_down_at_start_is_not_waited_for_at_every_call(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, refused_port: int
) -> None:
    config = unreachable_database_config(tmp_path, refused_port, startup_timeout=0.5)
    key = str(uuid.uuid4())
    with caplog.at_level(logging.ERROR, logger="context_storage.task_context_manager"):
        manager = TaskContextManager(GitHubIssueTaskKey("acme", "web", 9), key, config)
        for _ in range(5):
            manager.get_message_store().add_message("user", "still working")
            manager.update_statistics(llm_calls=1, tokens=10)
        assert manager.previous_runs() == []
        said = [record.getMessage() for record in caplog.records]
        assert said[0].startswith(f"database unavailable for task {key}, the task goes on: ")
        assert "127.0.0.1" in said[0]
        assert [message for message in said if "database unavailable" in message] == [said[0]], (
            "a call within the pause tried to start the database again"
        )
        assert said[-1] == f"earlier runs of task {key} not looked up: the database is unavailable"
        caplog.clear()
        manager.complete()  # the last chance: tried again even within the pause
    said = [record.getMessage() for record in caplog.records]
    assert said[0].startswith(f"database unavailable for task {key}, the task goes on: ")
    assert said[1:] == [f"complete of task {key} not written: the database is unavailable"]
    assert manager.get_message_store().count_messages() == 5
    assert manager.pending_statistics == {"llm_calls": 0, "tool_calls": 0, "tokens": 0, "compressions": 0}
    metadata = json.loads((manager.context_dir / "metadata.json").read_text(encoding="utf-8"))
    assert metadata["status"] == "completed"
    assert kept_statistics(metadata) == {"llm_calls": 5, "tool_calls": 0, "tokens": 50, "compressions": 0}
    assert metadata["unsaved"]["outcome"] == {
        "status": "completed",
        "error_message": None,
        "completed_at": metadata["completed_at"],
    }
    manager.update_statistics(tokens=1)
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="context_storage.task_context_manager"):
        manager.stop()  # a second finish: its statistics are kept beside the outcome
    said = [record.getMessage() for record in caplog.records]
    assert said[1:] == [f"update_statistics of task {key} not written: the database is unavailable"]
    metadata = json.loads((manager.context_dir / "metadata.json").read_text(encoding="utf-8"))
    assert kept_statistics(metadata)["tokens"] == 51
    assert metadata["unsaved"]["outcome"]["status"] == "completed"
