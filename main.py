"""Coding agent task store: start-up (database initialisation) and operations commands.

Without a command: load config.yaml and the environment, initialise the database, bring the schema up to
date (development) or insist that it is (APP_ENV=production), and print a short status.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeAlias

from tqdm import tqdm

from context_storage.metadata_file import DamagedMetadataError
from context_storage.reconcile import find_discrepancies
from context_storage.task_lock import TaskAlreadyRunningError
from db import DatabaseConfig, DatabaseConnection, DatabaseError, Task, TaskRepository, TaskStatus, TaskUsageQuery
from db.backup import backup_database, restore_database
from db.config import SETTINGS, load_base_dir
from db.connection import describe_driver_error
from db.data_migration import MAX_BATCH, migrate_data
from db.redaction import MASK, redact_secrets
from db.repositories.task_repository import MAX_PAGE, PREVIOUS_STATUSES
from db.repositories.task_usage import MAX_DAYS, time_zone
from db.schema import SchemaState, require_current_schema, schema_state, upgrade_schema
from db.startup import app_environment, prepare_schema
from db.stats import database_stats

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE


def _connect(args: argparse.Namespace, *, wait: bool = True) -> DatabaseConnection:
    config = DatabaseConfig.load(args.config)
    return DatabaseConnection.initialize(config if wait else replace(config, startup_timeout=0))


def _start(args: argparse.Namespace) -> tuple[DatabaseConnection, SchemaState]:
    environment = app_environment()
    connection = _connect(args)
    return connection, prepare_schema(connection, environment)


def _open_for_reading(args: argparse.Namespace, *, wait: bool = True) -> DatabaseConnection:
    """A connection that changes nothing: no schema work, no file created, a SQLite file left as it is."""
    config = DatabaseConfig.load(args.config)
    return DatabaseConnection.initialize(config if wait else replace(config, startup_timeout=0), read_only=True)


def _read(args: argparse.Namespace, *, wait: bool = True) -> DatabaseConnection:
    """A reading connection to a database whose schema is at head; else the command that fixes it."""
    connection = _open_for_reading(args, wait=wait)
    require_current_schema(connection)
    return connection


def cmd_status(args: argparse.Namespace) -> int:
    connection, state = _start(args)
    counts = TaskRepository(connection).count_by_status()
    print(f"environment: {app_environment()}")
    print(f"backend:     {connection.config.backend}")
    print(f"database:    {connection.config.safe_url}")
    print(f"schema:      {state.describe()}")
    print("tasks:       " + ", ".join(f"{status} {count}" for status, count in counts.items()))
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    config = DatabaseConfig.load(args.config)
    rows = []
    for setting in SETTINGS:
        name = setting.field
        value = getattr(config.pool, name.removeprefix("pool_")) if name.startswith("pool_") else getattr(config, name)
        if setting.secret and value:
            # A URL is shown with only its secrets masked; any other secret setting not at all.
            value = config.safe_url if name == "url" else MASK
        rows.append((name, "-" if value is None else str(value), config.sources.get(name, "default")))
    rows.append(("effective url", config.safe_url, "derived"))
    _print_table(("setting", "value", "source"), rows)
    return 0


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    connection = _connect(args)
    result = upgrade_schema(connection)
    if result.backup is not None:
        print(f"backup:  {result.backup}")
    if result.changed:
        print(f"schema upgraded: {result.before.describe()} -> {result.after}")
    else:
        print(f"schema already at head: {result.after}")
    return 0


def _migrate_data_refusal(args: argparse.Namespace) -> str | None:
    if args.overwrite_newer and not args.overwrite:
        return "--overwrite-newer goes with --overwrite"
    if args.overwrite and not (args.yes or args.dry_run):
        return "--overwrite replaces tasks already in the target: see how many with --dry-run, then add --yes"
    return None


def cmd_db_migrate_data(args: argparse.Namespace) -> int:
    refusal = _migrate_data_refusal(args)
    if refusal is not None:
        print(f"error: {refusal}", file=sys.stderr)
        return EXIT_USAGE
    connection = _connect(args)
    with tqdm(
        unit=" rows", unit_scale=True, desc="copying", file=sys.stderr, disable=True if args.quiet else None
    ) as bar:
        report = migrate_data(
            args.source,
            connection,
            overwrite=args.overwrite,
            overwrite_newer=args.overwrite_newer,
            dry_run=args.dry_run,
            batch_size=args.batch_size,
            progress=bar.update,
            leave_behind=args.leave_behind,
        )
    verb = "would copy" if report.dry_run else "copied"
    print(f"source:      {report.source} ({report.source_rows} tasks)")
    print(f"target:      {connection.config.safe_url}")
    print(f"{verb + ':':<12} {report.copied}")
    if args.overwrite:
        label = "would overwrite:" if report.dry_run else "overwritten:"
        print(f"{label:<12} {report.overwritten} (uuid already present)")
        if not args.overwrite_newer:
            print(f"kept newer:  {report.kept_newer} (updated later in the target; --overwrite-newer replaces them)")
    else:
        print(f"skipped:     {report.skipped} (uuid already present)")
    if report.merged:
        print(f"merged:      {report.merged} (identical duplicate rows of the source)")
    if report.renamed:
        print(f"renamed:     {len(report.renamed)} (ids in upper case or not UUIDs; old -> new below)")
        for old, new in sorted(report.renamed.items()):
            print(f"  {printable(old)} -> {new}")
    print(f"time:        {report.seconds:.1f}s ({report.rows_per_second:,.0f} rows/s)")
    if report.differences:
        print("error: verification failed, nothing was written:", file=sys.stderr)
        for difference in report.differences[:20]:
            print(f"  {difference}", file=sys.stderr)
        if report.skipped:
            print("  (tasks already in the target differ from the source: --overwrite replaces them)", file=sys.stderr)
        elif report.kept_newer:
            print("  (tasks kept as newer in the target: --overwrite-newer replaces them)", file=sys.stderr)
        return EXIT_ERROR
    if not report.dry_run:
        print("verified:    row counts and per-column aggregates of source and target are equal")
    return 0


def cmd_db_backup(args: argparse.Namespace) -> int:
    connection = _open_for_reading(args)
    output = backup_database(connection, Path(args.output))
    print(f"backup of {connection.config.safe_url} written to {output} ({output.stat().st_size:,} bytes)")
    return 0


def cmd_db_restore(args: argparse.Namespace) -> int:
    backup = Path(args.backup)
    if not backup.is_file():
        print(f"error: no such backup file: {backup}", file=sys.stderr)
        return EXIT_ERROR
    config = DatabaseConfig.load(args.config)
    if not args.yes:
        print(f"error: restoring replaces the tasks in {config.safe_url}; add --yes to go ahead", file=sys.stderr)
        return EXIT_USAGE
    connection = DatabaseConnection.initialize(config)
    result = restore_database(connection, backup)
    if result.replaced_copy is not None:
        print(f"replaced tasks kept in {result.replaced_copy}")
    print(f"restored {backup} into {config.safe_url}: {result.rows} tasks (schema {result.revision})")
    return 0


def cmd_db_stats(args: argparse.Namespace) -> int:
    connection = _open_for_reading(args)
    stats = database_stats(connection)
    if args.json:
        print(json.dumps(stats, ensure_ascii=False, indent=2, default=str))
    else:
        _print_nested(stats)
    return 0


def _print_nested(value: object, indent: str = "") -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, dict | list):
                print(f"{indent}{key}:")
                _print_nested(item, indent + "  ")
            else:
                print(f"{indent}{key}: {item}")
    elif isinstance(value, list):
        for item in value:
            print(f"{indent}-")
            _print_nested(item, indent + "  ")
    else:
        print(f"{indent}{value}")


def cmd_db_current(args: argparse.Namespace) -> int:
    state = schema_state(_open_for_reading(args))
    print(f"current: {state.describe()}")
    print(f"head:    {state.head}")
    return 0


def cmd_db_check(args: argparse.Namespace) -> int:
    connection = _open_for_reading(args, wait=False)
    state = schema_state(connection)
    print(f"backend:  {connection.config.backend}")
    print(f"database: {connection.config.safe_url}")
    print(f"schema:   {state.describe()} (head {state.head})")
    print(f"settings: {_connection_settings(connection)}")
    if not state.at_head:
        print("error: the schema is not at head; apply migrations with `python main.py db upgrade`", file=sys.stderr)
        return EXIT_ERROR
    return 0


def _connection_settings(connection: DatabaseConnection) -> str:
    if connection.config.backend == "sqlite":
        with connection.engine.connect() as conn:
            journal = conn.exec_driver_sql("PRAGMA journal_mode").scalar()
            busy = conn.exec_driver_sql("PRAGMA busy_timeout").scalar()
        return f"journal_mode={journal} busy_timeout={busy}ms"
    pool = connection.config.pool
    return (
        f"pool_size={pool.size} max_overflow={pool.max_overflow} pool_timeout={pool.timeout}s "
        f"pool_recycle={pool.recycle}s"
    )


def cmd_tasks_list(args: argparse.Namespace) -> int:
    connection = _read(args)
    tasks = TaskRepository(connection).list_tasks(status=args.status, user=args.user, limit=args.limit)
    if args.json:
        print(json.dumps([_shown(task) for task in tasks], ensure_ascii=False, indent=2))
        return 0
    _print_table(
        ("uuid", "status", "task", "user", "created_at", "llm", "tools", "tokens"),
        [
            (
                task.uuid,
                task.status,
                task.reference(),
                task.user or "-",
                f"{task.created_at:%Y-%m-%d %H:%M:%S}",
                str(task.llm_call_count),
                str(task.tool_call_count),
                str(task.total_tokens),
            )
            for task in tasks
        ],
    )
    return 0


def cmd_tasks_show(args: argparse.Namespace) -> int:
    connection = _read(args)
    task = TaskRepository(connection).get_by_uuid(args.uuid)
    if task is None:
        print(f"error: no task {args.uuid}", file=sys.stderr)
        return EXIT_ERROR
    data = _shown(task)
    if args.json:
        print(json.dumps(data, ensure_ascii=False, indent=2))
    else:
        width = max(len(key) for key in data)
        for key, value in data.items():
            print(f"{key:<{width}}  {'-' if value is None else printable(str(value))}")
    return 0


def cmd_tasks_usage(args: argparse.Namespace) -> int:
    connection = _read(args)
    query = TaskUsageQuery(connection)
    usages = query.per_user(zone=args.tz, user=args.user)
    daily = query.daily(days=args.days, zone=args.tz, user=args.user) if args.user is not None else []
    if args.json:
        document: dict[str, object] = {"time_zone": args.tz, "users": [asdict(usage) for usage in usages]}
        if args.user is not None:
            document["daily"] = [{"day": entry.day.isoformat(), "tokens": entry.tokens} for entry in daily]
        print(json.dumps(document, ensure_ascii=False, indent=2))
        return 0
    print(f"tokens by user ({args.tz}; weeks start on Monday)")
    _print_table(
        ("user", "today", "week", "month", "total"),
        [
            (usage.user or "-", *(f"{value:,}" for value in (usage.today, usage.week, usage.month, usage.total)))
            for usage in usages
        ],
    )
    if daily:
        print(f"\n{args.user}: tokens per day, last {args.days} days")
        _print_bars([(f"{entry.day:%Y-%m-%d %a}", entry.tokens) for entry in daily])
    return 0


def cmd_tasks_history(args: argparse.Namespace) -> int:
    connection = _read(args)
    fields = parse_task_reference(args.reference)
    since = datetime.now(UTC) - timedelta(days=args.days) if args.days is not None else None
    statuses = [status.value for status in TaskStatus] if args.all else list(PREVIOUS_STATUSES)
    runs = TaskRepository(connection).find_previous(
        task_source=fields["task_source"],
        owner=fields["owner"],
        repo=fields["repo"],
        task_type=fields["task_type"],
        task_id=fields["task_id"],
        statuses=statuses,
        since=since,
        limit=args.limit,
    )
    if args.json:
        print(json.dumps([task.to_dict() for task in runs], ensure_ascii=False, indent=2))
        return 0
    _print_table(
        ("uuid", "status", "task", "user", "completed_at", "tokens"),
        [
            (
                task.uuid,
                task.status,
                task.reference(),
                task.user or "-",
                f"{task.completed_at:%Y-%m-%d %H:%M:%S}" if task.completed_at else "-",
                f"{task.total_tokens:,}",
            )
            for task in runs
        ],
    )
    return 0


def cmd_tasks_reconcile(args: argparse.Namespace) -> int:
    # A dry run only reads: a read-only connection, which leaves a SQLite file and its directory as they are.
    connection = _connect(args) if args.yes else _open_for_reading(args)
    require_current_schema(connection)
    repository = TaskRepository(connection)
    base_dir = load_base_dir(args.config)
    found = find_discrepancies(base_dir, repository)
    if not found:
        print(f"task directories under {base_dir} and rows agree")
        return 0
    _print_table(
        ("uuid", "problem", "fix" if args.yes else "fix with --yes"),
        [(item.uuid, item.problem, item.fix or "- (look at it by hand)") for item in found],
    )
    if not args.yes:
        return EXIT_ERROR
    fixed = 0
    for item in found:
        if item.apply is None:
            continue
        try:
            item.apply()
            fixed += 1
        except (TaskAlreadyRunningError, DamagedMetadataError, DatabaseError, ValueError, OSError) as exc:
            # One task that cannot be repaired now stops no other.
            print(f"skipped {item.uuid}: {printable(str(exc))}", file=sys.stderr)
    print(f"fixed {fixed} of {len(found)}")
    return 0 if fixed == len(found) else EXIT_ERROR


def parse_task_reference(reference: str) -> dict[str, str | None]:
    """`OWNER/REPO#N` (GitHub issue or pull request), `PROJECT!IID` (GitLab merge request) or
    `gitlab:PROJECT#IID` (GitLab issue) as task fields."""
    text = reference.strip()
    gitlab = text.startswith("gitlab:")
    text = text.removeprefix("gitlab:").removeprefix("github:")
    for separator, kind in (("!", "merge_request"), ("#", "issue")):
        project, found, number = text.rpartition(separator)
        if found and project and number.isascii() and number.isdigit():
            if separator == "!" or gitlab:
                return {"task_source": "gitlab", "owner": "", "repo": project, "task_type": kind, "task_id": number}
            owner, slash, repo = project.partition("/")
            if slash and owner and repo and "/" not in repo:
                return {"task_source": "github", "owner": owner, "repo": repo, "task_type": None, "task_id": number}
    raise ValueError(
        f"cannot read {reference!r} as a task: use OWNER/REPO#NUMBER (GitHub), PROJECT!IID (GitLab merge request) "
        "or gitlab:PROJECT#IID (GitLab issue)"
    )


def _print_bars(rows: Sequence[tuple[str, int]], width: int = 40) -> None:
    largest = max((value for _, value in rows), default=0)
    for label, value in rows:
        eighths = round(value / largest * width * 8) if largest else 0
        bar = "█" * (eighths // 8) + ("", "▏", "▎", "▍", "▌", "▋", "▊", "▉")[eighths % 8]
        print(f"{label}  {bar:<{width}}  {value:,}")


def _shown(task: Task) -> dict[str, Any]:
    """The task's fields as they may be shown: any secret in its stored error masked, as the dashboard does."""
    data = task.to_dict()
    if data.get("error_message"):
        data["error_message"] = redact_secrets(data["error_message"])
    return data


