"""Token usage per user by calendar day, week and month, in a time zone the caller chooses.

Calendar boundaries are computed in Python (zoneinfo) and compared with `created_at` as instants, so
neither SQLite's text date-times nor PostgreSQL's session time zone can change a result. A task's tokens
count on the day it was created; weeks start on Monday. Pruned tasks count through their usage buckets, each at
its start, which lies on the same calendar day, in every zone, as each task it holds.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from functools import cache
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

from sqlalchemy import ColumnElement, Date, Subquery, and_, case, cast, func, literal, select, true, union_all

from db.connection import DatabaseConnection
from db.models import Task, UsageBucket
from db.models.types import UTCDateTime
from db.unit_of_work import run_single_statement

MAX_DAYS = 3660


def time_zone(zone: str | tzinfo) -> tzinfo:
    """A tzinfo for an IANA name such as `Asia/Tokyo`; ValueError for anything else. Names are checked against
    the zones the system knows before any file is opened: a folder of the zone database (`America`), one of
    its data files (`zone.tab`) or a path is an unknown zone, not an error of the machine's."""
    if isinstance(zone, tzinfo):
        return zone
    if not isinstance(zone, str) or zone not in _known_zones():
        shown = zone[:64] if isinstance(zone, str) else zone
        raise ValueError(f"unknown time zone {shown!r}; use an IANA name such as UTC or Asia/Tokyo")
    try:
        return ZoneInfo(zone)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ValueError(f"unknown time zone {zone!r}; use an IANA name such as UTC or Asia/Tokyo") from None


@cache
def _known_zones() -> frozenset[str]:
    return frozenset(available_timezones())


def day_start(day: date, zone: tzinfo) -> datetime:
    """The instant (UTC) at which `day` begins in `zone`."""
    return datetime.combine(day, time(0), tzinfo=zone).astimezone(UTC)


@dataclass(frozen=True)
class Periods:
    """The current day, week and month in one time zone, as [start, end) instants."""

    today: tuple[datetime, datetime]
    week: tuple[datetime, datetime]
    month: tuple[datetime, datetime]

    @classmethod
    def around(cls, now: datetime, zone: tzinfo) -> Periods:
        local = now.astimezone(zone).date()
        monday = local - timedelta(days=local.weekday())
        first = local.replace(day=1)
        next_month = (first + timedelta(days=32)).replace(day=1)
        return cls(
            today=(day_start(local, zone), day_start(local + timedelta(days=1), zone)),
            week=(day_start(monday, zone), day_start(monday + timedelta(days=7), zone)),
            month=(day_start(first, zone), day_start(next_month, zone)),
        )


@dataclass(frozen=True)
class UserUsage:
    """Tokens of one user's tasks; `user` is None for tasks recorded without one."""

    user: str | None
    today: int
    week: int
    month: int
    total: int


@dataclass(frozen=True)
class DailyUsage:
    day: date
    tokens: int


@dataclass(frozen=True)
class UserDay:
    """One user's tokens on one calendar day (user None: tasks recorded without a user)."""

    user: str | None
    day: date
    tokens: int


