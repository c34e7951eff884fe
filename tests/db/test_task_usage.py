"""Previous runs of an issue and token usage by calendar day, identical on every backend and time zone."""

from __future__ import annotations

import csv
import io
import json
import re
import sqlite3
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import event

from context_storage import GitHubIssueTaskKey, GitHubPullRequestTaskKey, GitLabMergeRequestTaskKey
from db import DatabaseConfig, DatabaseConnection, TaskRepository, TaskUsageQuery
from db.errors import DatabaseError
from db.repositories.task_usage import MAX_DAYS, Periods, time_zone
from db.schema import upgrade_schema
from tests.support.cli import run_here as run
from tests.support.data import task_data
from tools.legacy_db import write_legacy_db

TOKYO = timezone(timedelta(hours=9))
NOW = datetime(2025, 12, 10, 3, 0, tzinfo=UTC)  # Wednesday 10 Dec, 12:00 in Tokyo
# created_at -> tokens, chosen so every boundary in Tokyo and in UTC separates a different set of rows.
ROWS = {
    datetime(2025, 11, 30, 14, 59, 59, 999999, tzinfo=UTC): 1,  # Tokyo 30 Nov 23:59:59.999999
    datetime(2025, 12, 1, 0, 0, tzinfo=TOKYO): 10,  # Tokyo 1 Dec 00:00, UTC 30 Nov
    datetime(2025, 12, 7, 14, 59, 59, tzinfo=UTC): 100,  # Tokyo Sunday 7 Dec, just before the week
    datetime(2025, 12, 8, 0, 0, tzinfo=TOKYO): 1000,  # Tokyo Monday 8 Dec 00:00, UTC Sunday 7 Dec
    datetime(2025, 12, 9, 15, 0, tzinfo=UTC): 10_000,  # Tokyo 10 Dec 00:00, UTC 9 Dec
    datetime(2025, 12, 10, 0, 0, tzinfo=UTC): 100_000,  # Tokyo 10 Dec 09:00, UTC 10 Dec 00:00
}
EXPECTED = {
    "Asia/Tokyo": {"today": 110_000, "week": 111_000, "month": 111_110, "total": 111_111},
    "UTC": {"today": 100_000, "week": 110_000, "month": 111_100, "total": 111_111},
}
EXPECTED_DAILY = {
    "Asia/Tokyo": [
        (date(2025, 12, 7), 100),
        (date(2025, 12, 8), 1000),
        (date(2025, 12, 9), 0),
        (date(2025, 12, 10), 110_000),
    ],
    "UTC": [
        (date(2025, 12, 7), 1100),
        (date(2025, 12, 8), 0),
        (date(2025, 12, 9), 10_000),
        (date(2025, 12, 10), 100_000),
    ],
}


@pytest.fixture
def usage_rows(repo: TaskRepository, connection: DatabaseConnection, backend: str) -> TaskUsageQuery:
    if backend == "postgresql":
        # A session time zone far from UTC must not leak into any result.
        connection.engine.dispose()
        event.listen(
            connection.engine, "connect", lambda dbapi, _: dbapi.cursor().execute("SET TIME ZONE 'Pacific/Kiritimati'")
        )
    for created_at, tokens in ROWS.items():
        repo.create(task_data(user="alice", created_at=created_at, total_tokens=tokens))
    repo.create(task_data(user="bob", created_at=NOW - timedelta(days=40), total_tokens=5))
    repo.create(task_data(user=None, created_at=NOW, total_tokens=7))
    return TaskUsageQuery(connection)


@pytest.mark.parametrize("zone", ["Asia/Tokyo", "UTC"])
def test_per_user_sums_follow_the_callers_calendar(usage_rows: TaskUsageQuery, zone: str) -> None:
    alice = usage_rows.per_user(zone=zone, now=NOW, user="alice")
    assert len(alice) == 1
    assert {key: getattr(alice[0], key) for key in EXPECTED[zone]} == EXPECTED[zone]
    everyone = {usage.user: usage for usage in usage_rows.per_user(zone=zone, now=NOW)}
    assert set(everyone) == {"alice", "bob", None}
    assert (everyone["bob"].month, everyone["bob"].total) == (0, 5)
    assert everyone[None].today == 7


