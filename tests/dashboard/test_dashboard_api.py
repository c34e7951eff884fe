"""The dashboard's JSON API and pages in-process (ASGI), on every backend, reading through a read-only connection."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import logging
import re
import resource
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx2
import pytest
from fastapi.testclient import TestClient
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import insert, update
from sqlalchemy.exc import DBAPIError

import main
from dashboard import Access, DashboardAccessError, DashboardSettings, DatabaseSource, api, create_app, pages
from dashboard.access import SESSION_COOKIE
from dashboard.server import bind, url_of
from dashboard.sign_in import FREE_FAILURES, Sessions
from db import DatabaseConfig, DatabaseConnection, Task, TaskRepository, TaskRetention
from db.errors import DatabaseError
from db.models import TaskHeartbeat
from db.repositories.task_repository import MAX_PAGE
from db.repositories.task_usage import MAX_DAYS, time_zone
from db.schema import require_current_schema, upgrade_schema
from tests.support.cli import ROOT
from tests.support.data import child_environment, task_data

# A Wednesday: 12:00 in Tokyo, 03:00 in UTC.
NOW = datetime(2026, 11, 25, 3, 0, tzinfo=UTC)
TOKEN = "s3cret-dashboard-token-0123456789"
SECRET = "hunter2-never-shown"


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


@pytest.fixture
def reader(connection: DatabaseConnection, db_config: DatabaseConfig) -> Iterator[DatabaseConnection]:
    """The dashboard's own read-only connection to the test database (in-memory SQLite has only the one)."""
    if db_config.is_sqlite_memory:
        yield connection
        return
    own = DatabaseConnection(db_config, read_only=True)
    yield own
    own.dispose()


def client_for(
    reader: DatabaseConnection, access: Access | None = None, zone: str = "UTC", sums_max_age: float = 0
) -> TestClient:
    settings = DashboardSettings(zone=zone, clock=lambda: NOW, sums_max_age=sums_max_age)
    app = create_app(DatabaseSource(lambda: reader), access or Access(), settings)
    return TestClient(app, base_url="http://127.0.0.1", raise_server_exceptions=True)


@pytest.fixture
def client(reader: DatabaseConnection) -> TestClient:
    return client_for(reader)


def ok(client: TestClient, path: str, **kwargs: Any) -> Any:
    response = client.get(path, **kwargs)
    assert response.status_code == 200, (path, response.status_code, response.text)
    return response.json()


def test_tasks_come_newest_first_filtered_and_page_by_page(client: TestClient, make_task: Callable[..., Task]) -> None:
    start = at("2026-11-20T00:00:00")
    made = [
        make_task(
            created_at=start + timedelta(minutes=index // 2 * 10),  # pairs share a created_at: ties go by uuid
            status=("failed", "completed", "running")[index % 3],
            user=("alice", "bob")[index % 2],
        )
        for index in range(8)
    ]
    expected = [task.uuid for task in sorted(made, key=lambda task: (-task.created_at.timestamp(), task.uuid))]

    seen: list[str] = []
    after: str | None = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 3} | ({"after": after} if after else {})
        page = ok(client, "/api/tasks", params=params)
        seen += [task["uuid"] for task in page["tasks"]]
        pages += 1
        after = page["next_after"]
        if after is None:
            break
    assert seen == expected
    assert pages == 3

    wanted = [task.uuid for task in made if task.status == "failed" and task.user == "alice"]
    filtered = ok(client, "/api/tasks", params={"status": "failed", "user": "alice"})
    assert sorted(task["uuid"] for task in filtered["tasks"]) == sorted(wanted)
    assert filtered["next_after"] is None

    listed = client.get("/tasks", params={"status": "failed", "user": "alice"}).text
    assert re.findall(r'<tr data-uuid="([0-9a-f-]{36})"', listed) == [uuid for uuid in expected if uuid in wanted]
    first_page = client.get("/tasks").text
    assert len(re.findall(r'<tr data-uuid="', first_page)) == 8
    assert 'rel="next"' not in first_page


def test_running_tasks_without_a_sign_of_life_are_marked_stale(
    client: TestClient, connection: DatabaseConnection, make_task: Callable[..., Task]
) -> None:
    silent, beating, finished = (make_task(status="running"), make_task(status="running"), make_task(status="failed"))
    with connection.engine.begin() as raw:
        for task in (silent, beating, finished):
            raw.execute(update(Task).where(Task.uuid == task.uuid).values(updated_at=NOW - timedelta(hours=2)))
        # One beat a minute before the dashboard's now: alive.
        raw.execute(
            insert(TaskHeartbeat).values(
                task_uuid=beating.uuid, beat_at=NOW - timedelta(minutes=1), hostname="h", process_id=1
            )
        )
    marks = {task["uuid"]: task["stale"] for task in ok(client, "/api/tasks")["tasks"]}
    assert marks == {silent.uuid: True, beating.uuid: False, finished.uuid: False}
    assert ok(client, f"/api/tasks/{silent.uuid}")["stale"] is True
    overview = client.get("/").text
    assert re.findall(r'<tr data-uuid="([^"]+)" class="stale">', overview) == [silent.uuid]


