"""TaskContextManager extended the way the agent extends it: a store of its own, a finishing step, earlier runs."""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from context_storage import GitHubIssueTaskKey, TaskContextManager
from context_storage.jsonl_log import JsonlLog
from context_storage.task_lock import TaskAlreadyRunningError, TaskLock
from db import DatabaseConnection, TaskRepository
from db.models import INT_MAX
from db.startup import start_database
from tests.support.agent import kept_statistics, stored, unreachable_database_config

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


@contextmanager
def counting_off() -> Iterator[None]:
    """A trigger that fails every write to the counters (and nothing else) as a lost database would."""
    engine = DatabaseConnection.get_instance().engine
    columns = "llm_call_count, tool_call_count, total_tokens, compression_count"
    if engine.dialect.name == "sqlite":
        # The trigger calls a function that does not exist: an UPDATE of a counter fails when it is prepared.
        install = [f"CREATE TRIGGER counting_off BEFORE UPDATE OF {columns} ON tasks BEGIN SELECT counting_off(); END"]
        remove = ["DROP TRIGGER counting_off"]
    else:
        install = [
            "CREATE FUNCTION counting_off() RETURNS trigger LANGUAGE plpgsql "
            "AS $$ BEGIN RAISE EXCEPTION 'counting is off'; END $$",
            f"CREATE TRIGGER counting_off BEFORE UPDATE OF {columns} ON tasks "
            "FOR EACH ROW EXECUTE FUNCTION counting_off()",
        ]
        remove = ["DROP TRIGGER counting_off ON tasks", "DROP FUNCTION counting_off()"]
    with engine.begin() as conn:
        for statement in install:
            conn.exec_driver_sql(statement)
    try:
        yield
    finally:
        with engine.begin() as conn:
            for statement in remove:
                conn.exec_driver_sql(statement)


@pytest.fixture
def tokyo_local_time() -> Iterator[None]:
    """The process's local time zone set far from UTC, so that a time taken in local time shows."""
    before = os.environ.get("TZ")
    os.environ["TZ"] = "Asia/Tokyo"
    time.tzset()
    try:
        yield
    finally:
        if before is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = before
        time.tzset()