@pytest.mark.parametrize("zone", ["Asia/Tokyo", "UTC"])
def test_daily_history(usage_rows: TaskUsageQuery, zone: str) -> None:
    daily = usage_rows.daily(days=4, zone=zone, now=NOW, user="alice")
    assert [(entry.day, entry.tokens) for entry in daily] == EXPECTED_DAILY[zone]
    assert len(usage_rows.daily(days=30, zone=zone, now=NOW)) == 30


def test_top_users_of_the_month(usage_rows: TaskUsageQuery) -> None:
    top = usage_rows.top_users(zone="Asia/Tokyo", now=NOW)
    assert [usage.user for usage in top] == ["alice", None]
    assert [usage.user for usage in usage_rows.top_users(limit=1, zone="UTC", now=NOW)] == ["alice"]


def test_bad_usage_arguments(usage_rows: TaskUsageQuery) -> None:
    with pytest.raises(ValueError, match="unknown time zone"):
        usage_rows.per_user(zone="Mars/Olympus")
    with pytest.raises(ValueError, match="days must be"):
        usage_rows.daily(days=0)
    with pytest.raises(ValueError, match="timezone-aware"):
        usage_rows.per_user(now=datetime(2025, 1, 1))  # noqa: DTZ001


def test_days_with_a_daylight_saving_change_are_calendar_days() -> None:
    new_york = time_zone("America/New_York")
    periods = Periods.around(datetime(2025, 11, 2, 18, 0, tzinfo=UTC), new_york)
    start, end = periods.today
    assert end - start == timedelta(hours=25)
    assert start == datetime(2025, 11, 2, 4, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("zone", "now", "expected"),
    [
        # New York falls back on 2025-11-02: that day has 25 hours.
        ("America/New_York", datetime(2025, 11, 3, 12, tzinfo=UTC), [(1, 1), (2, 6), (3, 8)]),
        # ...and springs forward on 2025-03-09: 23 hours.
        ("America/New_York", datetime(2025, 3, 10, 12, tzinfo=UTC), [(8, 1), (9, 6), (10, 8)]),
        ("Asia/Kolkata", datetime(2025, 11, 3, 12, tzinfo=UTC), [(1, 0), (2, 3), (3, 12)]),
    ],
)
def test_daily_sums_follow_the_zones_rules_across_offset_changes(
    connection: DatabaseConnection, repo: TaskRepository, zone: str, now: datetime, expected: list[tuple[int, int]]
) -> None:
    month = now.month
    if month == 11:
        instants = ["2025-11-02T03:30:00", "2025-11-02T04:30:00", "2025-11-03T04:30:00", "2025-11-03T05:30:00"]
    else:
        instants = ["2025-03-09T04:30:00", "2025-03-09T05:30:00", "2025-03-10T03:30:00", "2025-03-10T04:30:00"]
    for instant, tokens in zip(instants, (1, 2, 4, 8), strict=True):
        repo.create(task_data(created_at=datetime.fromisoformat(instant).replace(tzinfo=UTC), total_tokens=tokens))
    daily = TaskUsageQuery(connection).daily(days=3, zone=zone, now=now)
    assert [(entry.day.day, entry.tokens) for entry in daily] == expected


def test_legacy_rows_count_on_the_right_day(tmp_path: Path) -> None:
    path = tmp_path / "tasks.db"
    write_legacy_db(path, rows=0)
    forms = [
        "2025-11-30T14:59:59.999999+00:00",
        "2025-12-01T00:00:00+09:00",
        "2025-12-07T14:59:59",  # no offset: UTC
        "2025-12-08T00:00:00+09:00",
        "2025-12-09T15:00:00+00:00",
        "2025-12-10T09:00:00.000000+09:00",
    ]
    with sqlite3.connect(path) as raw:
        raw.executemany(
            "INSERT INTO tasks (uuid, task_source, owner, repo, task_type, task_id, status, created_at, user, "
            "total_tokens) VALUES (?, 'github', 'acme', 'web', 'issue', '1', 'completed', ?, 'alice', ?)",
            [(str(uuid.uuid4()), text, tokens) for text, tokens in zip(forms, ROWS.values(), strict=True)],
        )
    raw.close()
    connection = DatabaseConnection.initialize(DatabaseConfig(sqlite_path=str(path)))
    upgrade_schema(connection)
    query = TaskUsageQuery(connection)
    for zone, expected in EXPECTED.items():
        alice = query.per_user(zone=zone, now=NOW, user="alice")[0]
        assert {key: getattr(alice, key) for key in expected} == expected
        assert [(e.day, e.tokens) for e in query.daily(days=4, zone=zone, now=NOW)] == EXPECTED_DAILY[zone]


