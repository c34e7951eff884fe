"""TaskContextManager extended the way the agent extends it: a store of its own, a finishing step, earlier runs."""

from __future__ import annotations

import json
import logging
import uuid
from pathlib import Path
from typing import Any

import pytest

from context_storage import GitHubIssueTaskKey, TaskContextManager
from context_storage.jsonl_log import JsonlLog
from tests.test_task_context_with_db import LLM, agent_config, stored  # noqa: F401

KEY = GitHubIssueTaskKey("acme", "web", 77)


@pytest.fixture(params=["sqlite-file", "postgresql"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class PlanningTaskContextManager(TaskContextManager):
    """What the agent adds: a planning history, and a final summary written just before the files move."""

    fail_summary = False

    def open_extra_stores(self) -> None:
        (self.context_dir / "planning").mkdir(exist_ok=True)
        self.planning = JsonlLog(self.context_dir / "planning" / "plans.jsonl")

    def before_finish(self, status: str, error_message: str | None) -> None:
        if self.fail_summary:
            raise RuntimeError("the LLM is down")
        summary = {"status": status, "error": error_message, "plans": self.planning.last_number()}
        (self.context_dir / "final_summary.json").write_text(json.dumps(summary), encoding="utf-8")
        self.update_statistics(llm_calls=1, tokens=250)  # the summary's own LLM call


def test_a_store_of_its_own_moves_with_the_task_and_comes_back(agent_config: dict[str, Any]) -> None:  # noqa: F811
    key = str(uuid.uuid4())
    manager = PlanningTaskContextManager(KEY, key, agent_config)
    assert manager.planning.append({"step": "read the issue"}) == 1
    manager.complete()
    base = Path(agent_config["context_storage"]["base_dir"])
    finished = base / "completed" / key
    assert manager.context_dir == finished and (finished / "planning" / "plans.jsonl").is_file()
    assert json.loads((finished / "final_summary.json").read_text(encoding="utf-8")) == {
        "status": "completed",
        "error": None,
        "plans": 1,
    }
    row = stored(key)
    assert (row.status, row.llm_call_count, row.total_tokens) == ("completed", 1, 250)
    resumed = PlanningTaskContextManager(KEY, key, agent_config, is_resumed=True)
    assert resumed.context_dir == base / "running" / key
    assert resumed.planning.append({"step": "fix the review comments"}) == 2
    resumed.fail("tests failed")
    assert json.loads((base / "completed" / key / "final_summary.json").read_text(encoding="utf-8"))["plans"] == 2


def test_a_failing_finishing_step_never_stops_the_finishing(
    agent_config: dict[str, Any],  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    key = str(uuid.uuid4())
    manager = PlanningTaskContextManager(KEY, key, agent_config)
    manager.fail_summary = True
    with caplog.at_level(logging.ERROR):
        manager.stop()
    assert stored(key).status == "stopped"
    assert manager.context_dir.parent.name == "completed" and manager.context_dir.is_dir()
    assert any("finishing step" in record.getMessage() for record in caplog.records)


def test_every_earlier_run_has_its_files_where_inheritance_looks(agent_config: dict[str, Any]) -> None:  # noqa: F811
    base = Path(agent_config["context_storage"]["base_dir"])
    first, second, third = (str(uuid.uuid4()) for _ in range(3))
    run = TaskContextManager(KEY, first, agent_config)
    run.get_message_store().add_message("user", "first run")
    run.complete()
    resumed = TaskContextManager(KEY, first, agent_config, is_resumed=True)
    resumed.get_message_store().add_message("user", "resumed")
    resumed.complete()
    TaskContextManager(KEY, second, agent_config).stop()
    TaskContextManager(KEY, str(uuid.uuid4()), agent_config).fail("not an earlier run to inherit from")
    TaskContextManager(GitHubIssueTaskKey("acme", "web", 78), str(uuid.uuid4()), agent_config).complete()
    current = TaskContextManager(KEY, third, agent_config)
    runs = current.previous_runs(expiry_days=30)
    assert [run.task.uuid for run in runs] == [second, first]
    for previous in runs:
        assert previous.context_dir == base / "completed" / previous.task.uuid
        assert (
            json.loads((previous.context_dir / "metadata.json").read_text(encoding="utf-8"))["uuid"]
            == previous.task.uuid
        )
    assert runs[1].context_dir is not None
    assert (runs[1].context_dir / "messages.jsonl").read_text(encoding="utf-8").count("\n") == 2
    assert current.previous_runs(expiry_days=30, statuses=("failed",))[0].task.error_message is not None
    assert current.previous_runs(expiry_days=0) == []
    current.complete()
