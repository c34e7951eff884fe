"""The agent as it really runs, in one long-lived process: its own task keys, its planning store and final
summary, a consumer loop that pauses a task (directory moved aside, manager dropped unfinished) and resumes it
later in the same process, a later run inheriting from earlier ones, and starts that fail."""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import URL

import main
from context_storage import TaskAlreadyRunningError, TaskContextManager, task_context_manager
from db import DatabaseConfig, DatabaseConnection, Task, TaskRepository, TaskUsageQuery
from db.startup import start_database
from tests.support.agent import kept_statistics

LLM = {"provider": "openai", "openai": {"model": "gpt-4o", "context_length": 128000}}
MANAGER_LOGGER = "context_storage.task_context_manager"


# --- The agent's own pieces, as its code has them (handlers/task_key.py, handlers/planning_history_store.py,
# --- pause_resume_manager.py): plain classes that know nothing of this package.


class AgentGitHubIssueTaskKey:
    def __init__(self, owner: str, repo: str, number: int) -> None:
        self.owner, self.repo, self.number = owner, repo, number

    def to_dict(self) -> dict[str, Any]:
        return {"type": "github_issue", "owner": self.owner, "repo": self.repo, "number": self.number}


class AgentGitLabMergeRequestTaskKey:
    def __init__(self, project_id: int | str, mr_iid: int | str) -> None:
        self.project_id, self.mr_iid = project_id, mr_iid

    def to_dict(self) -> dict[str, Any]:
        return {"type": "gitlab_merge_request", "project_id": self.project_id, "mr_iid": self.mr_iid}


class PlanningHistoryStore:
    """The agent's planning history: `<planning_dir>/<task_uuid>.jsonl`."""

    def __init__(self, task_uuid: str, planning_dir: Path) -> None:
        self.task_uuid = task_uuid
        planning_dir.mkdir(parents=True, exist_ok=True)
        self.filepath = planning_dir / f"{task_uuid}.jsonl"

    def save_plan(self, plan: dict[str, Any]) -> None:
        with self.filepath.open("a", encoding="utf-8") as file:
            file.write(json.dumps({"type": "plan", "plan": plan}) + "\n")


class AgentTaskContextManager(TaskContextManager):
    """The agent's manager, ported as docs/adopting.md says."""

    def open_extra_stores(self) -> None:
        self.planning_dir = self.context_dir / "planning"
        self.planning_store = PlanningHistoryStore(self.uuid, self.planning_dir)

    def get_planning_store(self) -> PlanningHistoryStore:
        return self.planning_store

    def before_finish(self, status: str, error_message: str | None) -> None:
        # What its ContextCompressor.create_final_summary does: one LLM call, one summary record.
        messages = self.get_message_store().count_messages()
        if messages:
            self.get_summary_store().add_summary(1, messages, f"final summary ({status})", 100, 10)
            self.update_statistics(llm_calls=1, tokens=10)


@dataclass
class QueuedTask:
    key: Any
    uuid: str
    user: str
    is_resumed: bool = False
    pause_after: int | None = None


class Agent:
    """The consumer loop of one process: takes tasks one after another, pausing and resuming as the agent's
    PauseResumeManager does (`running/<uuid>` moved to `paused/<uuid>` and back)."""

    def __init__(self, config: dict[str, Any], let_go: str) -> None:
        self.config = config
        self.let_go = let_go
        base = Path(config["context_storage"]["base_dir"])
        self.running, self.paused = base / "running", base / "paused"
        self.paused.mkdir(parents=True, exist_ok=True)

    def handle(self, task: QueuedTask, llm_calls: int) -> None:
        if task.is_resumed:
            shutil.move(self.paused / task.uuid, self.running / task.uuid)
        with self._manager(task) as manager:
            for call in range(llm_calls):
                if task.pause_after is not None and call == task.pause_after:
                    shutil.move(self.running / task.uuid, self.paused / task.uuid)
                    (self.paused / task.uuid / "task_state.json").write_text(json.dumps({"status": "paused"}))
                    return  # as the agent does: without finishing the manager
                manager.get_message_store().add_message("assistant", f"step {call}")
                manager.get_planning_store().save_plan({"step": call})
                manager.update_statistics(llm_calls=1, tokens=100)
            manager.complete()

    @contextlib.contextmanager
    def _manager(self, task: QueuedTask) -> Iterator[AgentTaskContextManager]:
        manager = AgentTaskContextManager(task.key, task.uuid, self.config, user=task.user, is_resumed=task.is_resumed)
        if self.let_go == "close":
            with manager:
                yield manager
        else:
            # The agent's own code: the manager is simply dropped when the handler returns.
            yield manager