def _run(repo: TaskRepository, key: Any, status: str, completed: datetime | None, **extra: Any) -> str:
    created = repo.create(task_data(**key.task_fields(), status="running", **extra))
    if status != "running":
        repo.update(created.uuid, {"status": status, "completed_at": completed})
    return created.uuid


def test_find_previous_runs_of_an_issue(repo: TaskRepository) -> None:
    key = GitHubIssueTaskKey("acme", "web", 42)
    base = datetime(2025, 12, 1, tzinfo=UTC)
    old = _run(repo, key, "completed", base - timedelta(days=30))
    stopped = _run(repo, key, "stopped", base - timedelta(days=2))
    newest = _run(repo, key, "completed", base - timedelta(hours=1))
    _run(repo, key, "failed", base - timedelta(hours=2))
    _run(repo, key, "running", None)
    _run(repo, GitHubPullRequestTaskKey("acme", "web", 42), "completed", base)
    _run(repo, GitHubIssueTaskKey("acme", "api", 42), "completed", base)
    _run(repo, GitHubIssueTaskKey("acme", "web", 43), "completed", base)

    assert [t.uuid for t in repo.find_previous(key)] == [newest, stopped, old]
    assert [t.uuid for t in repo.find_previous(key, since=base - timedelta(days=7))] == [newest, stopped]
    assert [t.uuid for t in repo.find_previous(key, limit=1)] == [newest]
    by_fields = repo.find_previous(task_source="github", owner="acme", repo="web", task_type="issue", task_id="42")
    assert [t.uuid for t in by_fields] == [newest, stopped, old]
    any_type = repo.find_previous(
        task_source="github", owner="acme", repo="web", task_id="42", statuses=("completed", "stopped", "failed")
    )
    assert len(any_type) == 5
    assert repo.find_previous(GitLabMergeRequestTaskKey(7, 42)) == []


def test_find_previous_refuses_bad_arguments(repo: TaskRepository) -> None:
    key = GitHubIssueTaskKey("acme", "web", 42)
    with pytest.raises(ValueError, match="not both"):
        repo.find_previous(key, owner="x")
    with pytest.raises(ValueError, match="missing task fields: task_source, task_id"):
        repo.find_previous(owner="acme", repo="web")
    with pytest.raises(ValueError, match="unknown task status"):
        repo.find_previous(key, statuses=("done",))
    with pytest.raises(ValueError, match="non-empty sequence"):
        repo.find_previous(key, statuses="completed")
    with pytest.raises(ValueError, match="timezone-aware"):
        repo.find_previous(key, since=datetime(2025, 1, 1))  # noqa: DTZ001


def test_find_previous_is_served_by_the_composite_index(
    repo: TaskRepository, connection: DatabaseConnection, backend: str
) -> None:
    key = GitHubIssueTaskKey("acme", "web", 42)
    _run(repo, key, "completed", datetime(2025, 12, 1, tzinfo=UTC))
    captured: list[tuple[str, Any]] = []
    event.listen(
        connection.engine,
        "before_cursor_execute",
        lambda _c, _cur, statement, parameters, *_: captured.append((statement, parameters)),
    )
    repo.find_previous(key)
    statement, parameters = next(item for item in captured if "FROM tasks" in item[0])
    with connection.engine.connect() as conn:
        cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
        if backend == "postgresql":
            cursor.execute("SET enable_seqscan = off")
            cursor.execute("EXPLAIN " + statement, parameters)
        else:
            cursor.execute("EXPLAIN QUERY PLAN " + statement, parameters)
        plan = " ".join(str(row) for row in cursor.fetchall())
    assert "ix_tasks_task_source_owner_repo" in plan