def scrape(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def test_metrics_agree_with_the_api_and_name_only_the_top_users(
    reader: DatabaseConnection, make_task: Callable[..., Task]
) -> None:
    settings = DashboardSettings(clock=lambda: NOW, metrics_top_users=2)
    client = TestClient(create_app(DatabaseSource(lambda: reader), Access(), settings), base_url="http://127.0.0.1")
    for user, tokens, status in (
        ("ann", 500, "completed"),
        ("bob", 300, "failed"),
        ("cy", 20, "running"),
        ("dee", 10, "completed"),
        (None, 5, "stopped"),
    ):
        make_task(
            user=user,
            total_tokens=tokens,
            status=status,
            created_at=NOW - timedelta(days=1),
            started_at=NOW - timedelta(hours=3) if status == "running" else None,
        )
    assert client.get("/api/tasks").status_code == 200  # a request of its own, counted below
    found = scrape(client)
    listed = ok(client, "/api/tasks", params={"limit": 1000})["tasks"]
    for status in ("running", "completed", "failed", "stopped"):
        expected = sum(task["status"] == status for task in listed)
        assert found[("agent_tasks", (("status", status),))] == expected
    usage = {user["user"]: user["total"] for user in ok(client, "/api/token-usage/summary")["users"]}
    tokens = {labels[0][1]: value for (name, labels), value in found.items() if name == "agent_tokens_total"}
    assert tokens == {"ann": usage["ann"], "bob": usage["bob"], "(other)": usage["cy"] + usage["dee"] + usage[None]}
    assert found[("agent_database_up", ())] == 1
    assert found[("agent_task_oldest_running_seconds", ())] == 3 * 3600
    assert found[("agent_tasks_stale", ())] == sum(task["stale"] for task in listed)
    assert found[("dashboard_requests_total", (("method", "GET"), ("route", "/api/tasks"), ("status", "200")))] >= 1
    assert found[("dashboard_request_seconds_count", (("route", "/api/tasks"),))] >= 1
    # Off loopback, the same rule as the API: no token, no figures.
    guarded = TestClient(
        create_app(DatabaseSource(lambda: reader), Access(token="a-token-of-sixteen+"), settings),
        base_url="http://127.0.0.1",
    )
    assert guarded.get("/metrics").status_code == 401
    assert guarded.get("/metrics", headers={"Authorization": "Bearer a-token-of-sixteen+"}).status_code == 200


def test_metric_token_buckets_lose_no_token_whatever_the_users_are_called(
    reader: DatabaseConnection, make_task: Callable[..., Task]
) -> None:
    settings = DashboardSettings(clock=lambda: NOW, metrics_top_users=1)
    client = TestClient(create_app(DatabaseSource(lambda: reader), Access(), settings), base_url="http://127.0.0.1")
    for user, tokens in (("(other)", 1000), ("(none)", 900), (None, 7), ("alice", 500)):
        make_task(user=user, total_tokens=tokens, created_at=NOW - timedelta(days=1))
    tokens = {labels: value for (name, labels), value in scrape(client).items() if name == "agent_tokens_total"}
    assert sum(tokens.values()) == 1000 + 900 + 7 + 500
    assert len(tokens) == 1  # the top user is itself called "(other)": one bucket holds everything


def test_metrics_report_a_database_that_cannot_be_read_as_down(tmp_path: Path) -> None:
    def unreadable() -> DatabaseConnection:
        raise DatabaseError("no database here")

    client = TestClient(create_app(DatabaseSource(unreadable), Access()), base_url="http://127.0.0.1")
    found = scrape(client)
    assert found[("agent_database_up", ())] == 0
    assert not any(name == "agent_tasks" for name, _ in found)


def test_usage_exports_as_csv_a_row_per_user_and_day_with_formulas_kept_as_text(
    client: TestClient, make_task: Callable[..., Task]
) -> None:
    for user, tokens, ago in (("ann", 100, 0), ("ann", 40, 1), ("=cmd|' /C calc'!A0", 7, 1), (None, 5, 2)):
        make_task(user=user, total_tokens=tokens, created_at=NOW - timedelta(days=ago, minutes=1))
    response = client.get("/api/token-usage/export.csv", params={"days": 3, "tz": "UTC"})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/csv")
    assert "attachment" in response.headers["content-disposition"]
    rows = list(csv.reader(io.StringIO(response.text)))
    days = [(NOW - timedelta(days=ago)).date().isoformat() for ago in (2, 1, 0)]
    # The days with tokens, by user then day: the export grows with the tasks, not with users times days.
    assert rows == [
        ["user", "day", "tokens"],
        ["", days[0], "5"],
        ["'=cmd|' /C calc'!A0", days[1], "7"],
        ["ann", days[1], "40"],
        ["ann", days[2], "100"],
    ]
    history = ok(client, "/api/token-usage/ann/history", params={"days": 3})["days"]
    assert [day["tokens"] for day in history] == [0, 40, 100]
    only = list(csv.reader(io.StringIO(client.get("/api/token-usage/export.csv?days=3&user=ann").text)))
    assert only[1:] == rows[-2:]
    for bad in ("days=0", "days=100000", "tz=Nowhere/City", f"user={'x' * 256}"):
        assert client.get(f"/api/token-usage/export.csv?{bad}").status_code in (400, 422), bad


def test_one_task_shows_every_column_and_only_its_earlier_runs(
    client: TestClient, repo: TaskRepository, make_task: Callable[..., Task]
) -> None:
    issue = {"owner": "acme", "repo": "web", "task_type": "issue", "task_id": "7"}
    first = make_task(**issue, created_at=at("2026-11-01T00:00:00"), status="failed", error_message="boom")
    second = make_task(**issue, created_at=at("2026-11-02T00:00:00"), status="completed")
    task = make_task(
        **issue,
        created_at=at("2026-11-03T00:00:00"),
        started_at=at("2026-11-03T00:00:01"),
        status="running",
        process_id=4242,
        hostname="agent-7",
        llm_provider="openai",
        model="gpt-x",
        context_length=128000,
        user="carol",
    )
    repo.update_statistics(task.uuid, llm_calls=3, tool_calls=5, tokens=777)
    make_task(**issue, created_at=at("2026-11-04T00:00:00"), status="completed")  # a later run
    make_task(**{**issue, "task_id": "8"}, created_at=at("2026-11-01T00:00:00"))  # another issue

    record = ok(client, f"/api/tasks/{task.uuid.upper()}")
    stored = repo.get_by_uuid(task.uuid)
    assert stored is not None
    assert record == {
        "uuid": task.uuid,
        "task_source": "github",
        **issue,
        "status": "running",
        "created_at": "2026-11-03T00:00:00Z",
        "updated_at": stored.updated_at.isoformat().replace("+00:00", "Z"),
        "started_at": "2026-11-03T00:00:01Z",
        "completed_at": None,
        "process_id": 4242,
        "hostname": "agent-7",
        "llm_provider": "openai",
        "model": "gpt-x",
        "context_length": 128000,
        "llm_call_count": 3,
        "tool_call_count": 5,
        "total_tokens": 777,
        "compression_count": 0,
        "error_message": None,
        "user": "carol",
        "stale": False,
    }
    history = ok(client, f"/api/tasks/{task.uuid}/history")
    assert history["task"] == task.uuid
    assert {run["uuid"] for run in history["earlier_runs"]} == {first.uuid, second.uuid}

    page = client.get(f"/tasks/{task.uuid}").text
    for name, value in (("hostname", "agent-7"), ("total_tokens", "777"), ("context_length", "128,000")):
        assert f'data-column="{name}">{value}</dd>' in page
    assert set(re.findall(r'<tr data-uuid="([0-9a-f-]{36})"', page)) == {first.uuid, second.uuid}


def _usage_tasks(make_task: Callable[..., Task]) -> None:
    for user, created, tokens in (
        ("alice", "2026-11-24T16:00:00", 100),  # Tokyo: today (25th, 01:00); UTC: yesterday
        ("alice", "2026-11-24T14:00:00", 20),  # Tokyo: the 24th, this week
        ("alice", "2026-11-22T14:59:00", 3),  # Tokyo: Sunday 23:59, last week, this month
        ("alice", "2026-10-31T15:00:00", 4000),  # Tokyo: 1 November 00:00, the month's first instant
        ("alice", "2026-10-31T14:59:59", 50000),  # Tokyo: 31 October, last month
        ("bob", "2026-11-25T02:00:00", 7),
        ("bob", "2025-01-01T00:00:00", 900000),
        (None, "2026-11-25T00:00:00", 11),
    ):
        task = make_task(user=user, created_at=at(created), total_tokens=tokens)
        assert task.total_tokens == tokens


def test_token_usage_in_a_chosen_zone_matches_sums_made_by_hand(
    client: TestClient, make_task: Callable[..., Task]
) -> None:
    _usage_tasks(make_task)
    tokyo = {"tz": "Asia/Tokyo"}
    alice = {"user": "alice", "today": 100, "this_week": 120, "this_month": 4123, "total": 54123}
    bob = {"user": "bob", "today": 7, "this_week": 7, "this_month": 7, "total": 900007}
    nobody = {"user": None, "today": 11, "this_week": 11, "this_month": 11, "total": 11}
    assert ok(client, "/api/token-usage/summary", params=tokyo) == {
        "zone": "Asia/Tokyo",
        "as_of": "2026-11-25T03:00:00Z",
        "users": [alice, nobody, bob],
        "top_users": [alice, nobody, bob],
    }
    assert ok(client, "/api/token-usage/summary", params={**tokyo, "top": 1})["top_users"] == [alice]
    assert ok(client, "/api/token-usage/alice", params=tokyo) == alice
    assert ok(client, "/api/token-usage/alice") == {**alice, "today": 0, "this_month": 123}  # the dashboard's UTC

    history = ok(client, "/api/token-usage/alice/history", params={**tokyo, "days": 5})
    assert history == {
        "user": "alice",
        "zone": "Asia/Tokyo",
        "days": [
            {"date": "2026-11-21", "tokens": 0},
            {"date": "2026-11-22", "tokens": 3},
            {"date": "2026-11-23", "tokens": 0},
            {"date": "2026-11-24", "tokens": 20},
            {"date": "2026-11-25", "tokens": 100},
        ],
    }
    in_utc = ok(client, "/api/token-usage/alice/history", params={"days": 3})["days"]
    assert [day["tokens"] for day in in_utc] == [0, 120, 0]

    page = client.get("/usage", params={"user": "alice", "days": 5, "tz": "Asia/Tokyo"}).text
    bars = re.findall(r'data-day="([\d-]+)" data-tokens="(\d+)"', page)
    assert bars == [(day["date"], str(day["tokens"])) for day in history["days"]]
    rows = re.findall(r'<tr data-user="(\w*)">\s*<td>[^<]*</td>((?:\s*<td class="n">[\d,]+</td>){4})', page)
    assert [(user, re.findall(r">([\d,]+)<", cells)) for user, cells in rows] == [
        ("alice", ["100", "120", "4,123", "54,123"]),
        ("", ["11", "11", "11", "11"]),
        ("bob", ["7", "7", "7", "900,007"]),
    ]


@pytest.mark.parametrize(
    ("path", "status", "detail"),
    [
        ("/api/tasks/not-a-uuid", 400, "not a valid UUID"),
        ("/api/tasks/00000000-0000-4000-8000-000000000000", 404, "no task"),
        ("/api/tasks/00000000-0000-4000-8000-000000000000/history", 404, "no task"),
        ("/api/tasks?after=00000000-0000-4000-8000-000000000000", 400, "no task"),
        ("/api/tasks?after=garbage", 400, "not a valid UUID"),
        ("/api/tasks?status=bogus", 422, None),
        ("/api/tasks?limit=0", 422, None),
        ("/api/tasks?limit=1001", 422, None),
        ("/api/tasks?limit=ten", 422, None),
        (f"/api/tasks?user={'u' * 256}", 422, None),
        ("/api/token-usage/nobody-at-all", 404, "no tasks of user"),
        ("/api/token-usage/nobody-at-all/history", 404, "no tasks of user"),
        ("/api/token-usage/alice/history?days=0", 422, None),
        ("/api/token-usage/alice/history?days=3661", 422, None),
        ("/api/token-usage/alice/history?tz=Mars/Olympus", 400, "unknown time zone"),
        ("/api/token-usage/summary?tz=..%2F..%2Fetc%2Fpasswd", 400, "unknown time zone"),
        ("/api/token-usage/summary?top=0", 422, None),
        ("/api/no-such-thing", 404, None),
    ],
)
def test_bad_parameters_answer_a_json_error_never_a_500(
    client: TestClient, make_task: Callable[..., Task], path: str, status: int, detail: str | None
) -> None:
    make_task(user="alice")
    response = client.get(path)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert "detail" in body
    if detail is not None:
        assert detail in body["detail"]


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/tasks?status=bogus", 400),
        ("/tasks?after=garbage", 400),
        ("/tasks/not-a-uuid", 400),
        ("/tasks/00000000-0000-4000-8000-000000000000", 404),
        ("/usage?days=0", 400),
        ("/usage?days=abc", 400),
        ("/usage?tz=Nowhere/Special", 400),
        ("/usage?user=nobody-at-all", 404),
    ],
)
def test_bad_parameters_on_pages_answer_an_error_page(client: TestClient, path: str, status: int) -> None:
    response = client.get(path)
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("text/html")
    assert '<p class="problem">' in response.text