def metadata_of(directory: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((directory / "metadata.json").read_text(encoding="utf-8"))
    return loaded


def failed_while_the_table_was_away(config: dict[str, Any], tokens: int = 0) -> TaskContextManager:
    """A new task that counted `tokens` and failed while the tasks table was away: metadata.json keeps both."""
    manager = TaskContextManager(KEY, str(uuid.uuid4()), config)
    with tasks_table_away():
        if tokens:
            manager.update_statistics(tokens=tokens)
        manager.fail("the LLM gave up")
    return manager


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


def test_a_store_of_its_own_moves_with_the_task_and_comes_back(agent_config: dict[str, Any]) -> None:
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
    agent_config: dict[str, Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    key = str(uuid.uuid4())
    manager = PlanningTaskContextManager(KEY, key, agent_config)
    manager.fail_summary = True
    with caplog.at_level(logging.ERROR):
        manager.stop()
    assert stored(key).status == "stopped"
    assert manager.context_dir.parent.name == "completed" and manager.context_dir.is_dir()
    assert f"the finishing step of task {key} failed; the task finishes as stopped" in manager_said(caplog)


def test_every_earlier_run_has_its_files_where_inheritance_looks(agent_config: dict[str, Any]) -> None:
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
    agent_config: dict[str, Any],
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
    agent_config: dict[str, Any],
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


def test_counts_the_counters_cannot_hold_are_refused_at_the_call(agent_config: dict[str, Any]) -> None:
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
    agent_config: dict[str, Any],
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
    agent_config: dict[str, Any],
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
    agent_config: dict[str, Any],
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
    agent_config: dict[str, Any],
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
    assert kept_statistics(metadata)["tokens"] == 50
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
    agent_config: dict[str, Any],
) -> None:
    key = str(uuid.uuid4())
    before = datetime.now(UTC)
    manager = TaskContextManager(KEY, key, agent_config, user="zoe")
    metadata = json.loads((manager.context_dir / "metadata.json").read_text(encoding="utf-8"))
    assert metadata["uuid"] == key and metadata["user"] == "zoe"
    assert metadata["task_key"] == KEY.to_dict()
    assert (metadata["config"]["llm_provider"], metadata["config"]["model"]) == ("openai", "gpt-4o")
    assert manager.get_message_store().config is agent_config
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
    agent_config: dict[str, Any],
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
    agent_config: dict[str, Any],
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
    assert "unsaved" not in metadata_of(manager.context_dir)


def test_a_task_the_database_missed_at_start_is_registered_when_it_finishes(
    agent_config: dict[str, Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    key = str(uuid.uuid4())
    start_database(agent_config)
    with tasks_table_away(), caplog.at_level(logging.ERROR, logger=MANAGER_LOGGER):
        manager = TaskContextManager(KEY, key, agent_config)
    assert manager_said(caplog)[0].startswith(f"register of task {key} failed, the task goes on: ")
    manager.update_statistics(tokens=7)  # within the pause after the failure: kept in memory
    manager.complete()  # the end: tried again, registered, then written
    row = stored(key)
    assert (row.status, row.total_tokens) == ("completed", 7)
    assert "unsaved" not in metadata_of(manager.context_dir)


def test_an_outcome_the_database_missed_is_kept_even_with_nothing_else_pending(
    agent_config: dict[str, Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    key = str(uuid.uuid4())
    manager = TaskContextManager(KEY, key, agent_config)
    with tasks_table_away(), caplog.at_level(logging.ERROR, logger=MANAGER_LOGGER):
        manager.fail("the build broke")
    said = manager_said(caplog)
    assert len(said) == 1
    assert said[0].startswith(f"fail of task {key} failed, the task goes on: fail failed: ")
    metadata = metadata_of(manager.context_dir)
    assert metadata["unsaved"] == {
        "outcome": {"status": "failed", "error_message": "the build broke", "completed_at": metadata["completed_at"]}
    }
    assert manager.pending_statistics == {"llm_calls": 0, "tool_calls": 0, "tokens": 0, "compressions": 0}
    assert stored(key).status == "running"


def test_a_second_finish_keeps_what_it_cannot_write_and_writes_what_it_can(
    agent_config: dict[str, Any],
) -> None:
    zero = {"llm_calls": 0, "tool_calls": 0, "tokens": 0, "compressions": 0}
    lost, written = str(uuid.uuid4()), str(uuid.uuid4())
    manager = TaskContextManager(KEY, lost, agent_config)
    manager.complete()
    with tasks_table_away():
        manager.update_statistics(tokens=5)
        manager.stop()  # the table is still away: kept in the finished task's metadata.json
    assert kept_statistics(metadata_of(manager.context_dir)) == {**zero, "tokens": 5}
    assert "outcome" not in metadata_of(manager.context_dir)["unsaved"]
    assert manager.pending_statistics == zero
    assert (stored(lost).status, stored(lost).total_tokens) == ("completed", 0)

    manager = TaskContextManager(KEY, written, agent_config)
    manager.complete()
    with tasks_table_away():
        manager.update_statistics(tokens=5)  # fails, and the pause after a failure begins
    manager.fail("late")  # within that pause, but a finish: tried anyway, and the table is back
    assert (stored(written).status, stored(written).total_tokens) == ("completed", 5)
    assert "unsaved" not in metadata_of(manager.context_dir)
    assert manager.pending_statistics == zero


def test_statistics_the_counters_refused_at_start_are_written_once_they_take_them(
    agent_config: dict[str, Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.ERROR, logger=MANAGER_LOGGER):
        key = failed_while_the_table_was_away(agent_config, tokens=40).uuid
    assert manager_said(caplog)[0].startswith(
        f"update_statistics of task {key} failed, the task goes on: update_statistics failed: "
    )
    caplog.clear()
    with counting_off(), caplog.at_level(logging.ERROR, logger=MANAGER_LOGGER):
        resumed = TaskContextManager(KEY, key, agent_config, is_resumed=True)  # the kept 40 are refused
    said = manager_said(caplog)
    assert len(said) == 1 and said[0].startswith(f"write kept statistics of task {key} failed, the task goes on: ")
    resumed.complete()  # within the pause, but a finish: the kept 40 are tried again and taken
    row = stored(key)
    assert (row.status, row.total_tokens) == ("completed", 40)
    assert "unsaved" not in metadata_of(resumed.context_dir)


def test_an_outcome_waits_with_the_statistics_the_counters_refuse_and_both_land_once(
    agent_config: dict[str, Any],
) -> None:
    key = failed_while_the_table_was_away(agent_config, tokens=40).uuid
    with counting_off():
        resumed = TaskContextManager(KEY, key, agent_config, is_resumed=True)
        resumed.complete()
    # The row is finished only with its counters: until they are written, both wait in metadata.json.
    row = stored(key)
    assert (row.status, row.total_tokens) == ("running", 0)
    outcome = metadata_of(resumed.context_dir)["unsaved"]["outcome"]
    assert (outcome["status"], outcome["error_message"]) == ("completed", None)

    TaskContextManager(KEY, key, agent_config, is_resumed=True).complete()
    row = stored(key)
    assert (row.status, row.total_tokens) == ("completed", 40)


def test_a_start_without_resuming_drops_an_outcome_kept_from_the_earlier_run(
    agent_config: dict[str, Any],
) -> None:
    base = Path(agent_config["context_storage"]["base_dir"])
    key = failed_while_the_table_was_away(agent_config).uuid
    # As if that process had died between keeping its outcome and moving its directory.
    (base / "completed" / key).rename(base / "running" / key)
    again = TaskContextManager(KEY, key, agent_config)
    metadata = metadata_of(again.context_dir)
    assert (metadata["status"], "error_message" in metadata, "unsaved" in metadata) == ("running", False, False)
    again.complete()
    assert stored(key).status == "completed"
    assert "unsaved" not in metadata_of(again.context_dir)


def test_a_start_without_resuming_leaves_the_earlier_files_and_finishes_beside_them(
    agent_config: dict[str, Any],
    caplog: pytest.LogCaptureFixture,
    tokyo_local_time: None,
) -> None:
    base = Path(agent_config["context_storage"]["base_dir"])
    key = str(uuid.uuid4())
    first = TaskContextManager(KEY, key, agent_config)
    first.get_message_store().add_message("user", "first run")
    first.fail("boom")
    again = TaskContextManager(KEY, key, agent_config)
    assert again.context_dir == base / "running" / key
    assert again.get_message_store().count_messages() == 0
    row = stored(key)
    assert (row.status, row.error_message, row.completed_at) == ("running", None, None)
    before = datetime.now(UTC)
    with caplog.at_level(logging.WARNING, logger=MANAGER_LOGGER):
        again.complete()
    after = datetime.now(UTC)
    moved = again.context_dir
    assert moved.parent == base / "completed"
    assert manager_said(caplog) == [f"completed/{key} exists; moving task {key} to {moved}"]
    stamp = re.fullmatch(rf"{key}-(\d{{8}}T\d{{12}})Z", moved.name)
    assert stamp is not None, moved.name
    moved_at = datetime.strptime(stamp[1], "%Y%m%dT%H%M%S%f").replace(tzinfo=UTC)
    assert before <= moved_at <= after
    assert metadata_of(moved)["status"] == "completed"
    assert TaskContextManager(KEY, str(uuid.uuid4()), agent_config).previous_runs()[0].task.uuid == key
    assert metadata_of(base / "completed" / key)["error_message"] == "boom"


def test_a_second_start_names_whoever_last_worked_on_the_task(agent_config: dict[str, Any]) -> None:
    base = Path(agent_config["context_storage"]["base_dir"])
    key = str(uuid.uuid4())
    (base / "completed" / key).mkdir(parents=True)
    (base / "completed" / key / "metadata.json").write_text('{"process_id": 4242, "hostname": "build-7"}')
    (base / "running" / key).mkdir(parents=True)
    holder = TaskLock(base, key)
    holder.acquire()
    try:
        # What running/ holds is unreadable, not an object, or names no process: completed/ is asked next.
        for running in ("", "[1]", "{}", '{"process_id": 0}'):
            (base / "running" / key / "metadata.json").write_text(running)
            with pytest.raises(TaskAlreadyRunningError) as raised:
                TaskContextManager(KEY, key, agent_config)
            assert "is already being worked on (process 4242 on build-7);" in str(raised.value), running
        (base / "completed" / key / "metadata.json").unlink()
        with pytest.raises(TaskAlreadyRunningError) as raised:
            TaskContextManager(KEY, key, agent_config)
        assert f"task {key} is already being worked on; it can be" in str(raised.value)
    finally:
        holder.release()


def test_statistics_kept_on_disk_wait_quietly_when_the_database_is_missed_at_start(
    agent_config: dict[str, Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    key = failed_while_the_table_was_away(agent_config, tokens=9).uuid
    caplog.clear()
    with tasks_table_away(), caplog.at_level(logging.ERROR, logger=MANAGER_LOGGER):
        resumed = TaskContextManager(KEY, key, agent_config, is_resumed=True)
    said = manager_said(caplog)
    assert len(said) == 1 and said[0].startswith(f"register of task {key} failed, the task goes on: "), said
    resumed.complete()
    row = stored(key)
    assert (row.status, row.total_tokens) == ("completed", 9)
