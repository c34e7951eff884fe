"""Start-up of the coding agent's task store: load the configuration, initialise the database, report."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from db import DatabaseConfig, DatabaseConnection, DatabaseError, TaskRepository

logger = logging.getLogger("main")


def initialise_database(config: DatabaseConfig) -> DatabaseConnection:
    """Connect (with the start-up retry) and, in development, create missing tables."""
    connection = DatabaseConnection.initialize(config)
    if os.environ.get("APP_ENV", "development") == "development":
        connection.create_tables()
    return connection


def show_status(connection: DatabaseConnection) -> None:
    counts = TaskRepository(connection).count_by_status()
    print(f"backend:  {connection.config.backend}")
    print(f"database: {connection.config.safe_url}")
    print("tasks:    " + ", ".join(f"{status} {count}" for status, count in counts.items()))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default=None, help="path to config.yaml (default: ./config.yaml if present)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        connection = initialise_database(DatabaseConfig.load(args.config))
        show_status(connection)
    except DatabaseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        DatabaseConnection.reset()
    return 0


if __name__ == "__main__":
    sys.exit(main())
