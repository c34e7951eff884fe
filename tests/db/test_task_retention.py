"""Pruning finished tasks keeps every token figure: by user, today, this week, this month, all time and day by
day, in every zone; on every backend."""

from __future__ import annotations

import random
import uuid
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, available_timezones

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import func, insert, select, text

from db import DatabaseConnection, Task, TaskRetention, TaskUsageQuery
from db.models import TaskHeartbeat, UsageBucket, bucket_start
from db.repositories.task_usage import day_start
from tests.support.data import task_data

NOW = datetime(2026, 11, 30, 9, 30, tzinfo=UTC)
CUTOFF = NOW - timedelta(days=90)
# Zones whose midnight is not on a whole hour of UTC, or whose clocks change: the buckets must hold for each.
ZONES = (
    "UTC",
    "Asia/Tokyo",
    "Asia/Kathmandu",
    "Australia/Eucla",
    "Pacific/Chatham",
    "America/St_Johns",
    "America/New_York",
    "Europe/London",
    "Australia/Lord_Howe",
    "Pacific/Kiritimati",
)
USERS = ("alice", "bob", None, "ゆき", "idle")


def add_tasks(connection: DatabaseConnection, rows: list[dict[str, Any]]) -> None:
    with connection.engine.begin() as raw:
        raw.execute(insert(Task), [Task.check_values(task_data(**row)) for row in rows])


def history(connection: DatabaseConnection) -> list[Any]:
    """Every usage figure the dashboard, the CLI and the export read, in every zone of ZONES."""
    usage = TaskUsageQuery(connection)
    seen: list[Any] = []
    for zone in ZONES:
        seen.append(usage.per_user(zone=zone, now=NOW))
        seen.append(usage.daily_by_user(days=400, zone=zone, now=NOW))
        seen.append(usage.daily(days=400, zone=zone, now=NOW))
        for user in USERS[:2]:
            seen.append(usage.daily(days=400, zone=zone, now=NOW, user=user))
    return seen


def old_and_new_tasks(seed: int) -> list[dict[str, Any]]:
    """Tasks around every zone's midnights and clock changes, finished long ago and lately, and running ones."""
    chooser = random.Random(seed)
    rows = []
    for _ in range(200):
        # At the edges of the days of one of the zones: just before, at and just after its midnight.
        zone = ZoneInfo(chooser.choice(ZONES))
        day = (NOW - timedelta(days=chooser.uniform(0, 380))).astimezone(zone).date()
        edge = chooser.choice((-0.000001, 0, 0.000001, 59.999, 899.999999, 900, 3600 * 23 + 0.5))
        created = day_start(day, zone) + timedelta(seconds=edge)
        user = chooser.choice(USERS)
        status = chooser.choice(("completed", "failed", "stopped", "running"))
        completed = None if status == "running" else created + timedelta(days=chooser.uniform(0, 30))
        rows.append(
            {
                "uuid": str(uuid.UUID(int=chooser.getrandbits(128), version=4)),
                "user": user,
                "status": status,
                "created_at": created,
                "updated_at": completed or created,
                "completed_at": completed,
                "total_tokens": 0 if user == "idle" else chooser.randrange(0, 2_000_000_000),
            }
        )
    # A user all of whose tasks go, and who used no tokens: still listed, with zeros, after.
    long_ago = NOW - timedelta(days=200)
    rows += [
        {
            "uuid": str(uuid.uuid4()),
            "user": "gone",
            "status": "completed",
            "created_at": long_ago,
            "completed_at": long_ago,
            "updated_at": long_ago,
            "total_tokens": 0,
        }
        for _ in range(2)
    ]
    return rows


