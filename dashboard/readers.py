"""What the dashboard shows, read through the project's own repository and usage queries.

The API and the pages both render these values, so they cannot disagree.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

from dashboard.refreshing import RefreshingValues
from db.connection import DatabaseConnection
from db.models import Task, TaskStatus
from db.models.types import canonical_uuid
from db.redaction import redact_secrets
from db.repositories.task_liveness import TaskLiveness
from db.repositories.task_repository import MAX_PAGE, TaskRepository
from db.repositories.task_usage import TaskUsageQuery, UserDay, UserUsage, time_zone

TASK_COLUMNS = tuple(column.key for column in Task.__table__.columns)
RUNNING_SHOWN = 50
FAILURES_SHOWN = 10
EARLIER_RUNS_SHOWN = 50
DEFAULT_DAYS = 30
TOP_USERS = 10
ALL_STATUSES = tuple(status.value for status in TaskStatus)


class NotFoundError(LookupError):
    """The named task or user has nothing to show."""


def task_record(task: Task, stale: frozenset[str] = frozenset()) -> dict[str, Any]:
    """Every column of `task`, and whether it runs without a sign of life (its uuid in `stale`); an error
    message with any password in it masked."""
    record = {name: getattr(task, name) for name in TASK_COLUMNS}
    record["stale"] = task.uuid in stale
    if record["error_message"] is not None:
        record["error_message"] = redact_secrets(record["error_message"])
    return record


def usage_record(usage: UserUsage) -> dict[str, Any]:
    """One user's sums under the field names of the agent's token-usage API."""
    return {
        "user": usage.user,
        "today": usage.today,
        "this_week": usage.week,
        "this_month": usage.month,
        "total": usage.total,
    }


@dataclass(frozen=True)
class TaskPage:
    tasks: list[Task]
    next_after: str | None


@dataclass(frozen=True)
class Overview:
    counts: dict[str, int]
    running: list[Task]
    failures: list[Task]
    now: datetime
    stale: frozenset[str]


@dataclass(frozen=True)
class UsageView:
    zone: str
    users: list[dict[str, Any]]
    top_users: list[dict[str, Any]]
    as_of: datetime


@dataclass(frozen=True)
class History:
    user: str | None
    zone: str
    days: list[tuple[date, int]]
    as_of: datetime


class DashboardReader:
    """The dashboard's questions, each answered by the repository or the usage query."""

    def __init__(
        self,
        connection: DatabaseConnection,
        clock: Callable[[], datetime],
        sums: RefreshingValues[Any],
        stale_after: timedelta = timedelta(minutes=10),
    ) -> None:
        self._tasks = TaskRepository(connection)
        self._usage = TaskUsageQuery(connection)
        self._liveness = TaskLiveness(connection)
        self._clock = clock
        self._sums = sums
        self._stale_after = stale_after

    def overview(self) -> Overview:
        running = self._tasks.list_tasks(status=TaskStatus.RUNNING.value, limit=RUNNING_SHOWN)
        return Overview(
            counts=self._tasks.count_by_status(),
            running=running,
            failures=self._tasks.list_tasks(status=TaskStatus.FAILED.value, limit=FAILURES_SHOWN),
            now=self._clock(),
            stale=self.stale(running),
        )

    def usage_by_day(self, days: int, zone: str, user: str | None) -> list[UserDay]:
        """Tokens per user and calendar day (a scan of the days asked for; computed at each request)."""
        return self._usage.daily_by_user(days=days, zone=zone, now=self._clock(), user=user)

    def reachable(self) -> bool:
        """Whether the database answers now (one attempt)."""
        return self._tasks.ping()

    def counts(self) -> dict[str, int]:
        return self._tasks.count_by_status()

    def oldest_running_start(self) -> datetime | None:
        return self._tasks.oldest_running_start()

    def stale(self, tasks: list[Task]) -> frozenset[str]:
        """Those of `tasks` that run with no sign of life for the dashboard's `stale_after`."""
        running = [task.uuid for task in tasks if task.status == TaskStatus.RUNNING.value]
        if not running:
            return frozenset()
        found = self._liveness.stale(self._stale_after, now=self._clock(), among=running)
        return frozenset(item.task.uuid for item in found)

    def count_stale(self) -> int:
        return self._liveness.count_stale(self._stale_after, now=self._clock())

    def page(self, *, status: str | None, user: str | None, after: str | None, limit: int) -> TaskPage:
        """One page of the listing, newest first; `next_after` continues it, None on the last page."""
        # One row more than the page tells whether another follows; at the largest page, a second look does.
        rows = self._tasks.list_tasks(status=status, user=user, after=after, limit=min(limit + 1, MAX_PAGE))
        # An unknown `after` lists nothing: only then is it looked up, to tell it from the end of the listing.
        if not rows and after is not None and self._tasks.get_by_uuid(after) is None:
            raise ValueError(f"after: no task {canonical_uuid(after)} to continue from")
        more = len(rows) > limit or (
            len(rows) == limit == MAX_PAGE
            and bool(self._tasks.list_tasks(status=status, user=user, after=rows[-1].uuid, limit=1))
        )
        tasks = rows[:limit]
        return TaskPage(tasks, tasks[-1].uuid if more else None)

    def task(self, uuid: str) -> Task:
        task = self._tasks.get_by_uuid(canonical_uuid(uuid))
        if task is None:
            raise NotFoundError(f"no task {canonical_uuid(uuid)}")
        return task

    def earlier_runs(self, task: Task) -> list[Task]:
        """Runs of the same issue or merge request created before this one, most recently completed first."""
        runs = self._tasks.find_previous(
            task_source=task.task_source,
            owner=task.owner,
            repo=task.repo,
            task_type=task.task_type,
            task_id=task.task_id,
            statuses=ALL_STATUSES,
            limit=EARLIER_RUNS_SHOWN,
        )
        return [run for run in runs if run.uuid != task.uuid and run.created_at <= task.created_at]

    def usage(self, zone: str, top: int) -> UsageView:
        """Every user's sums (a scan of the whole table, so taken from `sums` while fresh enough)."""
        time_zone(zone)

        def compute() -> tuple[datetime, list[UserUsage]]:
            now = self._clock()
            return now, self._usage.per_user(zone=zone, now=now)

        (as_of, users), _ = self._sums.get(("per_user", zone), compute)
        top_users = [usage for usage in users if usage.month > 0][:top]
        return UsageView(
            zone, [usage_record(usage) for usage in users], [usage_record(usage) for usage in top_users], as_of
        )

    def user_usage(self, user: str, zone: str) -> dict[str, Any]:
        found = self._usage.per_user(zone=zone, now=self._clock(), user=user)
        if not found:
            raise NotFoundError(f"no tasks of user {user!r}")
        return usage_record(found[0])

    def history(self, user: str | None, days: int, zone: str) -> History:
        """Tokens per day, oldest first; one user's, or everyone's when `user` is None."""

        def compute() -> tuple[datetime, list[tuple[date, int]]]:
            now = self._clock()
            daily = self._usage.daily(days=days, zone=zone, now=now, user=user)
            return now, [(point.day, point.tokens) for point in daily]

        if user is not None:  # one user's tasks, found by index: always computed afresh
            as_of, points = compute()
            # A user without a token in these days may have no task at all: only then is that looked up, among
            # the tasks and the usage of pruned ones.
            if not any(tokens for _, tokens in points) and not self._usage.per_user(zone=zone, user=user):
                raise NotFoundError(f"no tasks of user {user!r}")
        else:
            (as_of, points), _ = self._sums.get(("daily", days, zone), compute)
        return History(user, zone, points, as_of)