def printable(text: str) -> str:
    """`text` with control and format characters (terminal escapes, bidi overrides) shown as escapes."""
    if text.isprintable():
        return text
    return "".join(
        character if character.isprintable() else character.encode("unicode_escape", "backslashreplace").decode()
        for character in text
    )


def _print_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    shown = [[printable(cell) for cell in row] for row in rows]
    widths = [max([len(header), *(len(row[index]) for row in shown)]) for index, header in enumerate(headers)]
    for row in (headers, *shown):
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def _integer_in(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: an integer in low..high."""

    def parse(text: str) -> int:
        value = int(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be in {low}..{high}")
        return value

    return parse


_days = _integer_in(1, MAX_DAYS)
_positive_limit = _integer_in(1, MAX_PAGE)


def _network(text: str) -> str:
    try:
        ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an IP address or network: {text!r}") from None
    return text


def _zone_name(text: str) -> str:
    try:
        time_zone(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


_port = _integer_in(0, 65535)


Handler = Callable[[argparse.Namespace], int]
SubParsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


class _CommandTree:
    """Groups (`db`, `tasks`, ...) of commands, remembered for the overview at the end of --help."""

    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser
        self.groups = parser.add_subparsers(title="commands", metavar="COMMAND")
        self.listed: list[tuple[str, str]] = []

    def group(self, name: str, help_text: str) -> SubParsers:
        sub = self.groups.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(handler=lambda _args: _usage(sub))
        return sub.add_subparsers(title="commands", metavar="COMMAND")

    def command(self, group: SubParsers, name: str, handler: Handler, help_text: str) -> argparse.ArgumentParser:
        sub = group.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(handler=handler)
        self.listed.append((sub.prog.removeprefix("main.py "), help_text))
        return sub

    def overview(self) -> str:
        width = max(len(name) for name, _ in self.listed)
        lines = (f"  {name:<{width}}  {help_text}" for name, help_text in self.listed)
        return "every command (each has --help):\n" + "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="main.py", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--config", default=None, help="config.yaml to read (default: ./config.yaml if present)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    parser.set_defaults(handler=cmd_status)
    tree = _CommandTree(parser)
    config = tree.group("config", "inspect the configuration")
    tree.command(config, "show", cmd_config_show, "every effective database setting and where it came from")
    _add_db_commands(tree)
    _add_tasks_commands(tree)
    _add_serve_command(tree)
    parser.epilog = tree.overview()
    return parser


def _add_db_commands(tree: _CommandTree) -> None:
    database = tree.group("db", "schema and database operations")
    tree.command(database, "upgrade", cmd_db_upgrade, "apply migrations up to head (a SQLite file is backed up first)")
    tree.command(database, "current", cmd_db_current, "print the schema revision and the head revision")
    migrate = tree.command(
        database,
        "migrate-data",
        cmd_db_migrate_data,
        "copy every task of a SQLite tasks.db (old or new layout) into the configured database, then verify",
    )
    migrate.add_argument("--from", dest="source", required=True, metavar="SQLITE_PATH_OR_URL")
    migrate.add_argument("--dry-run", action="store_true", help="read and check everything, report, write nothing")
    migrate.add_argument(
        "--overwrite",
        action="store_true",
        help="replace tasks whose uuid is already present, unless updated later in the target (needs --yes)",
    )
    migrate.add_argument(
        "--overwrite-newer", action="store_true", help="with --overwrite: replace tasks updated later too"
    )
    migrate.add_argument("--yes", action="store_true", help="confirm --overwrite")
    migrate.add_argument(
        "--leave-behind",
        action="append",
        default=[],
        metavar="COLUMN",
        help="a column of the source the target does not keep, whose data is not copied (repeat for more)",
    )
    migrate.add_argument(
        "--batch-size", type=_integer_in(1, MAX_BATCH), default=10_000, help=f"rows per batch (1..{MAX_BATCH:,})"
    )
    migrate.add_argument("--quiet", action="store_true", help="no progress bar")
    backup = tree.command(database, "backup", cmd_db_backup, "write a backup: pg_dump custom format, or a SQLite copy")
    backup.add_argument("--output", required=True, metavar="FILE", help="new file to write")
    restore = tree.command(database, "restore", cmd_db_restore, "replace the database's tables by a backup's")
    restore.add_argument("backup", metavar="FILE")
    restore.add_argument("--yes", action="store_true", help="confirm that the current tasks are replaced")
    stats = tree.command(database, "stats", cmd_db_stats, "connections, transactions, deadlocks, query times, sizes")
    stats.add_argument("--json", action="store_true", help="print JSON")
    tree.command(
        database,
        "check",
        cmd_db_check,
        "exit 0 only when the database answers and its schema is at head (for health checks)",
    )


def _add_tasks_commands(tree: _CommandTree) -> None:
    tasks = tree.group("tasks", "read the tasks table")
    listing = tree.command(tasks, "list", cmd_tasks_list, "list tasks, newest first")
    listing.add_argument("--status", help="running, completed, failed or stopped")
    listing.add_argument("--user", help="only this user's tasks")
    listing.add_argument("--limit", type=_positive_limit, default=50, help="at most this many (1..1000, default 50)")
    listing.add_argument("--json", action="store_true", help="print JSON")
    show = tree.command(tasks, "show", cmd_tasks_show, "show one task")
    show.add_argument("uuid")
    show.add_argument("--json", action="store_true", help="print JSON")
    usage = tree.command(tasks, "usage", cmd_tasks_usage, "tokens per user: today, this week, this month, all time")
    usage.add_argument("--user", help="only this user, with a per-day chart")
    usage.add_argument("--days", type=_days, default=14, help="days in the per-day chart (default 14)")
    usage.add_argument(
        "--tz", type=_zone_name, default="UTC", help="time zone of the calendar days, e.g. Asia/Tokyo (default UTC)"
    )
    usage.add_argument("--json", action="store_true", help="print JSON")
    history = tree.command(tasks, "history", cmd_tasks_history, "earlier runs of an issue or merge request")
    history.add_argument("reference", help="OWNER/REPO#NUMBER, PROJECT!IID or gitlab:PROJECT#IID")
    history.add_argument("--days", type=_days, default=None, help="only runs completed in the last N days")
    history.add_argument("--all", action="store_true", help="every status, not only completed and stopped runs")
    history.add_argument("--limit", type=_positive_limit, default=20, help="at most this many (default 20)")
    history.add_argument("--json", action="store_true", help="print JSON")
    reconcile = tree.command(
        tasks,
        "reconcile",
        cmd_tasks_reconcile,
        "compare task directories with their rows after crashes and outages; --yes puts them in step",
    )
    reconcile.add_argument("--yes", action="store_true", help="make the fixes listed")


def cmd_serve(args: argparse.Namespace) -> int:
    # FastAPI and uvicorn are loaded for this command only: the agent itself starts without them.
    from dashboard import Access, DashboardSettings, DatabaseSource  # noqa: PLC0415
    from dashboard.server import bind, serve, url_of  # noqa: PLC0415

    access = Access.for_bind(args.host, os.environ)
    settings = DashboardSettings(
        zone=args.tz,
        refresh_seconds=args.refresh,
        sums_max_age=args.usage_cache,
        trusted_proxies=tuple(args.trusted_proxy),
    )
    config = DatabaseConfig.load(args.config)
    on_sqlite_file = config.backend == "sqlite" and not config.is_sqlite_memory
    sqlite_file = Path(config.sqlalchemy_url.database or "") if on_sqlite_file else None
    source = DatabaseSource(lambda: _read(args, wait=False), empty_until_created=sqlite_file)
    sock = bind(args.host, args.port)
    with contextlib.suppress(DatabaseError):
        # Opened now to report a problem at once (the source logs it); the pages show it until it is fixed.
        source.connection()
    rule = "token required" if access.required else "no token: this machine only"
    print(f"dashboard on {url_of(sock)} ({rule}); Ctrl-C stops it", flush=True)
    serve(sock, source, access, settings, header_seconds=args.header_timeout)
    return 0


def _add_serve_command(tree: _CommandTree) -> None:
    server = tree.groups.add_parser(
        "serve",
        help="read-only web dashboard and JSON API over the tasks table",
        description="Read-only web dashboard and JSON API over the tasks table. Off loopback, DASHBOARD_TOKEN "
        "must be set; requests then carry it (Authorization: Bearer, or the sign-in page).",
    )
    server.set_defaults(handler=cmd_serve)
    tree.listed.append(("serve", "read-only web dashboard and JSON API over the tasks table"))
    server.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    server.add_argument("--port", type=_port, default=8080, help="port to listen on, 0 for any free one (default 8080)")
    server.add_argument(
        "--tz", type=_zone_name, default="UTC", help="time zone of the pages, e.g. Asia/Tokyo (default UTC)"
    )
    server.add_argument(
        "--header-timeout",
        type=_integer_in(1, 30),
        default=10,
        metavar="SECONDS",
        help="a connection whose request headers are not complete this long after they start is closed (default 10)",
    )
    server.add_argument(
        "--trusted-proxy",
        type=_network,
        action="append",
        default=[],
        metavar="ADDRESS",
        help="a reverse proxy (address or network) whose X-Forwarded-Proto and -For are believed; repeatable",
    )
    server.add_argument(
        "--refresh", type=_integer_in(1, 3600), default=15, help="seconds between overview refreshes (default 15)"
    )
    server.add_argument(
        "--usage-cache",
        type=_integer_in(0, 3600),
        default=30,
        metavar="SECONDS",
        help="token sums over every task are computed at most this often, in the background (default 30; 0: "
        "at every request)",
    )


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return EXIT_USAGE


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except BrokenPipeError:
        # The reader went away (`... | head`): stop quietly, as other Unix tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except (DatabaseError, ValueError, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as exc:
        # Driver errors met outside the repository (schema inspection, say): one line, no SQL parameters.
        if args.verbose:
            raise
        print(f"error: {describe_driver_error(exc)}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        DatabaseConnection.reset()


if __name__ == "__main__":
    sys.exit(main())
