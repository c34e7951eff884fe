"""`serve`: the read-only web dashboard and JSON API."""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from cli.arguments import integer_in, network, port, stale_minutes, zone_name
from cli.connect import read_only_at_head
from cli.tree import CommandTree
from db import DatabaseConfig, DatabaseConfigError, DatabaseError

if TYPE_CHECKING:
    from dashboard import DatabaseSource

# Where the dashboard reads, when not from the agents' database.
DASHBOARD_URL_VARIABLE = "DASHBOARD_DATABASE_URL"
DASHBOARD_DRIVERS = ("sqlite", "sqlite+pysqlite", "postgresql+psycopg2")


def cmd_serve(args: argparse.Namespace) -> int:
    # FastAPI and uvicorn are loaded for this command only: the agent itself starts without them.
    from dashboard import Access, DashboardSettings  # noqa: PLC0415
    from dashboard.server import bind, serve, url_of  # noqa: PLC0415

    access = Access.for_bind(args.host, os.environ)
    settings = DashboardSettings(
        zone=args.tz,
        refresh_seconds=args.refresh,
        sums_max_age=args.usage_cache,
        trusted_proxies=tuple(args.trusted_proxy),
        stale_after=timedelta(minutes=args.stale_minutes),
        metrics_top_users=args.metrics_top_users,
    )
    source = dashboard_source(args.config, os.environ)
    sock = bind(args.host, args.port)
    with contextlib.suppress(DatabaseError):
        # Opened now to report a problem at once (the source logs it); the pages show it until it is fixed.
        source.connection()
    rule = "token required" if access.required else "no token: this machine only"
    print(f"dashboard on {url_of(sock)} ({rule}); Ctrl-C stops it", flush=True)
    serve(sock, source, access, settings, header_seconds=args.header_timeout)
    return 0


def dashboard_source(config_file: str | None, env: Mapping[str, str]) -> DatabaseSource:
    """Where the dashboard reads, read-only: `DASHBOARD_DATABASE_URL` when set (a standby, say, to keep the
    pages' reads off the primary), else the agents' database."""
    from dashboard import DatabaseSource  # noqa: PLC0415

    url = env.get(DASHBOARD_URL_VARIABLE, "").strip()
    try:
        config = DatabaseConfig.load(config_file, {**env, "DATABASE_URL": url} if url else env)
    except DatabaseConfigError as exc:
        if not url:
            raise
        raise DatabaseConfigError(f"{DASHBOARD_URL_VARIABLE} (read as DATABASE_URL): {exc}") from None
    if config.sqlalchemy_url.drivername not in DASHBOARD_DRIVERS:
        where = DASHBOARD_URL_VARIABLE if url else "DATABASE_URL"
        raise DatabaseConfigError(
            f"{where}: the dashboard reads SQLite or PostgreSQL (psycopg2), not {config.sqlalchemy_url.drivername!r}"
        )
    on_sqlite_file = config.backend == "sqlite" and not config.is_sqlite_memory
    sqlite_file = Path(config.sqlalchemy_url.database or "") if on_sqlite_file else None

    return DatabaseSource(lambda: read_only_at_head(config, wait=False), empty_until_created=sqlite_file)


def register(tree: CommandTree) -> None:
    server = tree.groups.add_parser(
        "serve",
        help="read-only web dashboard and JSON API over the tasks table",
        description="Read-only web dashboard and JSON API over the tasks table. Off loopback, DASHBOARD_TOKEN "
        "must be set; requests then carry it (Authorization: Bearer, or the sign-in page).",
    )
    server.set_defaults(handler=cmd_serve)
    tree.listed.append(("serve", "read-only web dashboard and JSON API over the tasks table"))
    server.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    server.add_argument("--port", type=port, default=8080, help="port to listen on, 0 for any free one (default 8080)")
    server.add_argument(
        "--tz", type=zone_name, default="UTC", help="time zone of the pages, e.g. Asia/Tokyo (default UTC)"
    )
    server.add_argument(
        "--header-timeout",
        type=integer_in(1, 30),
        default=10,
        metavar="SECONDS",
        help="a connection whose request headers are not complete this long after they start is closed (default 10)",
    )
    server.add_argument(
        "--trusted-proxy",
        type=network,
        action="append",
        default=[],
        metavar="ADDRESS",
        help="a reverse proxy (address or network) whose X-Forwarded-Proto and -For are believed; repeatable",
    )
    server.add_argument(
        "--refresh", type=integer_in(1, 3600), default=15, help="seconds between overview refreshes (default 15)"
    )
    server.add_argument(
        "--metrics-top-users",
        type=integer_in(1, 1000),
        default=10,
        metavar="N",
        help="users named in /metrics' token figures; the others are summed as (other) (default 10)",
    )
    server.add_argument(
        "--stale-minutes",
        type=stale_minutes,
        default=10,
        metavar="MINUTES",
        help="a running task with no sign of life from its agent this long is shown as stale (default 10)",
    )
    server.add_argument(
        "--usage-cache",
        type=integer_in(0, 3600),
        default=30,
        metavar="SECONDS",
        help="token sums over every task are computed at most this often, in the background (default 30; 0: "
        "at every request)",
    )
