"""`tasks ...`: reading the tasks table, earlier runs, usage, and reconciling task folders."""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from pathlib import Path

from tqdm import tqdm

from cli.arguments import batch_size, days, positive_limit, stale_minutes, zone_name
from cli.connect import open_read_only, open_read_only_at_head, open_read_write
from cli.output import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_USAGE, print_bars, print_table, printable, shown
from cli.tree import CommandTree
from context_storage.metadata_file import DamagedMetadataError
from context_storage.reconcile import find_discrepancies
from context_storage.task_lock import TaskAlreadyRunningError
from db import DatabaseError, TaskLiveness, TaskRepository, TaskRetention, TaskStatus, TaskUsageQuery
from db.config import load_base_dir, load_inheritance_days
from db.repositories.task_repository import PREVIOUS_STATUSES
from db.schema import require_current_schema
from ops.prune import SQLITE_YIELD, PrunePlan, plan_prune, prune
from ops.usage_export import usage_csv


def cmd_tasks_list(args: argparse.Namespace) -> int:
    connection = open_read_only_at_head(args)
    tasks = TaskRepository(connection).list_tasks(status=args.status, user=args.user, limit=args.limit)
    if args.json:
        print(json.dumps([shown(task) for task in tasks], ensure_ascii=False, indent=2))
        return 0
    print_table(
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
    connection = open_read_only_at_head(args)
    task = TaskRepository(connection).get_by_uuid(args.uuid)
    if task is None:
        print(f"error: no task {args.uuid}", file=sys.stderr)
        return EXIT_ERROR
    data = shown(task)
    if args.json:
        print(json.dumps(data, ensure_ascii=False, indent=2))
    else:
        width = max(len(key) for key in data)
        for key, value in data.items():
            print(f"{key:<{width}}  {'-' if value is None else printable(str(value))}")
    return 0


def cmd_tasks_usage(args: argparse.Namespace) -> int:
    connection = open_read_only_at_head(args)
    query = TaskUsageQuery(connection)
    if args.csv:
        sys.stdout.write(usage_csv(query.daily_by_user(days=args.days, zone=args.tz, user=args.user)))
        return 0
    usages = query.per_user(zone=args.tz, user=args.user)
    daily = query.daily(days=args.days, zone=args.tz, user=args.user) if args.user is not None else []
    if args.json:
        document: dict[str, object] = {"time_zone": args.tz, "users": [asdict(usage) for usage in usages]}
        if args.user is not None:
            document["daily"] = [{"day": entry.day.isoformat(), "tokens": entry.tokens} for entry in daily]
        print(json.dumps(document, ensure_ascii=False, indent=2))
        return 0
    print(f"tokens by user ({args.tz}; weeks start on Monday)")
    print_table(
        ("user", "today", "week", "month", "total"),
        [
            (usage.user or "-", *(f"{value:,}" for value in (usage.today, usage.week, usage.month, usage.total)))
            for usage in usages
        ],
    )
    if daily:
        print(f"\n{args.user}: tokens per day, last {args.days} days")
        print_bars([(f"{entry.day:%Y-%m-%d %a}", entry.tokens) for entry in daily])
    return 0


def cmd_tasks_history(args: argparse.Namespace) -> int:
    connection = open_read_only_at_head(args)
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
    print_table(
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
    connection = open_read_write(args) if args.yes else open_read_only(args)
    require_current_schema(connection)
    repository = TaskRepository(connection)
    base_dir = load_base_dir(args.config)
    found = find_discrepancies(base_dir, repository)
    if not found:
        print(f"task directories under {base_dir} and rows agree")
        return 0
    print_table(
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


def cmd_tasks_stale(args: argparse.Namespace) -> int:
    if args.yes and not args.fail:
        print("error: --yes confirms --fail: add --fail to mark the tasks listed failed", file=sys.stderr)
        return EXIT_USAGE
    # Listing only reads: a read-only connection. Failing them needs --fail and --yes.
    fail = args.fail and args.yes
    connection = open_read_write(args) if fail else open_read_only(args)
    require_current_schema(connection)
    liveness = TaskLiveness(connection)
    silent = timedelta(minutes=args.minutes)
    now = datetime.now(UTC)
    found = liveness.stale(silent, now=now)
    if not found:
        print(f"no running task has been silent for {args.minutes} minutes")
        return 0
    print_table(
        ("uuid", "task", "host", "last sign of life", "silent for"),
        [
            (
                item.task.uuid,
                item.task.reference(),
                printable(item.hostname or "-"),
                f"{item.last_sign:%Y-%m-%d %H:%M:%S} UTC",
                _duration(now - item.last_sign),
            )
            for item in found
        ],
    )
    if not fail:
        if args.fail:
            print(f"{len(found)} would be marked failed: add --yes to do it")
        return EXIT_ERROR
    failed = sum(liveness.fail_stale(item.task.uuid, silent, now=now) for item in found)
    print(f"marked {failed} of {len(found)} failed (the others gave a sign of life or finished meanwhile)")
    return 0


def cmd_tasks_prune(args: argparse.Namespace) -> int:
    inheritance = load_inheritance_days(args.config)
    if args.older_than < inheritance and not args.ignore_inheritance:
        print(
            f"error: --older-than {args.older_than} is shorter than context_inheritance.context_expiry_days "
            f"({inheritance:g}): new runs may still inherit from the runs it would remove; add "
            "--ignore-inheritance to remove them all the same",
            file=sys.stderr,
        )
        return EXIT_USAGE
    # A dry run only reads: a read-only connection, no lock taken, no file or directory made.
    connection = open_read_write(args) if args.yes else open_read_only(args)
    require_current_schema(connection)
    base_dir = load_base_dir(args.config)
    retention = TaskRetention(connection)
    cutoff = datetime.now(UTC) - timedelta(days=args.older_than)
    if not args.yes:
        return _print_plan(plan_prune(base_dir, retention, cutoff), cutoff, base_dir)
    with tqdm(
        total=retention.summary(cutoff).tasks, unit="task", file=sys.stderr, disable=not sys.stderr.isatty()
    ) as bar:
        try:
            result = prune(
                base_dir,
                retention,
                TaskRepository(connection),
                cutoff,
                batch_size=args.batch_size,
                progress=bar.update,
                yield_to_writers=SQLITE_YIELD if connection.config.backend == "sqlite" else 0.0,
            )
        except KeyboardInterrupt:
            print(
                "interrupted: each batch pruned stays pruned, with its tokens in the usage; run the command again "
                "to go on",
                file=sys.stderr,
            )
            return EXIT_INTERRUPTED
    if result.leftovers_removed:
        print(f"finished an interrupted prune: {result.leftovers_removed} directories removed")
    print(
        f"pruned {result.tasks} tasks finished before {cutoff:%Y-%m-%d %H:%M} UTC and {result.directories} "
        f"directories ({_size(result.bytes)}); token usage is unchanged"
    )
    if result.skipped:
        print(f"kept {len(result.skipped)}:")
        _print_kept(result.skipped)
        return EXIT_ERROR
    return 0


def _print_plan(plan: PrunePlan, cutoff: datetime, base_dir: Path) -> int:
    summary = plan.summary
    statuses = ", ".join(f"{count} {status}" for status, count in sorted(summary.by_status.items()))
    kept = len(plan.held_back)
    print(
        f"would prune {summary.tasks - kept} of the {summary.tasks} tasks finished before {cutoff:%Y-%m-%d %H:%M} UTC"
        + (f" ({statuses})" if statuses else "")
    )
    if summary.first_completed is not None and summary.last_completed is not None:
        print(f"finished between {summary.first_completed:%Y-%m-%d} and {summary.last_completed:%Y-%m-%d}")
    print(f"would remove {plan.directories} directories under {base_dir / 'completed'}: {_size(plan.bytes)}")
    print(f"their {summary.tokens:,} tokens stay in the usage, by user and day")
    if plan.leftovers:
        print(f"{plan.leftovers} directories left by an interrupted prune are finished by the next prune --yes")
    if plan.first:
        more = summary.tasks - kept - len(plan.first)
        print(f"\nthe first {len(plan.first)}" + (f" (and {more} more)" if more > 0 else "") + ":")
        print_table(
            ("uuid", "status", "completed_at", "tokens"),
            [
                (task.uuid, task.status, f"{task.completed_at:%Y-%m-%d %H:%M:%S}", f"{task.total_tokens:,}")
                for task in plan.first
            ],
        )
    if plan.held_back:
        print(f"\nwould keep {kept}:")
        _print_kept(plan.held_back)
    print("\nadd --yes to prune them")
    return 0


def _print_kept(kept: list[tuple[str, str]], shown: int = 50) -> None:
    print_table(("uuid", "why"), [(uuid, printable(why)) for uuid, why in kept[:shown]])
    if len(kept) > shown:
        print(f"... and {len(kept) - shown} more")


def _size(count: int) -> str:
    if count < 1024:
        return f"{count:,} bytes"
    exponent = min(int(math.log(count, 1024)), 4)
    return f"{count / 1024**exponent:,.1f} {('KiB', 'MiB', 'GiB', 'TiB')[exponent - 1]}"


def _duration(span: timedelta) -> str:
    minutes = int(span.total_seconds() // 60)
    days, minutes = divmod(minutes, 24 * 60)
    hours, minutes = divmod(minutes, 60)
    return f"{days}d {hours}h {minutes}m" if days else f"{hours}h {minutes}m"


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


def register(tree: CommandTree) -> None:
    tasks = tree.group("tasks", "read the tasks table")
    listing = tree.command(tasks, "list", cmd_tasks_list, "list tasks, newest first")
    listing.add_argument("--status", help="running, completed, failed or stopped")
    listing.add_argument("--user", help="only this user's tasks")
    listing.add_argument("--limit", type=positive_limit, default=50, help="at most this many (1..1000, default 50)")
    listing.add_argument("--json", action="store_true", help="print JSON")
    show = tree.command(tasks, "show", cmd_tasks_show, "show one task")
    show.add_argument("uuid")
    show.add_argument("--json", action="store_true", help="print JSON")
    usage = tree.command(tasks, "usage", cmd_tasks_usage, "tokens per user: today, this week, this month, all time")
    usage.add_argument("--user", help="only this user, with a per-day chart")
    usage.add_argument("--days", type=days, default=14, help="days in the per-day chart (default 14)")
    usage.add_argument(
        "--tz", type=zone_name, default="UTC", help="time zone of the calendar days, e.g. Asia/Tokyo (default UTC)"
    )
    output = usage.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print JSON")
    output.add_argument(
        "--csv", action="store_true", help="print CSV, a row per user and day of the last --days days: user,day,tokens"
    )
    history = tree.command(tasks, "history", cmd_tasks_history, "earlier runs of an issue or merge request")
    history.add_argument("reference", help="OWNER/REPO#NUMBER, PROJECT!IID or gitlab:PROJECT#IID")
    history.add_argument("--days", type=days, default=None, help="only runs completed in the last N days")
    history.add_argument("--all", action="store_true", help="every status, not only completed and stopped runs")
    history.add_argument("--limit", type=positive_limit, default=20, help="at most this many (default 20)")
    history.add_argument("--json", action="store_true", help="print JSON")
    reconcile = tree.command(
        tasks,
        "reconcile",
        cmd_tasks_reconcile,
        "compare task directories with their rows after crashes and outages; --yes puts them in step",
    )
    reconcile.add_argument("--yes", action="store_true", help="make the fixes listed")
    stale = tree.command(
        tasks, "stale", cmd_tasks_stale, "running tasks whose agent went silent; --fail --yes marks them failed"
    )
    stale.add_argument(
        "--minutes", type=stale_minutes, required=True, help="silent for at least this many minutes (1..525600)"
    )
    stale.add_argument("--fail", action="store_true", help="mark them failed, naming their host and last sign")
    stale.add_argument("--yes", action="store_true", help="with --fail: do it")
    pruning = tree.command(
        tasks,
        "prune",
        cmd_tasks_prune,
        "finished tasks older than N days and their directories; a dry run unless --yes; usage stays the same",
    )
    pruning.add_argument(
        "--older-than", type=days, required=True, metavar="DAYS", help="finished (completed_at) at least DAYS days ago"
    )
    pruning.add_argument("--yes", action="store_true", help="prune them")
    pruning.add_argument(
        "--ignore-inheritance",
        action="store_true",
        help="allow DAYS shorter than context_inheritance.context_expiry_days",
    )
    pruning.add_argument(
        "--batch-size", type=batch_size, default=200, help="tasks per transaction (1..1000, default 200)"
    )