def test_cli_usage_and_history(tmp_path: Path) -> None:
    assert run(tmp_path).returncode == 0
    DatabaseConnection.initialize(DatabaseConfig(sqlite_path=str(tmp_path / "contexts" / "tasks.db")))
    repo = TaskRepository()
    now = datetime.now(UTC)
    key = GitHubIssueTaskKey("acme", "web", 42)
    rows = [("alice", now - timedelta(days=1), 1200), ("alice", now - timedelta(minutes=5), 300), ("bob", now, 50)]
    # Created (the day usage counts by) and completed at these times.
    first = _run(repo, key, "completed", rows[0][1], user="alice", total_tokens=1200, created_at=rows[0][1])
    second = _run(repo, key, "stopped", rows[1][1], user="alice", total_tokens=300, created_at=rows[1][1])
    _run(repo, GitLabMergeRequestTaskKey(77, 3), "completed", now, user="bob", total_tokens=50, created_at=now)
    DatabaseConnection.reset()

    tokyo = ZoneInfo("Asia/Tokyo")
    for _ in range(2):  # once more if Tokyo's midnight passed while the command ran
        day = datetime.now(tokyo).date()
        usage = json.loads(run(tmp_path, "tasks", "usage", "--tz", "Asia/Tokyo", "--json").stdout)
        if datetime.now(tokyo).date() == day:
            break
    today = {"alice": 0, "bob": 0}
    for user, created, tokens in rows:
        if created.astimezone(tokyo).date() == day:
            today[user] += tokens
    assert usage["time_zone"] == "Asia/Tokyo"
    assert {row["user"]: row["total"] for row in usage["users"]} == {"alice": 1500, "bob": 50}
    assert {row["user"]: row["today"] for row in usage["users"]} == today
    alice = json.loads(run(tmp_path, "tasks", "usage", "--user", "alice", "--days", "3", "--json").stdout)
    assert len(alice["daily"]) == 3 and sum(day["tokens"] for day in alice["daily"]) == 1500
    chart = run(tmp_path, "tasks", "usage", "--user", "alice", "--days", "3").stdout
    assert "alice: tokens per day, last 3 days" in chart and "█" in chart
    exported = list(csv.reader(io.StringIO(run(tmp_path, "tasks", "usage", "--csv", "--days", "3").stdout)))
    assert exported[0] == ["user", "day", "tokens"]
    by_user: dict[str, int] = {}
    for user, _day, tokens in exported[1:]:
        by_user[user] = by_user.get(user, 0) + int(tokens)
    assert by_user == {"alice": 1500, "bob": 50}
    alice_days = [(row[1], int(row[2])) for row in exported[1:] if row[0] == "alice"]
    assert alice_days == [(day["day"], day["tokens"]) for day in alice["daily"] if day["tokens"]]

    history = json.loads(run(tmp_path, "tasks", "history", "acme/web#42", "--json").stdout)
    assert [row["uuid"] for row in history] == [second, first]
    assert len(json.loads(run(tmp_path, "tasks", "history", "77!3", "--json").stdout)) == 1
    assert json.loads(run(tmp_path, "tasks", "history", "gitlab:77#3", "--json").stdout) == []
    assert "acme/web#42" in run(tmp_path, "tasks", "history", "acme/web#42").stdout
    bad = run(tmp_path, "tasks", "history", "acme#42")
    assert bad.returncode == 1 and "OWNER/REPO#NUMBER" in bad.stderr


def test_usage_defaults_and_edges(repo: TaskRepository, connection: DatabaseConnection) -> None:
    query = TaskUsageQuery(connection)
    now = datetime.now(UTC)
    for index in range(11):
        repo.create(task_data(user=f"user{index:02}", created_at=now, total_tokens=100 + index))
    zero = now - timedelta(days=2)
    repo.create(task_data(user="idle", created_at=zero, total_tokens=0))
    daily = query.daily()  # 30 days of UTC, today last
    assert len(daily) == 30 and daily[-1].day == now.date() and daily[-1].tokens == sum(range(100, 111))
    assert [entry.tokens for entry in query.daily(days=3, user="idle")] == [0, 0, 0]
    assert len(query.daily(days=MAX_DAYS)) == MAX_DAYS
    for bad in (True, MAX_DAYS + 1, 1.5):
        with pytest.raises(ValueError, match=f"days must be an integer in 1..{MAX_DAYS}"):
            query.daily(days=bad)  # type: ignore[arg-type]
    assert {usage.user: usage.today for usage in query.per_user()}["user10"] == 110
    top = query.top_users()
    assert [usage.user for usage in top] == [f"user{index:02}" for index in range(10, 0, -1)]  # ten by default
    for bad in (0, True, "3"):
        with pytest.raises(ValueError, match="limit must be a positive integer"):
            query.top_users(limit=bad)  # type: ignore[arg-type]


