"""`python main.py` without a command: start-up and status; `config show`."""

from __future__ import annotations

import argparse

from cli.connect import start_at_schema
from cli.output import print_table
from db import DatabaseConfig, TaskRepository
from db.config import SETTINGS
from db.redaction import MASK
from db.startup import app_environment


def cmd_status(args: argparse.Namespace) -> int:
    connection, state = start_at_schema(args)
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
    print_table(("setting", "value", "source"), rows)
    return 0
