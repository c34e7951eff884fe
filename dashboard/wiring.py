"""What every route receives from the app: its settings, a reader over the database, the time zone asked for."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Annotated, Any, cast

from fastapi import Depends, Query, Request

from dashboard.access import Access
from dashboard.readers import DashboardReader
from dashboard.refreshing import RefreshingValues
from dashboard.source import DatabaseSource
from db.models import utcnow
from db.repositories.task_usage import time_zone

MAX_SUMS_AGE = 3600
MAX_METRICS_USERS = 1000


@dataclass(frozen=True)
class DashboardSettings:
    """`zone`: the time zone of pages and of API answers that do not name one. `sums_max_age`: seconds for
    which sums over the whole table are reused (0: computed at every request). `clock`: "now" (tests fix it).
    `trusted_proxies`: addresses or networks of reverse proxies whose X-Forwarded-Proto and X-Forwarded-For
    are believed (the scheme decides whether the sign-in cookie is Secure; the client, whose attempts count).
    `stale_after`: a running task with no sign of life for this long is shown as stale. `metrics_top_users`:
    users named in /metrics' token figures, the rest summed as one."""

    zone: str = "UTC"
    refresh_seconds: int = 15
    sums_max_age: float = 0.0
    clock: Callable[[], datetime] = field(default=utcnow)
    trusted_proxies: tuple[str, ...] = ()
    stale_after: timedelta = timedelta(minutes=10)
    metrics_top_users: int = 10

    def __post_init__(self) -> None:
        time_zone(self.zone)
        for proxy in self.trusted_proxies:
            ipaddress.ip_network(proxy, strict=False)  # ValueError naming it
        if self.refresh_seconds < 1:
            raise ValueError(f"refresh_seconds must be at least 1, got {self.refresh_seconds}")
        if not 1 <= self.metrics_top_users <= MAX_METRICS_USERS:
            raise ValueError(f"metrics_top_users must be 1..{MAX_METRICS_USERS}, got {self.metrics_top_users}")
        if self.stale_after <= timedelta(0):
            raise ValueError(f"stale_after must be positive, got {self.stale_after}")
        if not 0 <= self.sums_max_age <= MAX_SUMS_AGE:
            raise ValueError(f"sums_max_age must be 0..{MAX_SUMS_AGE} seconds, got {self.sums_max_age}")


def settings(request: Request) -> DashboardSettings:
    return cast(DashboardSettings, request.app.state.settings)


def access(request: Request) -> Access:
    return cast(Access, request.app.state.access)


def reader(request: Request) -> DashboardReader:
    source = cast(DatabaseSource, request.app.state.source)
    sums = cast(RefreshingValues[Any], request.app.state.sums)
    chosen = settings(request)
    return DashboardReader(source.connection(), chosen.clock, sums, chosen.stale_after)


def _zone(
    request: Request,
    tz: Annotated[
        str | None, Query(max_length=64, description="IANA time zone, e.g. Asia/Tokyo; the dashboard's by default.")
    ] = None,
) -> str:
    zone = tz or settings(request).zone
    time_zone(zone)
    return zone


Zone = Annotated[str, Depends(_zone)]