def test_the_start_of_the_first_day_counts_and_zones_come_from_the_caller(
    repo: TaskRepository, connection: DatabaseConnection
) -> None:
    query = TaskUsageQuery(connection)
    first_day_start = datetime(2025, 12, 7, 15, 0, tzinfo=UTC)  # 8 Dec 00:00 in Tokyo
    repo.create(task_data(user="kai", created_at=first_day_start, total_tokens=3))
    repo.create(task_data(user="kai", created_at=first_day_start - timedelta(microseconds=1), total_tokens=5))
    daily = query.daily(days=3, zone=ZoneInfo("Asia/Tokyo"), now=NOW, user="kai")
    assert [(entry.day, entry.tokens) for entry in daily] == [
        (date(2025, 12, 8), 3),
        (date(2025, 12, 9), 0),
        (date(2025, 12, 10), 0),
    ]


@pytest.mark.parametrize(
    ("call", "operation"),
    [
        (lambda query, _repo: query.daily(), "daily usage"),
        (lambda query, _repo: query.per_user(), "usage"),
        (lambda _query, repo: repo.count_by_status(), "count tasks"),
        (lambda _query, repo: repo.list_tasks(), "list tasks"),
        (lambda _query, repo: repo.get_by_uuid(str(uuid.uuid4())), "get task"),
        (lambda _query, repo: repo.update(str(uuid.uuid4()), {"model": "m"}), "update task"),
        (lambda _query, repo: repo.delete(str(uuid.uuid4())), "delete task"),
        (lambda _query, repo: repo.create(task_data()), "create task"),
        (lambda _query, repo: repo.update_statistics(str(uuid.uuid4()), llm_calls=1), "update_statistics"),
        (lambda _query, repo: repo.complete(str(uuid.uuid4())), "complete"),
        (lambda _query, repo: repo.fail(str(uuid.uuid4()), "x"), "fail"),
        (lambda _query, repo: repo.update_status(str(uuid.uuid4()), "stopped"), "update_status"),
    ],
)
def test_a_failed_operation_is_named_in_its_error(
    repo: TaskRepository, connection: DatabaseConnection, call: Any, operation: str
) -> None:
    with connection.engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE tasks")
    with pytest.raises(DatabaseError) as raised:
        call(TaskUsageQuery(connection), repo)
    # The driver's own first line, named by its class: what failed and why, never the SQL's parameters.
    assert re.fullmatch(
        rf"{operation} failed: (OperationalError: no such table: tasks|UndefinedTable: relation \"tasks\" .*)",
        str(raised.value),
    ), str(raised.value)