def test_user_text_is_escaped_and_passwords_in_messages_are_masked(
    client: TestClient, make_task: Callable[..., Task], db_config: DatabaseConfig
) -> None:
    hostile = "<script>alert(1)</script>"
    failed = make_task(
        user=hostile,
        status="failed",
        hostname='"><img src=x onerror=alert(2)>',
        error_message=f"could not connect to postgresql://agent:{SECRET}@db:5432/app (password={SECRET})",
    )
    bodies = {
        path: client.get(path).text
        for path in (
            "/",
            "/tasks",
            f"/tasks/{failed.uuid}",
            "/usage",
            f"/api/tasks/{failed.uuid}",
            "/api/tasks",
            "/api/token-usage/summary",
            "/api",
            "/openapi.json",
        )
    }
    for path, body in bodies.items():
        assert SECRET not in body, path
        if path.startswith(("/api/", "/openapi")):
            continue
        assert hostile not in body and "<img src=x" not in body, path
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in bodies["/"]
    record = client.get(f"/api/tasks/{failed.uuid}").json()
    assert record["user"] == hostile  # JSON carries the text as it is; only HTML needs escaping
    assert record["error_message"] == "could not connect to postgresql://agent:***@db:5432/app (password=***)"
    password = db_config.password or db_config.sqlalchemy_url.password
    for path, body in bodies.items():
        if password:
            assert str(password) not in body, path
        assert db_config.safe_url not in body, path


