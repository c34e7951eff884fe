"""The JSONL stores and task keys: file formats and behaviour the rest of the agent relies on. No database."""

from __future__ import annotations

import json
from datetime import UTC, datetime
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


def stamped_between(record: dict[str, object], before: datetime, after: datetime) -> str:
    """The record's timestamp, checked to be `datetime.now(timezone.utc).isoformat()` taken during the call."""
    text = record["timestamp"]
    assert isinstance(text, str) and text.endswith("+00:00") and "T" in text
    assert before <= datetime.fromisoformat(text) <= after
    return text


def test_message_store_formats(tmp_path: Path) -> None:
    store = MessageStore(tmp_path, {})
    before = datetime.now(UTC)
    assert store.add_message("user", "x" * 40) == 1
    assert store.add_message("tool", "result text", tool_name="read_file") == 2
    after = datetime.now(UTC)
    history = lines(store.messages_file)
    assert list(history[0]) == ["seq", "role", "content", "timestamp", "tokens"]
    assert history == [
        {"seq": 1, "role": "user", "content": "x" * 40, "timestamp": stamped_between(history[0], before, after),
         "tokens": 10},
        {"seq": 2, "role": "tool", "content": "result text", "timestamp": stamped_between(history[1], before, after),
         "tokens": len("result text") // 4, "tool_name": "read_file"},
    ]  # fmt: skip
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
    before = datetime.now(UTC)
    assert store.add_summary(1, 10, "first", 1000, 100) == 1
    assert store.add_summary(11, 20, "second", 0, 50) == 2
    after = datetime.now(UTC)
    latest = store.get_latest_summary()
    assert latest is not None
    assert lines(store.summaries_file) == [
        {"id": 1, "start_seq": 1, "end_seq": 10, "summary": "first", "original_tokens": 1000, "summary_tokens": 100,
         "ratio": 0.1, "timestamp": stamped_between(lines(store.summaries_file)[0], before, after)},
        latest,
    ]  # fmt: skip
    stamp = stamped_between(latest, before, after)
    assert latest == {"id": 2, "start_seq": 11, "end_seq": 20, "summary": "second", "original_tokens": 0,
                      "summary_tokens": 50, "ratio": 0.0, "timestamp": stamp}  # fmt: skip
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
    before = datetime.now(UTC)
    assert store.add_tool_call("read_file", {"path": "a"}, "contents", "success", 12.5) == 1
    assert store.add_tool_call("run", {"cmd": "x"}, None, "error", 3, error="exit 1") == 2
    after = datetime.now(UTC)
    ok, failed = lines(store.tools_file)
    assert list(ok) == ["seq", "tool", "args", "status", "duration_ms", "timestamp", "result"]
    assert ok == {"seq": 1, "tool": "read_file", "args": {"path": "a"}, "status": "success", "duration_ms": 12.5,
                  "timestamp": stamped_between(ok, before, after), "result": "contents"}  # fmt: skip
    assert failed == {"seq": 2, "tool": "run", "args": {"cmd": "x"}, "status": "error", "duration_ms": 3,
                      "timestamp": stamped_between(failed, before, after), "error": "exit 1"}  # fmt: skip
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