def test_pruning_keeps_every_usage_figure_in_every_zone_and_removes_only_old_finished_tasks(
    connection: DatabaseConnection,
) -> None:
    rows = old_and_new_tasks(24)
    add_tasks(connection, rows)
    retention = TaskRetention(connection)
    before = history(connection)
    expected = {row["uuid"] for row in rows if row["completed_at"] is not None and row["completed_at"] < CUTOFF}
    assert retention.summary(CUTOFF).tasks == len(expected) > 40
    pruned: list[str] = []
    after_task = None
    # Small batches, so that buckets of one user and quarter hour come from several batches.
    while batch := retention.prunable(CUTOFF, after=after_task, limit=7):
        after_task = batch[-1]
        pruned += retention.prune([task.uuid for task in batch], CUTOFF)
    assert set(pruned) == expected
    assert history(connection) == before
    with connection.engine.connect() as raw:
        left = set(raw.execute(select(Task.uuid)).scalars())
        buckets = raw.execute(select(func.count()).select_from(UsageBucket)).scalar_one()
    assert left == {row["uuid"] for row in rows} - expected
    assert 0 < buckets <= len(expected)
    assert retention.summary(CUTOFF).tasks == 0 and retention.prunable(CUTOFF) == []


def test_only_finished_tasks_still_past_the_cutoff_are_pruned_with_their_heartbeats(
    connection: DatabaseConnection,
) -> None:
    old = NOW - timedelta(days=200)
    rows = [
        {"uuid": str(uuid.uuid4()), "status": status, "created_at": old, "completed_at": completed, "total_tokens": 5}
        for status, completed in (("completed", old), ("running", None), ("failed", NOW), ("stopped", old))
    ]
    add_tasks(connection, rows)
    done, running, recent, stopped = (row["uuid"] for row in rows)
    with connection.engine.begin() as raw:
        raw.execute(insert(TaskHeartbeat), [{"task_uuid": done, "beat_at": old, "hostname": "h", "process_id": 1}])
    retention = TaskRetention(connection)
    # Asked for all four (a caller's stale list): only the two still finished before the cutoff go.
    assert sorted(retention.prune([done, running, recent, stopped.upper()], CUTOFF)) == sorted([done, stopped])
    with connection.engine.connect() as raw:
        assert set(raw.execute(select(Task.uuid)).scalars()) == {running, recent}
        assert raw.execute(select(func.count()).select_from(TaskHeartbeat)).scalar_one() == 0
        assert raw.execute(select(func.sum(UsageBucket.tokens))).scalar_one() == 10
    assert retention.prune([], CUTOFF) == []
    with pytest.raises(ValueError, match="at most 1000"):
        retention.prune([str(uuid.uuid4()) for _ in range(1001)], CUTOFF)
    with pytest.raises(ValueError, match="limit"):
        retention.prunable(CUTOFF, limit=0)


@pytest.mark.parametrize("backend", ["postgresql"])
def test_a_row_another_transaction_holds_is_skipped_not_waited_for(connection: DatabaseConnection) -> None:
    old = NOW - timedelta(days=200)
    rows = [{"uuid": str(uuid.uuid4()), "status": "completed", "created_at": old, "completed_at": old} for _ in "ab"]
    add_tasks(connection, rows)
    held, free = rows[0]["uuid"], rows[1]["uuid"]
    with connection.engine.connect() as other:
        other.execute(text("SET lock_timeout = 0"))
        other.execute(select(Task.uuid).where(Task.uuid == held).with_for_update())
        assert TaskRetention(connection).prune([held, free], CUTOFF) == [free]
        other.rollback()
    assert TaskRetention(connection).prune([held], CUTOFF) == [held]


@settings(max_examples=400, deadline=None)
@given(
    zone=st.sampled_from(sorted(available_timezones())),
    day=st.dates(date(2012, 1, 1), date(2036, 12, 31)),
    offset=st.floats(-900, 900),
)
def test_a_task_near_any_zone_s_midnight_falls_on_the_calendar_day_of_its_bucket(
    zone: str, day: date, offset: float
) -> None:
    tz = ZoneInfo(zone)
    moment = day_start(day, tz) + timedelta(seconds=offset)
    assert bucket_start(moment).astimezone(tz).date() == moment.astimezone(tz).date()