def test_the_dashboard_reads_through_a_connection_that_cannot_write(
    client: TestClient, reader: DatabaseConnection, db_config: DatabaseConfig, make_task: Callable[..., Task]
) -> None:
    make_task(status="running")
    every_route = [*client.app.routes, *api.router.routes, *pages.router.routes]  # type: ignore[attr-defined]
    routes = {(route.path, method) for route in every_route for method in getattr(route, "methods", ()) or ()}
    assert ("/api/tasks", "GET") in routes and ("/", "GET") in routes
    # The only requests that are not reads are signing in and out, which never reach the database.
    assert {(path, method) for path, method in routes if method not in {"GET", "HEAD"}} == {
        ("/login", "POST"),
        ("/logout", "POST"),
    }
    for path in ("/", "/tasks", "/usage", "/api/tasks", "/api/token-usage/summary"):
        assert client.get(path).status_code == 200
    if db_config.is_sqlite_memory:
        return  # the test's own read-write connection is the only one there is
    with pytest.raises((DBAPIError, DatabaseError), match=r"(?i)read-?only"):
        TaskRepository(reader).create(task_data())


def test_an_unreachable_database_answers_503_without_its_password(refused_port: int) -> None:
    config = DatabaseConfig(
        type="postgresql",
        host="127.0.0.1",
        port=refused_port,
        name="x",
        user="agent",
        password=SECRET,
        startup_timeout=0,
    )

    def never() -> DatabaseConnection:
        return DatabaseConnection.initialize(config, read_only=True)

    client = TestClient(create_app(DatabaseSource(never), Access(), DashboardSettings(clock=lambda: NOW)))
    for path, kind in (("/", "text/html"), ("/api/tasks", "application/json"), ("/healthz", "application/json")):
        response = client.get(path)
        assert response.status_code == 503, (path, response.text)
        assert response.headers["content-type"].startswith(kind)
        assert SECRET not in response.text


