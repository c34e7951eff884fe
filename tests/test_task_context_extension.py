"""TaskContextManager extended the way the agent extends it: a store of its own, a finishing step, earlier runs."""

from __future__ import annotations

import json
import logging
import os
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from context_storage import GitHubIssueTaskKey, TaskContextManager
from context_storage.jsonl_log import JsonlLog
from context_storage.task_lock import TaskAlreadyRunningError
from db import DatabaseConnection, TaskRepository
from db.models import INT_MAX
from tests.test_task_context_with_db import agent_config, stored, unreachable_database_config  # noqa: F401

KEY = GitHubIssueTaskKey("acme", "web", 77)
MANAGER_LOGGER = "context_storage.task_context_manager"


@contextmanager
def tasks_table_away() -> Iterator[None]:
    """The tasks table renamed away for the duration: every statement on it fails as on a lost database."""
    with DatabaseConnection.get_instance().engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE tasks RENAME TO tasks_away")
    try:
        yield
    finally:
        with DatabaseConnection.get_instance().engine.begin() as conn:
            conn.exec_driver_sql("ALTER TABLE tasks_away RENAME TO tasks")


def manager_said(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == MANAGER_LOGGER]


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


def test_earlier_runs_are_bounded_by_limit_and_expiry_and_never_include_this_run(
    agent_config: dict[str, Any],  # noqa: F811
) -> None:
    current = TaskContextManager(KEY, str(uuid.uuid4()), agent_config)
    repository = TaskRepository()
    now = datetime.now(UTC)
    fields = {"task_source": "github", "owner": "acme", "repo": "web", "task_type": "issue", "task_id": "77"}
    completed = [
        repository.create(
            {**fields, "uuid": str(uuid.uuid4()), "status": "completed", "completed_at": now - timedelta(days=days)}
        ).uuid
        for days in range(1, 12)
    ]
    ancient = repository.create(
        {**fields, "uuid": str(uuid.uuid4()), "status": "completed", "completed_at": now - timedelta(days=400)}
    ).uuid
    running = [
        repository.create(
            {**fields, "uuid": str(uuid.uuid4()), "status": "running", "created_at": now - timedelta(hours=hours)}
        ).uuid
        for hours in (1, 2, 3)
    ]
    assert [run.task.uuid for run in current.previous_runs()] == completed[:10]  # ten by default
    assert [run.task.uuid for run in current.previous_runs(limit=20)] == [*completed, ancient]  # no expiry
    assert [run.task.uuid for run in current.previous_runs(expiry_days=5.5)] == completed[:5]
    # This run is the newest running one: it is skipped and the limit still counts the others.
    assert [run.task.uuid for run in current.previous_runs(statuses=("running",), limit=2)] == running[:2]
    assert all(run.context_dir is None for run in current.previous_runs(statuses=("running",)))
    current.complete()


def test_earlier_runs_while_the_database_is_down_are_none_and_say_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, refused_port: int
) -> None:
    config = unreachable_database_config(tmp_path, refused_port, startup_timeout=0)
    key = str(uuid.uuid4())
    manager = TaskContextManager(KEY, key, config)
    with caplog.at_level(logging.ERROR, logger=MANAGER_LOGGER):
        assert manager.previous_runs() == []
    messages = [record.getMessage() for record in caplog.records]
    assert messages[-1] == f"earlier runs of task {key} not looked up: the database is unavailable"
    assert sum("earlier runs" in message for message in messages) == 1


class _Recording(TaskContextManager):
    seen: list[tuple[str, str | None]]

    def before_finish(self, status: str, error_message: str | None) -> None:
        self.seen = [*getattr(self, "seen", []), (status, error_message)]


