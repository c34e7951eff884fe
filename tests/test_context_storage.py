"""The JSONL stores and task keys: file formats and behaviour the rest of the agent relies on. No database."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from context_storage import (
    GitHubIssueTaskKey,
    GitHubPullRequestTaskKey,
    GitLabIssueTaskKey,
    GitLabMergeRequestTaskKey,
    MessageStore,
    SummaryStore,
    ToolStore,
    task_key_from_dict,
)
from context_storage.jsonl_log import JsonlLog


def lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_message_store_formats(tmp_path: Path) -> None:
    store = MessageStore(tmp_path, {})
    assert store.add_message("user", "x" * 40) == 1
    assert store.add_message("tool", "result text", tool_name="read_file") == 2
    history = lines(store.messages_file)
    assert list(history[0]) == ["seq", "role", "content", "timestamp", "tokens"]
    assert history[0]["tokens"] == 10
    assert history[1]["tool_name"] == "read_file" and history[1]["seq"] == 2
    assert lines(store.current_file) == [
        {"role": "user", "content": "x" * 40},
        {"role": "tool", "content": "result text", "tool_name": "read_file"},
    ]
    assert store.count_messages() == 2
    assert store.get_current_token_count() == 10 + len("result text") // 4


def test_sequence_numbers_continue_across_instances(tmp_path: Path) -> None:
    MessageStore(tmp_path, {}).add_message("user", "a")
    again = MessageStore(tmp_path, {})
    assert again.add_message("assistant", "b") == 2
    assert again.count_messages() == 2


def test_recreate_current_context_and_combined_file(tmp_path: Path) -> None:
    store = MessageStore(tmp_path, {})
    for index in range(4):
        store.add_message("user", f"message {index} " + "y" * 36)
    rest = tmp_path / "unsummarized.jsonl"
    rest.write_text(json.dumps({"role": "user", "content": "latest"}) + "\n", encoding="utf-8")
    combined = store.get_current_context_file(rest)
    assert combined.name == "current_combined.jsonl"
    assert len(lines(combined)) == 5
    assert store.get_current_context_file() == store.current_file
    store.recreate_current_context("the summary", 3, rest)
    assert lines(store.current_file) == [
        {"role": "assistant", "content": "the summary"},
        {"role": "user", "content": "latest"},
    ]
    history = lines(store.messages_file)
    assert history[-1]["content"] == "the summary" and history[-1]["seq"] == 5 and history[-1]["tokens"] == 3
    assert store.get_current_token_count() == 3 + history[-2]["tokens"]  # type: ignore[operator]


def test_summary_store(tmp_path: Path) -> None:
    store = SummaryStore(tmp_path)
    assert store.get_latest_summary() is None
    assert store.add_summary(1, 10, "first", 1000, 100) == 1
    assert store.add_summary(11, 20, "second", 0, 50) == 2
    latest = store.get_latest_summary()
    assert latest is not None
    assert list(latest) == [
        "id",
        "start_seq",
        "end_seq",
        "summary",
        "original_tokens",
        "summary_tokens",
        "ratio",
        "timestamp",
    ]
    assert (latest["summary"], latest["ratio"]) == ("second", 0.0)
    assert lines(store.summaries_file)[0]["ratio"] == 0.1
    assert store.count_summaries() == 2


def test_tool_store(tmp_path: Path) -> None:
    store = ToolStore(tmp_path)
    assert store.add_tool_call("read_file", {"path": "a"}, "contents", "success", 12.5) == 1
    assert store.add_tool_call("run", {"cmd": "x"}, None, "error", 3, error="exit 1") == 2
    ok, failed = lines(store.tools_file)
    assert ok == {**ok, "seq": 1, "tool": "read_file", "status": "success", "result": "contents"}
    assert "error" not in ok and "result" not in failed and failed["error"] == "exit 1"
    assert store.count_tool_calls() == 2


def test_append_reads_only_the_tail_of_a_long_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "messages.jsonl"
    with path.open("w", encoding="utf-8") as handle:
        for seq in range(1, 100_001):
            handle.write(json.dumps({"seq": seq, "role": "user", "content": "c"}) + "\n")
    log = JsonlLog(path)

    def full_scan(_: JsonlLog) -> None:
        raise AssertionError("append must not read the whole file")

    monkeypatch.setattr(JsonlLog, "records", full_scan)
    assert log.append({"role": "user", "content": "next"}) == 100_001
    assert log.append({"role": "user", "content": "and next"}) == 100_002
    assert log.tail(2)[0]["seq"] == 100_001


def test_a_torn_last_line_is_skipped_and_not_glued_to_the_next(tmp_path: Path) -> None:
    path = tmp_path / "tools.jsonl"
    path.write_text('{"seq": 1, "tool": "a"}\n{"seq": 2, "tool": "b", "ar', encoding="utf-8")
    log = JsonlLog(path)
    assert log.last_number() == 1
    assert log.append({"tool": "c"}) == 2
    assert [record["tool"] for record in log.records()] == ["a", "c"]


KEYS = [
    (
        GitHubIssueTaskKey("acme", "web", 42),
        {"type": "github_issue", "owner": "acme", "repo": "web", "number": 42},
        ("github", "acme", "web", "issue", "42"),
    ),
    (
        GitHubPullRequestTaskKey("acme", "web", 7),
        {"type": "github_pull_request", "owner": "acme", "repo": "web", "number": 7},
        ("github", "acme", "web", "pull_request", "7"),
    ),
    (
        GitLabIssueTaskKey(123, 5),
        {"type": "gitlab_issue", "project_id": 123, "issue_iid": 5},
        ("gitlab", "", "123", "issue", "5"),
    ),
    (
        GitLabMergeRequestTaskKey("group/proj", 9),
        {"type": "gitlab_merge_request", "project_id": "group/proj", "mr_iid": 9},
        ("gitlab", "", "group/proj", "merge_request", "9"),
    ),
]


@pytest.mark.parametrize(("key", "as_dict", "row"), KEYS)
def test_task_keys_round_trip_and_map_to_rows(key: object, as_dict: dict[str, object], row: tuple[str, ...]) -> None:
    assert key.to_dict() == as_dict  # type: ignore[attr-defined]
    assert task_key_from_dict(as_dict) == key
    assert type(key).from_dict(as_dict) == key  # type: ignore[attr-defined]
    fields = key.task_fields()  # type: ignore[attr-defined]
    assert (fields["task_source"], fields["owner"], fields["repo"], fields["task_type"], fields["task_id"]) == row


def test_unknown_task_key_type() -> None:
    with pytest.raises(ValueError, match="unknown task key type 'bitbucket_issue'"):
        task_key_from_dict({"type": "bitbucket_issue"})
    with pytest.raises(ValueError, match="expected a task key of type 'github_issue'"):
        GitHubIssueTaskKey.from_dict({"type": "gitlab_issue", "owner": "a", "repo": "b", "number": 1})