def test_a_database_that_appears_later_is_shown_once_it_is_there(tmp_path: Path) -> None:
    path = tmp_path / "tasks.db"
    config = DatabaseConfig(sqlite_path=str(path))
    source = DatabaseSource(lambda: DatabaseConnection(config, read_only=True), retry_after=0)
    client = TestClient(create_app(source, Access(), DashboardSettings(clock=lambda: NOW)))
    missing = client.get("/")
    assert missing.status_code == 503
    assert "no database at" in missing.text
    assert not path.exists()  # asking created nothing

    writer = DatabaseConnection(config)
    writer.create_tables()
    TaskRepository(writer).create(task_data(status="running", user="dave"))
    try:
        assert client.get("/healthz").json() == {"status": "ok"}
        assert "dave" in client.get("/").text
    finally:
        writer.dispose()


@pytest.mark.parametrize(
    ("host", "env", "required"),
    [
        ("127.0.0.1", {}, False),
        ("127.8.9.10", {}, False),
        ("::1", {}, False),
        ("localhost", {}, False),
        ("127.0.0.1", {"DASHBOARD_TOKEN": TOKEN}, True),
        ("0.0.0.0", {"DASHBOARD_TOKEN": TOKEN}, True),
        ("0.0.0.0", {}, None),
        ("::", {}, None),
        ("192.0.2.7", {}, None),
        ("dashboard.example", {}, None),
        ("0.0.0.0", {"DASHBOARD_TOKEN": ""}, None),
        ("0.0.0.0", {"DASHBOARD_TOKEN": "short"}, None),
    ],
)
def test_a_token_is_required_off_loopback(host: str, env: dict[str, str], required: bool | None) -> None:
    if required is None:
        with pytest.raises(DashboardAccessError, match="DASHBOARD_TOKEN"):
            Access.for_bind(host, env)
        return
    access = Access.for_bind(host, env)
    assert access.required is required
    assert TOKEN not in repr(access)


@pytest.fixture
def guarded(reader: DatabaseConnection, make_task: Callable[..., Task]) -> TestClient:
    make_task(status="running", user="erin")
    return client_for(reader, Access(TOKEN))


@pytest.mark.parametrize("backend", ["sqlite-memory"], indirect=True)
def test_without_the_token_nothing_is_shown(guarded: TestClient) -> None:
    for path in ("/api/tasks", "/api/token-usage/summary", "/openapi.json"):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
            response = guarded.get(path, headers=headers)
            assert response.status_code == 401, (path, headers)
            assert response.headers["www-authenticate"] == "Bearer"
            assert "erin" not in response.text
    page = guarded.get("/tasks?status=running")
    assert page.status_code == 401
    assert 'name="token"' in page.text and "erin" not in page.text
    assert 'value="/tasks?status=running"' in page.text  # back to where the user was going
    assert guarded.get("/healthz").status_code == 200
    assert guarded.get("/static/style.css").status_code == 200

    answer = guarded.get("/api/tasks", headers={"Authorization": f"Bearer {TOKEN}"})
    assert answer.status_code == 200 and answer.json()["tasks"][0]["user"] == "erin"


@pytest.mark.parametrize("backend", ["sqlite-memory"], indirect=True)
def test_the_sign_in_form_sets_a_cookie_that_is_not_the_token(guarded: TestClient) -> None:
    refused = guarded.post("/login", data={"token": "wrong", "next": "/usage"})
    assert refused.status_code == 401 and SESSION_COOKIE not in refused.cookies

    signed_in = guarded.post("/login", data={"token": TOKEN, "next": "/usage"}, follow_redirects=False)
    assert signed_in.status_code == 303 and signed_in.headers["location"] == "/usage"
    cookie = signed_in.cookies[SESSION_COOKIE]
    assert TOKEN not in cookie
    assert "httponly" in signed_in.headers["set-cookie"].lower()
    assert "samesite=strict" in signed_in.headers["set-cookie"].lower()
    guarded.cookies.set(SESSION_COOKIE, cookie)
    assert "erin" in guarded.get("/").text

    for elsewhere in ("//evil.example/", "https://evil.example/", "/\\evil.example"):
        redirect = guarded.post("/login", data={"token": TOKEN, "next": elsewhere}, follow_redirects=False)
        assert redirect.headers["location"] == "/"

    guarded.cookies.clear()
    guarded.cookies.set(SESSION_COOKIE, cookie[:-1] + ("0" if cookie[-1] != "0" else "1"))
    assert guarded.get("/").status_code == 401


@pytest.mark.parametrize("backend", ["sqlite-memory"], indirect=True)
def test_the_api_page_lists_every_endpoint(client: TestClient) -> None:
    paths = set(client.get("/openapi.json").json()["paths"])
    assert paths == {
        "/api/tasks",
        "/api/tasks/{uuid}",
        "/api/tasks/{uuid}/history",
        "/api/token-usage/export.csv",
        "/api/token-usage/summary",
        "/api/token-usage/{user}",
        "/api/token-usage/{user}/history",
    }
    page = client.get("/api").text
    assert all(f"<code>GET {path}</code>" in page for path in paths)


