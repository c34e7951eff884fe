"""Connections as the commands need them, each named for what it guarantees."""

from __future__ import annotations

import argparse
from dataclasses import replace

from db import DatabaseConfig, DatabaseConnection
from db.schema import SchemaState, require_current_schema
from db.startup import app_environment, prepare_schema


def open_read_write(args: argparse.Namespace, *, wait: bool = True) -> DatabaseConnection:
    config = DatabaseConfig.load(args.config)
    return DatabaseConnection.initialize(config if wait else replace(config, startup_timeout=0))


def start_at_schema(args: argparse.Namespace) -> tuple[DatabaseConnection, SchemaState]:
    environment = app_environment()
    connection = open_read_write(args)
    return connection, prepare_schema(connection, environment)


def open_read_only(args: argparse.Namespace, *, wait: bool = True) -> DatabaseConnection:
    """A connection that changes nothing: no schema work, no file created, a SQLite file left as it is."""
    config = DatabaseConfig.load(args.config)
    return DatabaseConnection.initialize(config if wait else replace(config, startup_timeout=0), read_only=True)


def open_read_only_at_head(args: argparse.Namespace, *, wait: bool = True) -> DatabaseConnection:
    """A reading connection to a database whose schema is at head; else the command that fixes it."""
    return read_only_at_head(DatabaseConfig.load(args.config), wait=wait)


def read_only_at_head(config: DatabaseConfig, *, wait: bool = True) -> DatabaseConnection:
    """`open_read_only_at_head` for a configuration already loaded."""
    connection = DatabaseConnection.initialize(config if wait else replace(config, startup_timeout=0), read_only=True)
    require_current_schema(connection)
    return connection