def test_a_status_change_reaches_the_row_and_a_bad_one_is_refused_by_name(
    agent_config: dict[str, Any],  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    key = str(uuid.uuid4())
    manager = _Recording(KEY, key, agent_config)
    manager.update_status("failed", "the tests did not pass")
    row = stored(key)
    assert (row.status, row.error_message) == ("failed", "the tests did not pass")
    with caplog.at_level(logging.ERROR, logger=MANAGER_LOGGER):
        manager.update_status("paused")
    assert any(
        record.getMessage().startswith(f"update_status of task {key} refused: unknown task status 'paused'")
        for record in caplog.records
    )
    assert stored(key).status == "failed"
    manager.stop()
    assert manager.seen == [("stopped", None)]
    row = stored(key)
    assert (row.status, row.completed_at is not None) == ("stopped", True)
    metadata = json.loads((manager.context_dir / "metadata.json").read_text(encoding="utf-8"))
    assert metadata["status"] == "stopped"


def test_counts_the_counters_cannot_hold_are_refused_at_the_call(agent_config: dict[str, Any]) -> None:  # noqa: F811
    key = str(uuid.uuid4())
    manager = TaskContextManager(KEY, key, agent_config)
    manager.update_statistics(tokens=INT_MAX)
    for bad, shown in ((INT_MAX + 1, str(INT_MAX + 1)), (-1, "-1"), (True, "True"), (1.0, "1.0")):
        with pytest.raises(ValueError, match=rf"^tokens must be an integer in 0\.\.{INT_MAX}, got {shown}$"):
            manager.update_statistics(tokens=bad)  # type: ignore[arg-type]
    amounts = {"llm_calls": 0, "tool_calls": 0, "tokens": 1, "compressions": 0}
    with pytest.raises(ValueError, match=rf"^task {key}: the counters cannot take {amounts}; they were not counted$"):
        manager.update_statistics(tokens=1)  # the database's counter is full
    manager.update_statistics(llm_calls=2)
    assert manager.pending_statistics == {"llm_calls": 0, "tool_calls": 0, "tokens": 0, "compressions": 0}
    row = stored(key)
    assert (row.total_tokens, row.llm_call_count) == (INT_MAX, 2)
    manager.complete()


def test_a_failed_write_is_logged_by_name_and_not_retried_at_every_call(
    agent_config: dict[str, Any],  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    key = str(uuid.uuid4())
    manager = TaskContextManager(KEY, key, agent_config)
    with tasks_table_away(), caplog.at_level(logging.ERROR, logger=MANAGER_LOGGER):
        manager.update_status("running")
        manager.update_status("running")
        manager.update_statistics(llm_calls=1)
    said = manager_said(caplog)
    assert said[0].startswith(f"update_status of task {key} failed, the task goes on: update_status failed: ")
    # Within the pause that follows, the database is not tried again: the later calls only say so.
    assert said[1:] == [
        f"update_status of task {key} not written: the database is unavailable",
        f"update_statistics of task {key} not written: the database is unavailable",
    ]
    assert manager.pending_statistics["llm_calls"] == 1


@pytest.mark.parametrize(
    ("first", "second", "called"),
    [("fail", "complete", "complete"), ("complete", "stop", "stop"), ("stop", "fail", "fail")],
)
def test_a_second_finish_says_which_outcome_stands(
    agent_config: dict[str, Any],  # noqa: F811
    caplog: pytest.LogCaptureFixture,
    first: str,
    second: str,
    called: str,
) -> None:
    key = str(uuid.uuid4())
    manager = TaskContextManager(KEY, key, agent_config)
    finish = {"fail": lambda: manager.fail("boom"), "complete": manager.complete, "stop": manager.stop}
    finish[first]()
    outcome = {"fail": "failed", "complete": "completed", "stop": "stopped"}[first]
    with caplog.at_level(logging.WARNING, logger=MANAGER_LOGGER):
        finish[second]()
    assert manager_said(caplog) == [
        f"task {key} already finished as {outcome}; {called}() leaves that outcome and the directory as they are"
    ]
    assert stored(key).status == outcome


def test_earlier_runs_when_the_lookup_fails_say_why(
    agent_config: dict[str, Any],  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    key = str(uuid.uuid4())
    manager = TaskContextManager(KEY, key, agent_config)
    with tasks_table_away(), caplog.at_level(logging.ERROR, logger=MANAGER_LOGGER):
        assert manager.previous_runs() == []
    said = manager_said(caplog)
    assert len(said) == 1
    assert said[0].startswith(f"earlier runs of task {key} not looked up: list tasks failed: ")


def test_statistics_kept_while_the_table_was_away_are_written_by_the_next_run(
    agent_config: dict[str, Any],  # noqa: F811
) -> None:
    key = str(uuid.uuid4())
    manager = _Recording(KEY, key, agent_config)
    manager.update_statistics(llm_calls=3)
    with tasks_table_away():
        manager.update_statistics(tokens=50)
        manager.fail("the LLM gave up")
    assert manager.seen == [("failed", "the LLM gave up")]
    metadata = json.loads((manager.context_dir / "metadata.json").read_text(encoding="utf-8"))
    kept = metadata["unsaved"]
    assert kept["statistics"]["tokens"] == 50
    assert kept["outcome"] == {
        "status": "failed",
        "error_message": "the LLM gave up",
        "completed_at": metadata["completed_at"],
    }
    assert datetime.fromisoformat(metadata["completed_at"]).utcoffset() == timedelta(0)
    assert metadata["status"] == "failed"
    assert (stored(key).llm_call_count, stored(key).total_tokens, stored(key).status) == (3, 0, "running")

    resumed = TaskContextManager(KEY, key, agent_config, is_resumed=True)
    resumed.complete()
    row = stored(key)
    assert (row.status, row.llm_call_count, row.total_tokens) == ("completed", 3, 50)
    assert "unsaved" not in json.loads((resumed.context_dir / "metadata.json").read_text(encoding="utf-8"))


def test_a_new_task_starts_its_metadata_and_a_second_start_names_the_holder(
    agent_config: dict[str, Any],  # noqa: F811
) -> None:
    key = str(uuid.uuid4())
    before = datetime.now(UTC)
    manager = TaskContextManager(KEY, key, agent_config, user="zoe")
    metadata = json.loads((manager.context_dir / "metadata.json").read_text(encoding="utf-8"))
    assert metadata["uuid"] == key and metadata["user"] == "zoe"
    assert metadata["task_key"] == KEY.to_dict()
    assert (metadata["config"]["llm_provider"], metadata["config"]["model"]) == ("openai", "gpt-4o")
    assert metadata["process_id"] == os.getpid() and metadata["hostname"] == socket.gethostname()
    created = datetime.fromisoformat(metadata["created_at"])
    assert created.utcoffset() == timedelta(0) and before <= created <= datetime.now(UTC)
    with pytest.raises(TaskAlreadyRunningError) as raised:
        TaskContextManager(KEY, key, agent_config)
    assert f"(process {os.getpid()} on {socket.gethostname()})" in str(raised.value)
    manager.complete()


def test_without_a_base_dir_tasks_live_under_contexts(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    agent_config: dict[str, Any],  # noqa: F811
) -> None:
    monkeypatch.chdir(tmp_path)
    config = {key: value for key, value in agent_config.items() if key != "context_storage"}
    if agent_config["database"].get("type") == "sqlite":
        config["database"] = {"type": "sqlite", "sqlite": {"path": str(tmp_path / "tasks.db")}}
    key = str(uuid.uuid4())
    manager = TaskContextManager(KEY, key, config)
    assert manager.context_dir == Path("contexts") / "running" / key
    assert (tmp_path / "contexts" / "locks" / f"{key}.lock").is_file()
    manager.complete()


def test_increments_the_counters_refuse_at_the_end_are_dropped_and_the_task_still_finishes(
    agent_config: dict[str, Any],  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    key = str(uuid.uuid4())
    manager = TaskContextManager(KEY, key, agent_config)
    with tasks_table_away():
        manager.update_statistics(tokens=5)  # kept in memory: the table is away
    TaskRepository().update_statistics(key, tokens=INT_MAX)  # another writer filled the counter meanwhile
    with caplog.at_level(logging.ERROR, logger=MANAGER_LOGGER):
        manager.complete()
    amounts = {"llm_calls": 0, "tool_calls": 0, "tokens": 5, "compressions": 0}
    assert f"task {key}: the counters cannot take {amounts}; dropped" in manager_said(caplog)
    row = stored(key)
    assert (row.status, row.total_tokens) == ("completed", INT_MAX)
    assert manager.pending_statistics == dict.fromkeys(amounts, 0)
