"""TaskContextManager against bad input and shared use: uuids, any text, many threads."""

from __future__ import annotations

import json
import stat
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest

from context_storage import GitHubIssueTaskKey, TaskContextManager
from db import DatabaseConnection, TaskRepository
from tests.support.agent import counters, stored
from tests.support.data import task_data

KEY = GitHubIssueTaskKey("acme", "web", 7)
AWKWARD = "tool said:\x00\udcff\udc80 done \u2603"
STORED_AWKWARD = "tool said:\u2400\ufffd\ufffd done \u2603"


@pytest.fixture(params=["sqlite-file", "postgresql"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# 7. The uuid is checked before anything is touched


@pytest.mark.parametrize("bad", ["../../escaped", "/tmp/absolute", "not-a-uuid", ""])
def test_a_bad_uuid_touches_no_file(tmp_path: Path, bad: str) -> None:
    base = tmp_path / "work" / "contexts"
    config: dict[str, Any] = {"context_storage": {"base_dir": str(base)}, "database": {"sqlite": {"path": ":memory:"}}}
    with pytest.raises(ValueError, match="UUID"):
        TaskContextManager(KEY, bad, config)
    assert list(tmp_path.iterdir()) == []


def test_task_directories_and_files_are_private(agent_config: dict[str, Any]) -> None:
    manager = TaskContextManager(KEY, str(uuid.uuid4()), agent_config)
    manager.get_message_store().add_message("user", "hello")
    manager.get_tool_store().add_tool_call("ls", {}, "ok", "success", 1.0)
    manager.complete()
    base = Path(agent_config["context_storage"]["base_dir"])
    for directory in (base, base / "running", base / "completed", manager.context_dir):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700, directory
    for name in ("metadata.json", "messages.jsonl", "current.jsonl", "tools.jsonl"):
        assert stat.S_IMODE((manager.context_dir / name).stat().st_mode) == 0o600, name


# 13. Whatever text the agent hands over is kept, the same on every backend


def test_nul_and_lone_surrogates_are_stored_the_same_everywhere(repo: TaskRepository) -> None:
    task = repo.create(task_data(user="ev\x00e"))
    assert repo.fail(task.uuid, AWKWARD)
    found = repo.get_by_uuid(task.uuid)
    assert found is not None
    assert (found.error_message, found.user) == (STORED_AWKWARD, "ev\u2400e")
    assert [t.uuid for t in repo.list_by_user("ev\x00e")] == [task.uuid]
    assert repo.update_status(task.uuid, "stopped", "\udcff")
    assert (refound := repo.get_by_uuid(task.uuid)) is not None and refound.error_message == "\ufffd"


def test_a_ten_megabyte_message_is_kept_whole(repo: TaskRepository) -> None:
    task = repo.create(task_data())
    message = ("line of tool output " * 50 + "\n") * 10_500
    assert len(message) > 10_000_000
    assert repo.fail(task.uuid, message)
    found = repo.get_by_uuid(task.uuid)
    assert found is not None and found.error_message == message


@pytest.mark.parametrize("finish", ["fail", "stop", "complete"])
def test_the_manager_finishes_whatever_the_text(agent_config: dict[str, Any], finish: str) -> None:
    key = str(uuid.uuid4())
    manager = TaskContextManager(KEY, key, agent_config)
    assert manager.get_message_store().add_message("tool", AWKWARD) == 1
    manager.get_tool_store().add_tool_call("sh", {"cmd": AWKWARD}, AWKWARD, "success", 2.5)
    manager.get_summary_store().add_summary(1, 1, AWKWARD, 10, 2)
    if finish == "fail":
        manager.fail(AWKWARD + "x" * 10_000_000)
    else:
        getattr(manager, finish)()
    assert manager.context_dir == Path(agent_config["context_storage"]["base_dir"]) / "completed" / key
    row = stored(key)
    assert row.status == {"fail": "failed", "stop": "stopped", "complete": "completed"}[finish]
    if finish == "fail":
        assert row.error_message is not None and row.error_message.startswith(STORED_AWKWARD)
        metadata = json.loads((manager.context_dir / "metadata.json").read_text(encoding="utf-8"))
        assert metadata["error_message"].startswith(AWKWARD)
    message = json.loads((manager.context_dir / "messages.jsonl").read_text(encoding="utf-8"))
    assert message["content"] == AWKWARD
    assert manager.get_tool_store().count_tool_calls() == 1
    latest = manager.get_summary_store().get_latest_summary()
    assert latest is not None and latest["summary"] == AWKWARD


# 14. One manager shared by threads


def test_a_manager_shared_by_threads_keeps_exact_totals_and_whole_lines(
    agent_config: dict[str, Any],
) -> None:
    key = str(uuid.uuid4())
    manager = TaskContextManager(KEY, key, agent_config)
    threads, calls = 8, 150
    failures: list[BaseException] = []
    start = threading.Barrier(threads)

    def work(index: int) -> None:
        try:
            start.wait()
            for call in range(calls):
                manager.update_statistics(llm_calls=1, tool_calls=2, tokens=index + 1)
                manager.get_tool_store().add_tool_call("t", {"thread": index, "call": call}, "x" * 5000, "success", 1.0)
                manager.get_message_store().add_message("assistant", f"{index}:{call}")
        except BaseException as exc:
            failures.append(exc)

    workers = [threading.Thread(target=work, args=(index,)) for index in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert failures == []
    assert manager.pending_statistics == dict.fromkeys(("llm_calls", "tool_calls", "tokens", "compressions"), 0)
    tokens = sum(index + 1 for index in range(threads)) * calls
    assert counters(stored(key)) == (threads * calls, 2 * threads * calls, tokens, 0)
    total = threads * calls
    for name, field in (("tools.jsonl", "seq"), ("messages.jsonl", "seq")):
        lines = (manager.context_dir / name).read_text(encoding="utf-8").splitlines()
        assert [json.loads(line)[field] for line in lines] == list(range(1, total + 1)), name
    current = [json.loads(line)["content"] for line in (manager.context_dir / "current.jsonl").read_text().splitlines()]
    history = [
        json.loads(line)["content"] for line in (manager.context_dir / "messages.jsonl").read_text().splitlines()
    ]
    assert current == history
    DatabaseConnection.reset()