@pytest.fixture(params=["sqlite-file", "postgresql"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def agent_config(tmp_path: Path, backend: str, request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    """The agent's configuration on each backend, on an empty database; managers left unfinished let go at the
    end of their test."""
    database: dict[str, Any] = {"type": "sqlite", "sqlite": {"path": "tasks.db"}}
    if backend == "postgresql":
        url: URL = request.getfixturevalue("postgres_url")
        DatabaseConnection.reset()
        with DatabaseConnection.initialize(
            DatabaseConfig(url=url.render_as_string(hide_password=False))
        ).engine.begin() as raw:
            raw.exec_driver_sql(
                "DROP TABLE IF EXISTS tasks, task_operations, task_heartbeats, token_usage_buckets, alembic_version"
            )
        DatabaseConnection.reset()
        database = {"url": url.render_as_string(hide_password=False)}
    yield {"context_storage": {"base_dir": str(tmp_path / "contexts")}, "llm": LLM, "database": database}
    gc.collect()


def stored(task_uuid: str) -> Task:
    task = TaskRepository().get_by_uuid(task_uuid)
    assert task is not None
    return task


@pytest.mark.parametrize("let_go", ["dropped", "close"])
def test_one_process_pauses_a_task_runs_another_resumes_the_first_and_a_new_run_inherits_both(
    agent_config: dict[str, Any], let_go: str
) -> None:
    agent = Agent(agent_config, let_go)
    issue = AgentGitHubIssueTaskKey("acme", "web", 42)
    first = QueuedTask(issue, str(uuid.uuid4()), "alice", pause_after=2)
    second = QueuedTask(issue, str(uuid.uuid4()), "bob")
    base = Path(agent_config["context_storage"]["base_dir"])

    gc.disable()  # the agent's manager must let go when it is dropped, not when a collection happens to run
    try:
        agent.handle(first, llm_calls=5)
        assert (base / "paused" / first.uuid / "metadata.json").is_file()
        assert not (base / "locks" / f"{first.uuid}.lock").exists()
        assert stored(first.uuid).status == "running"  # a pause changes no status
        agent.handle(second, llm_calls=3)
        agent.handle(QueuedTask(issue, first.uuid, "alice", is_resumed=True), llm_calls=4)
    finally:
        gc.enable()

    resumed = stored(first.uuid)
    # 2 calls before the pause, 4 after, and the final summary's one.
    assert (resumed.status, resumed.llm_call_count, resumed.total_tokens) == ("completed", 7, 610)
    assert not (base / "paused" / first.uuid).exists() and not (base / "running" / first.uuid).exists()
    plans = (base / "completed" / first.uuid / "planning" / f"{first.uuid}.jsonl").read_text().splitlines()
    assert len(plans) == 6

    later = AgentTaskContextManager(issue, str(uuid.uuid4()), agent_config, user="alice")
    runs = later.previous_runs(expiry_days=90)
    assert [run.task.uuid for run in runs] == [first.uuid, second.uuid]
    for run in runs:
        assert run.context_dir == base / "completed" / run.task.uuid
        assert (run.context_dir / "planning" / f"{run.task.uuid}.jsonl").is_file()
        summary = json.loads((run.context_dir / "summaries.jsonl").read_text().splitlines()[-1])
        assert summary["summary"] == "final summary (completed)"
        assert run.task.completed_at is not None and run.task.completed_at.utcoffset() is not None
    later.complete()


def test_a_second_live_manager_of_a_task_is_still_refused_and_a_closed_one_can_do_nothing_more(
    agent_config: dict[str, Any],
) -> None:
    key = AgentGitHubIssueTaskKey("acme", "web", 7)
    task_uuid = str(uuid.uuid4())
    with TaskContextManager(key, task_uuid, agent_config) as manager:
        with pytest.raises(TaskAlreadyRunningError):
            TaskContextManager(key, task_uuid, agent_config, is_resumed=True)
        manager.update_statistics(tokens=5)
    manager.close()  # again: nothing more
    for call in (
        lambda: manager.update_statistics(tokens=1),
        manager.complete,
        lambda: manager.update_status("running"),
        manager.get_message_store,
        manager.get_summary_store,
        manager.get_tool_store,
        manager.previous_runs,
    ):
        with pytest.raises(RuntimeError, match="closed manager"):
            call()
    row = stored(task_uuid)
    assert (row.status, row.total_tokens) == ("running", 5)
    TaskContextManager(key, task_uuid, agent_config, is_resumed=True).complete()
    assert stored(task_uuid).status == "completed"


def test_a_manager_closed_while_the_table_is_away_keeps_its_statistics_for_the_next_run(
    agent_config: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    key = AgentGitHubIssueTaskKey("acme", "web", 8)
    task_uuid = str(uuid.uuid4())
    manager = TaskContextManager(key, task_uuid, agent_config)
    with tables_renamed(), caplog.at_level(logging.WARNING, logger=MANAGER_LOGGER):
        manager.update_statistics(llm_calls=2, tokens=40)
        manager.close()
    metadata = json.loads((manager.context_dir / "metadata.json").read_text())
    assert kept_statistics(metadata) == {"llm_calls": 2, "tool_calls": 0, "tokens": 40, "compressions": 0}
    assert f"task {task_uuid} let go with statistics not written; kept in {manager.context_dir}" in caplog.messages
    TaskContextManager(key, task_uuid, agent_config, is_resumed=True).complete()
    row = stored(task_uuid)
    assert (row.status, row.llm_call_count, row.total_tokens) == ("completed", 2, 40)


def test_a_dropped_manager_keeps_its_pending_statistics_on_disk(agent_config: dict[str, Any]) -> None:
    key = AgentGitHubIssueTaskKey("acme", "web", 9)
    task_uuid = str(uuid.uuid4())
    manager = TaskContextManager(key, task_uuid, agent_config)
    directory = manager.context_dir
    with tables_renamed():
        manager.update_statistics(tool_calls=3)
        del manager
        gc.collect()
    assert kept_statistics(json.loads((directory / "metadata.json").read_text()))["tool_calls"] == 3
    TaskContextManager(key, task_uuid, agent_config, is_resumed=True).complete()
    assert stored(task_uuid).tool_call_count == 3


def test_a_manager_dropped_after_its_directory_was_paused_keeps_its_statistics_there(
    agent_config: dict[str, Any],
) -> None:
    key = AgentGitHubIssueTaskKey("acme", "web", 10)
    task_uuid = str(uuid.uuid4())
    base = Path(agent_config["context_storage"]["base_dir"])
    manager = TaskContextManager(key, task_uuid, agent_config)
    with tables_renamed():
        manager.update_statistics(llm_calls=5)
        (base / "paused").mkdir()
        shutil.move(base / "running" / task_uuid, base / "paused" / task_uuid)
        del manager
        gc.collect()  # a failed write's traceback holds it in a cycle until a collection
    kept = kept_statistics(json.loads((base / "paused" / task_uuid / "metadata.json").read_text()))
    assert kept == {"llm_calls": 5, "tool_calls": 0, "tokens": 0, "compressions": 0}
    shutil.move(base / "paused" / task_uuid, base / "running" / task_uuid)
    TaskContextManager(key, task_uuid, agent_config, is_resumed=True).complete()
    assert stored(task_uuid).llm_call_count == 5


def test_a_forked_child_lets_go_of_nothing_its_parent_holds(agent_config: dict[str, Any]) -> None:
    key = AgentGitHubIssueTaskKey("acme", "web", 11)
    task_uuid = str(uuid.uuid4())
    manager = TaskContextManager(key, task_uuid, agent_config)
    lock_file = Path(agent_config["context_storage"]["base_dir"]) / "locks" / f"{task_uuid}.lock"
    with tables_renamed():
        manager.update_statistics(llm_calls=5)
        child = os.fork()
        if child == 0:
            manager._abandoned()  # what the child's exit runs
            os._exit(0)
        os.waitpid(child, 0)
        assert "unsaved" not in json.loads((manager.context_dir / "metadata.json").read_text())
        assert lock_file.exists()
        with pytest.raises(TaskAlreadyRunningError):
            TaskContextManager(key, task_uuid, agent_config, is_resumed=True)
        manager.close()
    assert kept_statistics(json.loads((manager.context_dir / "metadata.json").read_text()))["llm_calls"] == 5


@contextlib.contextmanager
def tables_renamed() -> Iterator[None]:
    """The tasks table away (every write fails at once, no retry) while the database itself answers."""
    engine = DatabaseConnection.get_instance().engine
    with engine.begin() as raw:
        raw.exec_driver_sql("ALTER TABLE tasks RENAME TO tasks_away")
    try:
        yield
    finally:
        with engine.begin() as raw:
            raw.exec_driver_sql("ALTER TABLE tasks_away RENAME TO tasks")


@pytest.mark.parametrize(
    ("key", "fields"),
    [
        (AgentGitHubIssueTaskKey("acme", "web", 42), ("github", "acme", "web", "issue", "42")),
        (AgentGitHubIssueTaskKey("acme", "web", "43"), ("github", "acme", "web", "issue", "43")),
        (AgentGitLabMergeRequestTaskKey(321, "6"), ("gitlab", "", "321", "merge_request", "6")),
    ],
)
def test_the_agents_own_task_keys_are_taken_as_they_are(
    agent_config: dict[str, Any], key: Any, fields: tuple[str, ...]
) -> None:
    task_uuid = str(uuid.uuid4())
    manager = TaskContextManager(key, task_uuid, agent_config)
    row = stored(task_uuid)
    assert (row.task_source, row.owner, row.repo, row.task_type, row.task_id) == fields
    assert json.loads((manager.context_dir / "metadata.json").read_text())["task_key"] == manager.task_key.to_dict()
    manager.complete()


NOT_A_NUMBER = "a task key's number must be a whole number of at most 50 digits"


class NoDict:
    pass


class BadNumber:
    def to_dict(self) -> dict[str, Any]:
        return {"type": "github_issue", "owner": "acme", "repo": "web", "number": "forty-two"}


class Missing:
    def to_dict(self) -> dict[str, Any]:
        return {"type": "gitlab_issue", "project_id": 5}


@pytest.mark.parametrize(
    ("key", "error", "message"),
    [
        (NoDict(), TypeError, "a task key needs a to_dict() method; got NoDict"),
        (BadNumber(), ValueError, NOT_A_NUMBER),
        (Missing(), ValueError, "a task key of type 'gitlab_issue' needs 'issue_iid'"),
        (AgentGitHubIssueTaskKey("acme", "web", True), ValueError, NOT_A_NUMBER),
        (AgentGitHubIssueTaskKey("acme", "web", 1.9), ValueError, NOT_A_NUMBER),  # type: ignore[arg-type]
        (AgentGitHubIssueTaskKey("acme", "web", -5), ValueError, NOT_A_NUMBER),
        (AgentGitHubIssueTaskKey("acme", "web", " 7 "), ValueError, NOT_A_NUMBER),  # type: ignore[arg-type]
        (AgentGitHubIssueTaskKey("acme", "web", 10**50), ValueError, NOT_A_NUMBER),
        (AgentGitHubIssueTaskKey(None, "web", 1), ValueError, "a task key's owner must be non-empty text"),  # type: ignore[arg-type]
        (AgentGitLabMergeRequestTaskKey({"id": 1}, 2), ValueError, "a task key's project_id must be"),  # type: ignore[arg-type]
    ],
)
def test_a_key_that_is_not_one_is_refused_before_any_file(
    tmp_path: Path, key: Any, error: type[Exception], message: str
) -> None:
    config = {"context_storage": {"base_dir": str(tmp_path / "contexts")}, "llm": LLM}
    with pytest.raises(error) as raised:
        TaskContextManager(key, str(uuid.uuid4()), config)
    assert str(raised.value).startswith(message)
    assert not (tmp_path / "contexts").exists()


class BrokenStores(TaskContextManager):
    def open_extra_stores(self) -> None:
        raise OSError("no space left for the planning store")


class BrokenAfterWriting(TaskContextManager):
    def open_extra_stores(self) -> None:
        (self.context_dir / "planning").mkdir()
        (self.context_dir / "planning" / "plan.jsonl").write_text("{}\n")
        raise OSError("no space left for the planning store")


def left_behind(base: Path) -> list[str]:
    return sorted(str(path.relative_to(base)) for path in base.rglob("*") if not path.is_dir())


def test_a_start_that_fails_leaves_nothing_of_a_new_task(agent_config: dict[str, Any]) -> None:
    base = Path(agent_config["context_storage"]["base_dir"])
    task_uuid = str(uuid.uuid4())
    start_database(agent_config)
    before = left_behind(base) if base.exists() else []
    with pytest.raises(OSError, match="no space left"):
        BrokenAfterWriting(AgentGitHubIssueTaskKey("acme", "web", 1), task_uuid, agent_config)
    assert left_behind(base) == before
    assert not (base / "running" / task_uuid).exists()
    assert TaskRepository().get_by_uuid(task_uuid) is None
    TaskContextManager(AgentGitHubIssueTaskKey("acme", "web", 1), task_uuid, agent_config).complete()


def test_a_resume_that_fails_leaves_the_finished_run_where_it_was(agent_config: dict[str, Any]) -> None:
    base = Path(agent_config["context_storage"]["base_dir"])
    key = AgentGitHubIssueTaskKey("acme", "web", 2)
    task_uuid = str(uuid.uuid4())
    TaskContextManager(key, task_uuid, agent_config).complete()
    finished = base / "completed" / task_uuid
    files = {path.name: path.read_bytes() for path in finished.iterdir()}
    with pytest.raises(OSError):
        BrokenStores(key, task_uuid, agent_config, is_resumed=True)
    assert {path.name: path.read_bytes() for path in finished.iterdir()} == files
    assert not (base / "running" / task_uuid).exists()
    assert not (base / "locks" / f"{task_uuid}.lock").exists()
    assert stored(task_uuid).status == "completed"


def test_a_start_that_fails_in_an_existing_directory_puts_its_metadata_back(agent_config: dict[str, Any]) -> None:
    key = AgentGitHubIssueTaskKey("acme", "web", 3)
    task_uuid = str(uuid.uuid4())
    with TaskContextManager(key, task_uuid, agent_config) as manager:
        manager.get_message_store().add_message("user", "the first part")
    directory = manager.context_dir
    metadata = (directory / "metadata.json").read_bytes()
    with pytest.raises(OSError):
        BrokenStores(key, task_uuid, agent_config, is_resumed=True)
    assert (directory / "metadata.json").read_bytes() == metadata
    assert (directory / "messages.jsonl").is_file()


def test_a_start_that_fails_in_a_directory_without_metadata_adds_none(agent_config: dict[str, Any]) -> None:
    task_uuid = str(uuid.uuid4())
    directory = Path(agent_config["context_storage"]["base_dir"]) / "running" / task_uuid
    directory.mkdir(parents=True)
    (directory / "notes.txt").write_text("left by hand")
    with pytest.raises(OSError):
        BrokenStores(AgentGitHubIssueTaskKey("acme", "web", 3), task_uuid, agent_config, is_resumed=True)
    assert sorted(path.name for path in directory.iterdir()) == ["notes.txt"]


def test_a_start_interrupted_after_its_row_took_kept_statistics_never_counts_them_twice(
    agent_config: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    key = AgentGitHubIssueTaskKey("acme", "web", 12)
    task_uuid = str(uuid.uuid4())
    manager = TaskContextManager(key, task_uuid, agent_config)
    manager.update_statistics(llm_calls=5)
    with tables_renamed():
        manager.update_statistics(llm_calls=7)
        manager.complete()  # the 7 are kept in metadata.json
    real = task_context_manager.write_kept_statistics

    def written_then_interrupted(*args: Any) -> bool:
        real(*args)
        raise KeyboardInterrupt

    monkeypatch.setattr(task_context_manager, "write_kept_statistics", written_then_interrupted)
    with pytest.raises(KeyboardInterrupt):
        TaskContextManager(key, task_uuid, agent_config, is_resumed=True)
    monkeypatch.undo()
    assert stored(task_uuid).llm_call_count == 12
    TaskContextManager(key, task_uuid, agent_config, is_resumed=True).complete()
    assert stored(task_uuid).llm_call_count == 12


def test_a_manager_with_another_database_is_refused_and_leaves_nothing(
    agent_config: dict[str, Any], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    start_database(agent_config)
    elsewhere = {**agent_config, "context_storage": {"base_dir": str(tmp_path / "elsewhere")}}
    elsewhere["database"] = {"type": "sqlite", "sqlite": {"path": "tasks.db"}}
    task_uuid = str(uuid.uuid4())
    with pytest.raises(RuntimeError, match=r"already initialised with .* one process uses one database"):
        TaskContextManager(AgentGitHubIssueTaskKey("acme", "web", 4), task_uuid, elsewhere)
    assert left_behind(tmp_path / "elsewhere") == []
    assert TaskRepository().get_by_uuid(task_uuid) is None
    # Another task configuration for the same database (another user's LLM, other timeouts) is the same
    # database: taken, with a warning naming the settings that differ.
    other = {**agent_config, "llm": {"provider": "ollama", "ollama": {"model": "llama3"}}}
    other["database"] = {**agent_config["database"], "startup_timeout": 7, "echo": False}
    with caplog.at_level(logging.WARNING, logger="db.startup"):
        TaskContextManager(AgentGitHubIssueTaskKey("acme", "web", 4), task_uuid, other).complete()
    assert [record.getMessage() for record in caplog.records if record.name == "db.startup"] == [
        "database settings startup_timeout differ from those the process's connection was made with; those stand"
    ]


def unreachable(tmp_path: Path, port: int) -> dict[str, Any]:
    return {
        "context_storage": {"base_dir": str(tmp_path / "contexts")},
        "llm": LLM,
        "database": {"type": "postgresql", "postgresql": {"host": "127.0.0.1", "port": port}, "startup_timeout": 2},
    }


@pytest.mark.parametrize("end", ["complete", "fail", "close"])
def test_after_a_start_that_waited_for_the_database_the_end_makes_one_attempt(
    tmp_path: Path, refused_port: int, caplog: pytest.LogCaptureFixture, end: str
) -> None:
    config = unreachable(tmp_path, refused_port)
    with caplog.at_level(logging.WARNING, logger="db.connection"):
        manager = TaskContextManager(AgentGitHubIssueTaskKey("acme", "web", 5), str(uuid.uuid4()), config)
    assert any("retrying in" in message for message in caplog.messages)  # the start waited, as configured
    manager.update_statistics(tokens=3)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="db.connection"):
        if end == "fail":
            manager.fail("the database is down")
        else:
            getattr(manager, end)()
    assert [message for message in caplog.messages if "retrying in" in message] == []
    assert kept_statistics(json.loads((manager.context_dir / "metadata.json").read_text()))["tokens"] == 3


@pytest.fixture
def read_only_view(tmp_path: Path) -> Iterator[Path]:
    """`tmp_path/view`: a read-only bind mount of `tmp_path/contexts`, as the agent mounts contexts/ into its
    token-usage service."""
    source, view = tmp_path / "contexts", tmp_path / "view"
    source.mkdir(exist_ok=True)
    view.mkdir()
    mounted = subprocess.run(["mount", "--bind", str(source), str(view)], capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        pytest.fail(f"a read-only mount is needed for this test and none could be made: {mounted.stderr}")
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(view)], check=True)
        yield view
    finally:
        DatabaseConnection.reset()
        subprocess.run(["umount", str(view)], check=True)


@pytest.mark.parametrize("writer", ["gone", "live"])
def test_usage_is_read_from_a_read_only_mount_of_contexts(
    tmp_path: Path,
    read_only_view: Path,
    writer: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = {"context_storage": {"base_dir": str(tmp_path / "contexts")}, "llm": LLM}
    with TaskContextManager(AgentGitHubIssueTaskKey("acme", "web", 6), str(uuid.uuid4()), config, user="alice") as m:
        m.update_statistics(tokens=1234)
    if writer == "gone":
        DatabaseConnection.reset()  # the agent stopped: no -wal, no -shm
    assert (read_only_view / "tasks.db").is_file()
    with pytest.raises(OSError):
        (read_only_view / "probe").touch()

    # The token-usage service: its own DATABASE_URL (its users database) kept out, the tasks file read-only.
    service_env = {**os.environ, "DATABASE_URL": f"sqlite:///{tmp_path / 'users.db'}"}
    tasks_only = {name: value for name, value in service_env.items() if name != "DATABASE_URL"}
    reader = DatabaseConfig.load({"database": {"sqlite": {"path": str(read_only_view / "tasks.db")}}}, tasks_only)
    if writer == "live":
        reader_connection = DatabaseConnection(reader, read_only=True)
    else:
        reader_connection = DatabaseConnection.initialize(reader, read_only=True)
    try:
        usage = TaskUsageQuery(reader_connection).per_user()
        assert [(entry.user, entry.total) for entry in usage] == [("alice", 1234)]
        # The agent writes on (again, after a stop): a long-lived reader sees it.
        DatabaseConnection.reset()
        with TaskContextManager(AgentGitHubIssueTaskKey("acme", "web", 7), str(uuid.uuid4()), config, user="bob") as m:
            m.update_statistics(tokens=5)
        if writer == "gone":
            DatabaseConnection.reset()
        usage = TaskUsageQuery(reader_connection).per_user()
    finally:
        reader_connection.dispose()
    assert sorted((entry.user, entry.total) for entry in usage) == [("alice", 1234), ("bob", 5)]
    assert not (tmp_path / "users.db").exists()

    if writer == "gone":
        DatabaseConnection.reset()
        main_config = tmp_path / "reader.yaml"
        main_config.write_text(f"database:\n  sqlite:\n    path: {read_only_view / 'tasks.db'}\n")
        assert main.main(["--config", str(main_config), "tasks", "usage", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["users"][0]["total"] == 1234