@pytest.fixture
def far_local_zone(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The machine's own zone far from the caller's, so that nothing may fall back on it."""
    monkeypatch.setenv("TZ", "America/Los_Angeles")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_period_ends_ties_and_the_month_of_the_callers_zone(
    repo: TaskRepository, connection: DatabaseConnection, far_local_zone: None
) -> None:
    del far_local_zone
    now = datetime(2025, 12, 9, 20, 0, tzinfo=UTC)  # Wednesday 10 Dec 05:00 in Tokyo, Tuesday 9 Dec in UTC
    at = lambda text: datetime.fromisoformat(text).replace(tzinfo=UTC)  # noqa: E731
    for user, created, tokens in (
        # Exactly at the end of today, of this week and of this month in Tokyo (a host whose clock runs ahead):
        ("dee", "2025-12-10T15:00:00", 10),
        ("dee", "2025-12-14T15:00:00", 100),
        ("dee", "2025-12-31T15:00:00", 2000),
        ("ben", "2025-12-10T15:00:00", 10),
        ("ben", "2025-12-14T15:00:00", 100),
        ("ben", "2025-12-31T15:00:00", 1000),
        ("cy", "2025-12-05T00:00:00", 110),
        ("cy", "2024-01-01T00:00:00", 1000),
        ("eve", "2025-12-09T15:00:00", 2),  # exactly the start of today in Tokyo
        ("ann", "2025-11-30T15:00:00", 1),  # 1 Dec 00:00 in Tokyo, still November in UTC
        (None, "2025-11-30T14:59:59", 5),
        ("Al", "2024-06-01T00:00:00", 5),
    ):
        repo.create(task_data(user=user, created_at=at(created), total_tokens=tokens))
    query = TaskUsageQuery(connection)
    usage = [(u.user, u.today, u.week, u.month, u.total) for u in query.per_user(zone="Asia/Tokyo", now=now)]
    assert usage == [
        ("dee", 0, 10, 110, 2110),
        ("ben", 0, 10, 110, 1110),
        ("cy", 0, 0, 110, 1110),
        ("eve", 2, 2, 2, 2),
        ("ann", 0, 0, 1, 1),
        (None, 0, 0, 0, 5),
        ("Al", 0, 0, 0, 5),
    ]
    assert [u.user for u in query.top_users(zone="Asia/Tokyo", now=now)] == ["dee", "ben", "cy", "eve", "ann"]
    assert "ann" not in [u.user for u in query.top_users(zone="UTC", now=now)]
    daily = query.daily(days=3, zone="Asia/Tokyo", now=now)
    assert [(entry.day, entry.tokens) for entry in daily] == [
        (date(2025, 12, 8), 0),
        (date(2025, 12, 9), 0),
        (date(2025, 12, 10), 2),
    ]
    with pytest.raises(ValueError, match=r"^now must be timezone-aware$"):
        query.daily(now=datetime(2025, 12, 9, 20, 0))  # noqa: DTZ001


def test_usage_reads_the_connection_it_is_given_else_the_process_one(tmp_path: Path) -> None:
    given = DatabaseConnection(DatabaseConfig(sqlite_path=str(tmp_path / "given.db")))
    given.create_tables()
    TaskRepository(given).create(task_data(user="given", total_tokens=3))
    process = DatabaseConnection.initialize(DatabaseConfig(sqlite_path=str(tmp_path / "process.db")))
    process.create_tables()
    TaskRepository(process).create(task_data(user="process", total_tokens=4))
    try:
        assert [usage.user for usage in TaskUsageQuery(given).per_user()] == ["given"]
        assert [usage.user for usage in TaskUsageQuery().per_user()] == ["process"]
    finally:
        given.dispose()


def test_a_year_with_two_offset_changes_counts_every_day_in_its_own_offset(
    connection: DatabaseConnection, repo: TaskRepository
) -> None:
    new_york = ZoneInfo("America/New_York")
    days = [date(2025, 1, 15), date(2025, 3, 10), date(2025, 7, 4), date(2025, 11, 3), date(2025, 12, 30)]
    for index, day in enumerate(days):
        # 23:30 local: half an hour from the next day, whatever the offset of that day.
        local = datetime.combine(day, datetime.min.time(), tzinfo=new_york) + timedelta(hours=23, minutes=30)
        repo.create(task_data(created_at=local.astimezone(UTC), total_tokens=10**index))
    daily = TaskUsageQuery(connection).daily(days=365, zone=new_york, now=datetime(2025, 12, 31, 17, tzinfo=UTC))
    assert {entry.day: entry.tokens for entry in daily if entry.tokens} == {
        day: 10**index for index, day in enumerate(days)
    }


def test_a_single_day_is_today_alone(repo: TaskRepository, connection: DatabaseConnection) -> None:
    repo.create(task_data(user="kai", created_at=NOW - timedelta(minutes=1), total_tokens=4))
    repo.create(task_data(user="kai", created_at=NOW - timedelta(days=1), total_tokens=9))
    daily = TaskUsageQuery(connection).daily(days=1, now=NOW)
    assert [(entry.day, entry.tokens) for entry in daily] == [(NOW.date(), 4)]


def test_the_instant_a_zone_turns_back_at_midnight_belongs_to_the_longer_day(
    repo: TaskRepository, connection: DatabaseConnection
) -> None:
    # Santiago went from 00:00 (-03) back to 23:00 (-04) on 7 April 2024: 6 April had 25 hours.
    turn = datetime(2024, 4, 7, 3, 0, tzinfo=UTC)
    for moment, tokens in ((turn - timedelta(microseconds=1), 1), (turn, 10), (turn + timedelta(hours=1), 100)):
        repo.create(task_data(user="noa", created_at=moment, total_tokens=tokens))
    daily = TaskUsageQuery(connection).daily(days=2, zone="America/Santiago", now=turn + timedelta(hours=2))
    assert [(entry.day, entry.tokens) for entry in daily] == [(date(2024, 4, 6), 11), (date(2024, 4, 7), 100)]