class TaskUsageQuery:
    """Token sums over the tasks table, for the usage dashboard."""

    def __init__(self, connection: DatabaseConnection | None = None) -> None:
        self._connection = connection if connection is not None else DatabaseConnection.get_instance()

    def per_user(
        self, *, zone: str | tzinfo = "UTC", now: datetime | None = None, user: str | None = None
    ) -> list[UserUsage]:
        """Today, this week, this month and all-time tokens per user, the month's largest first."""
        periods = Periods.around(_now(now), time_zone(zone))
        usage = _usage_rows(None, user)

        # Each group has a row and its tokens are NOT NULL: no sum here is ever NULL.
        def within(bounds: tuple[datetime, datetime]) -> ColumnElement[int]:
            start, end = (literal(moment, UTCDateTime()) for moment in bounds)
            return func.sum(case((and_(usage.c.at >= start, usage.c.at < end), usage.c.tokens), else_=0))

        statement = select(
            usage.c.user,
            within(periods.today),
            within(periods.week),
            within(periods.month),
            func.sum(usage.c.tokens),
        ).group_by(usage.c.user)
        rows = run_single_statement(self._connection, lambda session: session.execute(statement).all(), "usage")
        usages = [UserUsage(row[0], *(int(value) for value in row[1:])) for row in rows]
        return sorted(usages, key=lambda usage: (-usage.month, -usage.total, usage.user or ""))

    def top_users(self, *, limit: int = 10, zone: str | tzinfo = "UTC", now: datetime | None = None) -> list[UserUsage]:
        """The users with the most tokens this month."""
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"limit must be a positive integer, got {limit!r}")
        return [usage for usage in self.per_user(zone=zone, now=now) if usage.month > 0][:limit]

    def daily(
        self, *, days: int = 30, zone: str | tzinfo = "UTC", now: datetime | None = None, user: str | None = None
    ) -> list[DailyUsage]:
        """Tokens per calendar day for the last `days` days (today included), oldest first, zeros included."""
        calendar, rows = self._by_local_day(days, zone, now, user, by_user=False)
        sums = {_as_date(day): int(tokens or 0) for day, tokens in rows}
        return [DailyUsage(day, sums.get(day, 0)) for day in calendar]

    def daily_by_user(
        self, *, days: int = 30, zone: str | tzinfo = "UTC", now: datetime | None = None, user: str | None = None
    ) -> list[UserDay]:
        """Tokens per user and calendar day for the last `days` days (today included), by user then day; only
        the days on which a user has tokens (so the answer grows with the tasks, not with users times days)."""
        _, rows = self._by_local_day(days, zone, now, user, by_user=True)
        found = [UserDay(who, _as_date(day), int(tokens or 0)) for who, day, tokens in rows if tokens]
        return sorted(found, key=lambda entry: (entry.user is not None, entry.user or "", entry.day))

    def _by_local_day(
        self, days: int, zone: str | tzinfo, now: datetime | None, user: str | None, *, by_user: bool
    ) -> tuple[list[date], list[Any]]:
        """The last `days` calendar days in `zone`, oldest first, and the token sums of the tasks created in
        them grouped by local day (and by user first, with `by_user`), as the database computes them."""
        if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= MAX_DAYS:
            raise ValueError(f"days must be an integer in 1..{MAX_DAYS}, got {days!r}")
        tz = time_zone(zone)
        today = _now(now).astimezone(tz).date()
        calendar = [today - timedelta(days=offset) for offset in range(days - 1, -1, -1)]
        start, end = day_start(calendar[0], tz), day_start(today + timedelta(days=1), tz)
        postgresql = self._connection.config.backend == "postgresql"
        usage = _usage_rows((start, end), user)
        local_day = _local_day(usage.c.at, _offset_spans(start, end, tz), postgresql)
        groups: list[Any] = [usage.c.user, local_day] if by_user else [local_day]
        statement = select(*groups, func.sum(usage.c.tokens)).group_by(*groups)
        rows = run_single_statement(self._connection, lambda session: session.execute(statement).all(), "daily usage")
        return calendar, list(rows)


def _usage_rows(bounds: tuple[datetime, datetime] | None, user: str | None) -> Subquery:
    """What usage is summed over, as (user, at, tokens): each task at its creation, and each usage bucket of
    pruned tasks at its start; within `bounds` [start, end) when given, and only `user`'s when given."""

    stored_user = None if user is None else Task.check_values({"user": user})["user"]

    def part(who: Any, at: Any, tokens: Any) -> Any:
        conditions = [true() if stored_user is None else who == stored_user]
        if bounds is not None:
            conditions += [at >= literal(bounds[0], UTCDateTime()), at < literal(bounds[1], UTCDateTime())]
        return select(who.label("user"), at.label("at"), tokens.label("tokens")).where(*conditions)

    return union_all(
        part(Task.user, Task.created_at, Task.total_tokens),
        part(UsageBucket.user, UsageBucket.bucket_start, UsageBucket.tokens),
    ).subquery("usage")


def _offset_spans(start: datetime, end: datetime, zone: tzinfo) -> list[tuple[datetime, int]]:
    """[(from, UTC offset in seconds)] over [start, end): the zone's offset changes only at the instants
    listed (found from the zone's rules, to the second), so each span's local day is plain arithmetic."""

    def offset(moment: datetime) -> int:
        delta = moment.astimezone(zone).utcoffset()
        return int(delta.total_seconds()) if delta is not None else 0

    spans = [(start, offset(start))]
    day = start
    while day < end:
        following = min(day + timedelta(days=1), end)
        if offset(following) != spans[-1][1] or offset(day) != spans[-1][1]:
            low, high = day, following
            while high - low > timedelta(seconds=1):
                middle = low + (high - low) / 2
                if offset(middle) == offset(low):
                    low = middle
                else:
                    high = middle
            if offset(high) != spans[-1][1]:
                spans.append((high.replace(microsecond=0), offset(high)))
        day = following
    return spans


def _local_day(at: Any, spans: list[tuple[datetime, int]], postgresql: bool) -> ColumnElement[Any]:
    """The calendar day of the instant `at` in the zone whose offsets `spans` lists, computed by the database."""

    def shifted(seconds: int) -> ColumnElement[Any]:
        if postgresql:
            moment = func.timezone("UTC", at) + func.make_interval(0, 0, 0, 0, 0, 0, seconds)
            return cast(moment, Date)
        # Stored as fixed-width UTC ISO-8601 text, which SQLite's date() reads. Its whole seconds only: date()
        # rounds to the millisecond, which would put 23:59:59.9996 on the next day.
        return func.date(func.substr(at, 1, 19), f"{seconds:+d} seconds")

    if len(spans) == 1:
        return shifted(spans[0][1])
    whens = [
        (at < literal(later, UTCDateTime()), shifted(seconds)) for (_, seconds), (later, _) in itertools.pairwise(spans)
    ]
    return case(*whens, else_=shifted(spans[-1][1]))


def _as_date(value: object) -> date:
    return value if isinstance(value, date) else date.fromisoformat(str(value))


def _now(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be timezone-aware")
    return now
