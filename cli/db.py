"""`db ...`: schema and database operations."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tqdm import tqdm

from cli.arguments import integer_in
from cli.connect import open_read_only, open_read_write
from cli.output import EXIT_ERROR, EXIT_USAGE, print_nested, printable
from cli.tree import CommandTree
from db import DatabaseConfig, DatabaseConnection
from db.schema import schema_state, upgrade_schema
from ops.backup import backup_database, restore_database
from ops.migrate_data import MAX_BATCH, MigrationReport, migrate_data
from ops.stats import database_stats


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    connection = open_read_write(args)
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
    connection = open_read_write(args)
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
    _print_counts(report, args, connection.config.safe_url)
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


def _print_counts(report: MigrationReport, args: argparse.Namespace, target: str) -> None:
    verb = "would copy" if report.dry_run else "copied"
    print(f"source:      {report.source} ({report.source_rows} tasks)")
    print(f"target:      {target}")
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
    if report.usage_buckets:
        print(f"{'usage:':<12} {report.usage_buckets} buckets of pruned tasks' tokens (by user and quarter hour)")
    if report.renamed:
        print(f"renamed:     {len(report.renamed)} (ids in upper case or not UUIDs; old -> new below)")
        for old, new in sorted(report.renamed.items()):
            print(f"  {printable(old)} -> {new}")


def cmd_db_backup(args: argparse.Namespace) -> int:
    connection = open_read_only(args)
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
    connection = open_read_only(args)
    stats = database_stats(connection)
    if args.json:
        print(json.dumps(stats, ensure_ascii=False, indent=2, default=str))
    else:
        print_nested(stats)
    return 0


def cmd_db_current(args: argparse.Namespace) -> int:
    state = schema_state(open_read_only(args))
    print(f"current: {state.describe()}")
    print(f"head:    {state.head}")
    return 0


def cmd_db_check(args: argparse.Namespace) -> int:
    connection = open_read_only(args, wait=False)
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


def register(tree: CommandTree) -> None:
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
        "--batch-size", type=integer_in(1, MAX_BATCH), default=10_000, help=f"rows per batch (1..{MAX_BATCH:,})"
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