def test_serve_refuses_a_public_address_without_a_token(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "main.py"), "serve", "--host", "0.0.0.0", "--port", "0"],
        cwd=tmp_path,
        env={key: value for key, value in child_environment().items() if key != "DASHBOARD_TOKEN"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert "refusing to serve on 0.0.0.0 without a token" in result.stderr
    assert "dashboard on" not in result.stdout
    assert not (tmp_path / "contexts").exists()


def test_the_listening_socket_lets_asyncio_turn_off_nagle() -> None:
    # asyncio sets TCP_NODELAY only on sockets whose proto is IPPROTO_TCP; without it, each answer on a
    # kept-alive connection waited 40 ms for the client's delayed ACK.
    with contextlib.closing(bind("127.0.0.1", 0)) as sock:
        assert sock.proto == socket.IPPROTO_TCP
        assert url_of(sock) == f"http://127.0.0.1:{sock.getsockname()[1]}/"


def test_sums_over_every_task_are_reused_for_their_max_age_only(
    reader: DatabaseConnection, make_task: Callable[..., Task]
) -> None:
    make_task(user="frank", created_at=NOW - timedelta(hours=1), total_tokens=10)
    cached, fresh = client_for(reader, sums_max_age=600), client_for(reader)
    with cached:
        assert ok(cached, "/api/token-usage/summary")["users"][0]["total"] == 10
        assert re.findall(r'data-tokens="(\d+)"', cached.get("/usage").text)[-1] == "10"
        make_task(user="frank", created_at=NOW - timedelta(hours=1), total_tokens=5)
        assert ok(cached, "/api/token-usage/summary")["users"][0]["total"] == 10
        assert ok(cached, "/api/token-usage/frank")["total"] == 15  # one user's sums: always afresh
        days = ok(cached, "/api/token-usage/frank/history", params={"days": 1})["days"]
        assert days == [{"date": "2026-11-25", "tokens": 15}]
        assert re.findall(r'data-tokens="(\d+)"', cached.get("/usage").text)[-1] == "10"
        assert "they are computed again at most every 600 s" in cached.get("/usage").text
    assert ok(fresh, "/api/token-usage/summary")["users"][0]["total"] == 15
    assert re.findall(r'data-tokens="(\d+)"', fresh.get("/usage", params={"days": 1}).text) == ["15"]


def test_before_the_agent_first_runs_the_pages_show_an_empty_table(tmp_path: Path) -> None:
    path = tmp_path / "contexts" / "tasks.db"
    config = DatabaseConfig(sqlite_path=str(path))
    source = DatabaseSource(lambda: DatabaseConnection(config, read_only=True), retry_after=0, empty_until_created=path)
    client = TestClient(create_app(source, Access(), DashboardSettings(clock=lambda: NOW)))
    overview = client.get("/")
    assert overview.status_code == 200
    assert f"No database at {path} yet" in overview.text
    assert re.findall(r'<span class="number">(\d+)</span>', overview.text) == ["0", "0", "0", "0"]
    assert ok(client, "/api/tasks") == {"tasks": [], "next_after": None}
    assert not path.parent.exists()  # nothing created on disk

    writer = DatabaseConnection(config)
    writer.create_tables()
    TaskRepository(writer).create(task_data(status="running", user="gina"))
    try:
        shown = client.get("/").text
        assert "gina" in shown and "No database at" not in shown
    finally:
        writer.dispose()


ZONE_FOLDERS = ["America", "Etc", "Europe", "__pycache__", "zone.tab", "posixrules", "../../etc/passwd", "America/"]


@pytest.mark.parametrize("zone", ZONE_FOLDERS)
@pytest.mark.parametrize("backend", ["sqlite-memory"], indirect=True)
def test_a_name_in_the_zone_database_that_is_not_a_zone_is_a_bad_request(client: TestClient, zone: str) -> None:
    for path, kind in (("/api/token-usage/summary", "application/json"), ("/usage", "text/html")):
        response = client.get(path, params={"tz": zone})
        assert response.status_code == 400, (path, zone, response.text)
        assert response.headers["content-type"].startswith(kind)
        assert response.headers["x-content-type-options"] == "nosniff"
        assert "unknown time zone" in response.text


@given(zone=st.text(max_size=40))
def test_any_zone_name_is_a_zone_or_a_value_error(zone: str) -> None:
    try:
        time_zone(zone)
    except ValueError as exc:
        assert str(exc).startswith("unknown time zone")


@pytest.mark.parametrize("command", [["tasks", "usage", "--tz", "America"], ["serve", "--tz", "Europe"]])
def test_the_commands_refuse_a_zone_folder_as_a_usage_error(
    command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main.main(command)
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert "unknown time zone 'America'" in error or "unknown time zone 'Europe'" in error
    assert "Traceback" not in error


def test_every_documented_bound_is_taken_at_its_value_and_refused_past_it(
    client: TestClient, connection: DatabaseConnection
) -> None:
    start = at("2026-11-01T00:00:00")
    rows = [task_data(created_at=start + timedelta(seconds=index), user="alice") for index in range(MAX_PAGE + 1)]
    with connection.session_scope() as session:
        session.execute(insert(Task), rows)
    first = ok(client, "/api/tasks", params={"limit": MAX_PAGE})
    assert len(first["tasks"]) == MAX_PAGE and first["next_after"] == first["tasks"][-1]["uuid"]
    last = ok(client, "/api/tasks", params={"limit": MAX_PAGE, "after": first["next_after"]})
    assert len(last["tasks"]) == 1 and last["next_after"] is None
    exactly = ok(client, "/api/tasks", params={"limit": MAX_PAGE, "after": first["tasks"][0]["uuid"]})
    assert len(exactly["tasks"]) == MAX_PAGE and exactly["next_after"] is None  # the rest fills one page
    assert client.get("/api/tasks", params={"limit": MAX_PAGE + 1}).status_code == 422
    assert ok(client, "/api/token-usage/summary", params={"top": 100})["users"][0]["user"] == "alice"
    assert client.get("/api/token-usage/summary", params={"top": 101}).status_code == 422
    assert len(ok(client, "/api/token-usage/alice/history", params={"days": MAX_DAYS})["days"]) == MAX_DAYS
    assert client.get("/api/token-usage/alice/history", params={"days": MAX_DAYS + 1}).status_code == 422
    assert client.get("/api/token-usage/" + "u" * 255).status_code == 404
    assert client.get("/api/token-usage/" + "u" * 256).status_code == 422


def test_unsigned_requests_learn_only_the_status_of_the_database(tmp_path: Path, refused_port: int) -> None:
    config = DatabaseConfig(type="postgresql", host="127.0.0.1", port=refused_port, name="secretdb", startup_timeout=0)
    source = DatabaseSource(lambda: DatabaseConnection.initialize(config, read_only=True))
    client = TestClient(create_app(source, Access(TOKEN), DashboardSettings(clock=lambda: NOW)))
    unsigned = client.get("/healthz")
    assert unsigned.status_code == 503 and unsigned.json() == {"status": "unavailable"}
    signed = client.get("/healthz", headers={"Authorization": f"Bearer {TOKEN}"})
    assert signed.status_code == 503 and "secretdb" in signed.json()["detail"]

    awaited = tmp_path / "hidden-place" / "tasks.db"
    waiting = DatabaseSource(
        lambda: DatabaseConnection(DatabaseConfig(sqlite_path=str(awaited)), read_only=True),
        empty_until_created=awaited,
    )
    login = TestClient(create_app(waiting, Access(TOKEN), DashboardSettings(clock=lambda: NOW))).get("/login")
    assert "hidden-place" not in login.text


@pytest.mark.parametrize("backend", ["sqlite-memory"], indirect=True)
def test_head_is_answered_as_get_without_a_body(guarded: TestClient) -> None:
    for path, headers in (("/healthz", {}), ("/api/tasks", {"Authorization": f"Bearer {TOKEN}"}), ("/", {})):
        response = guarded.head(path, headers=headers)
        expected = guarded.get(path, headers=headers)
        assert response.status_code == expected.status_code, path
        assert response.content == b""
        assert response.headers["x-frame-options"] == "DENY"


@pytest.mark.parametrize(
    "damage",
    ["not a database", "truncated", "schema record unreadable"],
)
def test_the_dashboard_stays_up_and_says_why_whatever_the_database_is(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "tasks.db"
    if damage == "not a database":
        path.write_bytes(b"this is a text file, not SQLite\n" * 200)
    else:
        writer = DatabaseConnection(DatabaseConfig(sqlite_path=str(path)))
        upgrade_schema(writer)
        TaskRepository(writer).create(task_data(user="hana"))
        writer.dispose()
        if damage == "truncated":
            with path.open("r+b") as file:
                file.truncate(path.stat().st_size // 2)
        else:  # as a role without SELECT on it finds it: reading it fails with the driver's own error
            with sqlite3.connect(path) as raw:
                raw.execute("DROP TABLE alembic_version")
                raw.execute("CREATE VIEW alembic_version AS SELECT version_num FROM gone")
                raw.execute("DROP TABLE IF EXISTS gone")
    source = DatabaseSource(lambda: _open_like_serve(path), retry_after=0)
    with pytest.raises(DatabaseError):  # what `serve` expects at start, and goes on after
        source.connection()
    client = TestClient(create_app(source, Access(), DashboardSettings(clock=lambda: NOW)))
    for page in ("/healthz", "/", "/api/tasks"):
        response = client.get(page)
        assert response.status_code == 503, (page, response.text)
        assert response.headers["x-content-type-options"] == "nosniff"


def _open_like_serve(path: Path) -> DatabaseConnection:
    """What `serve` does to open its database: read-only, without waiting, schema at head."""
    connection = DatabaseConnection.initialize(DatabaseConfig(sqlite_path=str(path), startup_timeout=0), read_only=True)
    require_current_schema(connection)
    return connection


@pytest.mark.parametrize("backend", ["sqlite-memory"], indirect=True)
def test_signing_out_ends_the_session_for_good(guarded: TestClient) -> None:
    signed_in = guarded.post("/login", data={"token": TOKEN, "next": "/"}, follow_redirects=False)
    cookie = signed_in.cookies[SESSION_COOKIE]
    assert "erin" in guarded.get("/").text
    guarded.post("/logout", follow_redirects=False)
    guarded.cookies.set(SESSION_COOKIE, cookie)  # the same cookie, kept by hand
    assert guarded.get("/").status_code == 401
    assert guarded.get("/api/tasks").status_code == 401


def test_a_session_expires() -> None:
    now = [1000.0]
    sessions = Sessions(lifetime=60, clock=lambda: now[0])
    session = sessions.open()
    assert sessions.accepts(session) and not sessions.accepts(session + "x") and not sessions.accepts(None)
    now[0] += 59
    assert sessions.accepts(session)
    now[0] += 2
    assert not sessions.accepts(session)


@pytest.mark.parametrize("backend", ["sqlite-memory"], indirect=True)
def test_failed_sign_ins_are_logged_and_slowed_until_even_the_right_token_waits(
    guarded: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="dashboard.pages"):
        answers = [guarded.post("/login", data={"token": f"guess{n}"}).status_code for n in range(8)]
    assert answers == [401] * FREE_FAILURES + [429] * (8 - FREE_FAILURES)
    assert "dashboard: failed sign-in from testclient (1 in a row)" in caplog.messages
    blocked = guarded.post("/login", data={"token": TOKEN}, follow_redirects=False)
    assert blocked.status_code == 429 and int(blocked.headers["retry-after"]) >= 1
    assert SESSION_COOKIE not in blocked.cookies
    elsewhere = TestClient(guarded.app, base_url="http://127.0.0.1", client=("192.0.2.9", 4000))
    assert elsewhere.post("/login", data={"token": TOKEN}, follow_redirects=False).status_code == 303


def test_the_cookie_is_secure_behind_a_trusted_tls_proxy_only(reader: DatabaseConnection) -> None:
    settings = DashboardSettings(clock=lambda: NOW, trusted_proxies=("10.0.0.0/8",))
    app = create_app(DatabaseSource(lambda: reader), Access(TOKEN), settings)
    forwarded = {"X-Forwarded-Proto": "https", "X-Forwarded-For": "203.0.113.5"}
    for client, secure in ((("10.1.2.3", 5000), True), (("192.0.2.1", 5000), False)):
        answer = TestClient(app, base_url="http://dash", client=client).post(
            "/login", data={"token": TOKEN}, headers=forwarded, follow_redirects=False
        )
        assert answer.status_code == 303
        assert ("; secure" in answer.headers["set-cookie"].lower()) is secure, client
    with pytest.raises(ValueError, match="does not appear to be an IPv4 or IPv6 network"):
        DashboardSettings(trusted_proxies=("proxy.example",))


def test_a_dashboard_stopped_by_sigterm_leaves_no_wal_or_shm_files(tmp_path: Path) -> None:
    database = tmp_path / "contexts" / "tasks.db"
    writer = DatabaseConnection(DatabaseConfig(sqlite_path=str(database)))
    upgrade_schema(writer)
    TaskRepository(writer).create(task_data(user="ivy"))
    writer.dispose()
    assert sorted(path.name for path in database.parent.iterdir() if "tasks.db-" in path.name) == []
    server = subprocess.Popen(
        [sys.executable, str(ROOT / "main.py"), "serve", "--port", "0"],
        cwd=tmp_path,
        env=child_environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        url = re.search(r"dashboard on (\S+) ", server.stdout.readline())
        assert url is not None
        with urllib.request.urlopen(url.group(1) + "api/tasks") as answer:  # noqa: S310 (loopback)
            assert b"ivy" in answer.read()
        assert (database.parent / "tasks.db-shm").exists()  # the reader is open
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
    finally:
        server.kill()
        server.communicate()
    assert sorted(path.name for path in database.parent.iterdir() if "tasks.db-" in path.name) == []


def test_clients_that_never_finish_their_headers_are_closed_and_the_log_stays_small(tmp_path: Path) -> None:
    limit = 200
    server = subprocess.Popen(
        [sys.executable, str(ROOT / "main.py"), "serve", "--port", "0", "--header-timeout", "1"],
        cwd=tmp_path,
        env=child_environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit)),  # noqa: PLW1509
    )
    slow: list[socket.socket] = []
    try:
        assert server.stdout is not None
        found = re.search(r"dashboard on http://([\d.]+):(\d+)/ ", server.stdout.readline())
        assert found is not None
        address = (found.group(1), int(found.group(2)))
        for index in range(limit + 100):  # more than the server has descriptors for
            connection = socket.create_connection(address, timeout=5)
            if index % 2:
                connection.sendall(b"GET /healthz HTTP/1.1\r\nHost: dash\r\nX-Slow: ")  # headers never finished
            else:  # headers whole, the body trickling
                connection.sendall(b"POST /login HTTP/1.1\r\nHost: dash\r\nContent-Length: 1000\r\n\r\ntoken=")
            slow.append(connection)
        time.sleep(3)
        closed = 0
        for connection in slow:
            connection.settimeout(0.05)
            try:
                closed += connection.recv(1) == b""
            except ConnectionResetError:
                closed += 1
            except TimeoutError:
                pass  # still open
        assert closed == len(slow)
        with urllib.request.urlopen(f"http://{address[0]}:{address[1]}/healthz", timeout=10) as answer:
            assert answer.status == 200
    finally:
        for connection in slow:
            connection.close()
        server.send_signal(signal.SIGTERM)
        _, errors = server.communicate(timeout=30)
    assert len(errors) < 20_000, errors[-2000:]


def test_sign_in_attempts_sent_at_once_are_counted_one_after_another(reader: DatabaseConnection) -> None:
    app = create_app(DatabaseSource(lambda: reader), Access(TOKEN), DashboardSettings(clock=lambda: NOW))

    async def guesses_at_once() -> list[int]:
        transport = httpx2.ASGITransport(app=app, client=("192.0.2.50", 1234))
        async with httpx2.AsyncClient(transport=transport, base_url="http://dash") as client:
            sent = [client.post("/login", data={"token": f"guess{n}"}) for n in range(40)]
            return [answer.status_code for answer in await asyncio.gather(*sent)]

    answers = asyncio.run(guesses_at_once())
    assert answers.count(401) == FREE_FAILURES and answers.count(429) == 40 - FREE_FAILURES


def test_a_user_whose_tasks_were_all_pruned_keeps_a_usage_page_and_history(
    client: TestClient, connection: DatabaseConnection, make_task: Callable[..., Task]
) -> None:
    long_ago = NOW - timedelta(days=200)
    task = make_task(user="carol", total_tokens=50, status="completed", created_at=long_ago, completed_at=long_ago)
    before = [client.get(path) for path in ("/api/token-usage/carol/history?days=30", "/usage?user=carol")]
    assert TaskRetention(connection).prune([task.uuid], NOW - timedelta(days=100)) == [task.uuid]
    after = [client.get(path) for path in ("/api/token-usage/carol/history?days=30", "/usage?user=carol")]
    assert [response.status_code for response in after] == [response.status_code for response in before] == [200, 200]
    assert after[0].json() == before[0].json()
    assert client.get("/api/token-usage/carol").json()["total"] == 50
