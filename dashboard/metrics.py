"""`GET /metrics`: the tasks, their tokens and the dashboard's own requests, in Prometheus' text format."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import datetime

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy.exc import SQLAlchemyError

from dashboard.readers import DashboardReader
from dashboard.wiring import reader, settings
from db.errors import DatabaseError

router = APIRouter()

OTHER_USERS = "(other)"
NO_USER = "(none)"
UNMATCHED_ROUTE = "(unmatched)"


@dataclass(frozen=True)
class TaskFigures:
    """What one scrape reports of the tasks, read through the dashboard's reader."""

    counts: dict[str, int]
    stale: int
    oldest_running_seconds: float
    tokens_by_user: dict[str, int]


def task_figures(tasks: DashboardReader, zone: str, top_users: int, now: datetime) -> TaskFigures:
    """The figures, with the tokens of all but the `top_users` largest users summed under `(other)`, so
    that the number of label values stays bounded however many users there are."""
    oldest = tasks.oldest_running_start()
    users = tasks.usage(zone, 0).users
    named = ((usage["user"] if usage["user"] is not None else NO_USER, usage["total"]) for usage in users)
    by_user = sorted(named, key=lambda pair: (-pair[1], pair[0]))
    # Added, never set: a real user named like a bucket ("(other)", "(none)") shares it, and no token is lost.
    tokens: dict[str, int] = {}
    for position, (user, total) in enumerate(by_user):
        label = user if position < top_users else OTHER_USERS
        tokens[label] = tokens.get(label, 0) + total
    tokens.setdefault(OTHER_USERS, 0)
    return TaskFigures(
        counts=tasks.counts(),
        stale=tasks.count_stale(),
        oldest_running_seconds=max(0.0, (now - oldest).total_seconds()) if oldest is not None else 0.0,
        tokens_by_user=tokens,
    )


class _Snapshot(Collector):
    """The figures of one scrape as metric families (read once, then rendered)."""

    def __init__(self, figures: TaskFigures | None) -> None:
        self.figures = figures

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("agent_database_up", "1 when the dashboard could read the database at this scrape.")
        up.add_metric([], 0 if self.figures is None else 1)
        yield up
        if self.figures is None:
            return
        tasks = GaugeMetricFamily("agent_tasks", "Tasks in each status.", labels=["status"])
        for status, count in self.figures.counts.items():
            tasks.add_metric([status], count)
        yield tasks
        yield GaugeMetricFamily(
            "agent_tasks_stale", "Running tasks without a sign of life for --stale-minutes.", value=self.figures.stale
        )
        yield GaugeMetricFamily(
            "agent_task_oldest_running_seconds",
            "Seconds since the longest-running task started (0 when none runs).",
            value=self.figures.oldest_running_seconds,
        )
        tokens = GaugeMetricFamily(
            "agent_tokens_total",
            "Tokens of all time, for the top users by tokens and (other) for the rest.",
            labels=["user"],
        )
        for user, total in self.figures.tokens_by_user.items():
            tokens.add_metric([user], total)
        yield tokens


class RequestMetrics:
    """Counts and latency of the dashboard's requests, by route template (a bounded set of label values)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "dashboard_requests",
            "Requests answered, by route, method and status.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "dashboard_request_seconds", "Time to answer a request, by route.", ["route"], registry=self.registry
        )

    async def measure(self, request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        started = time.perf_counter()
        method = request.method  # as asked: HEAD is answered as GET further in
        response = await call_next(request)
        route = getattr(request.scope.get("route"), "path", UNMATCHED_ROUTE)
        self.requests.labels(route, method, str(response.status_code)).inc()
        self.latency.labels(route).observe(time.perf_counter() - started)
        return response


@router.get("/metrics", include_in_schema=False)
def metrics(request: Request) -> Response:
    chosen = settings(request)
    figures: TaskFigures | None = None
    try:
        tasks = reader(request)
        # One quick look first: a database that is down is reported at once, within any scrape timeout,
        # instead of after the retries of each figure.
        if tasks.reachable():
            figures = task_figures(tasks, chosen.zone, chosen.metrics_top_users, chosen.clock())
    except (DatabaseError, SQLAlchemyError):  # reported as a database down, not as a failed scrape
        figures = None
    snapshot = CollectorRegistry()
    snapshot.register(_Snapshot(figures))
    requests: RequestMetrics = request.app.state.request_metrics
    body = generate_latest(snapshot) + generate_latest(requests.registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
