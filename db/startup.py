"""Start-up: configuration -> connection -> schema, the same for main.py and for library callers."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import fields
from typing import Any

from sqlalchemy.exc import SQLAlchemyError
from tenacity import Retrying, retry_if_exception

from db.config import DatabaseConfig
from db.connection import DatabaseConnection, describe_driver_error, retry_policy
from db.errors import DatabaseConfigError, DatabaseUnavailableError
from db.schema import SchemaState, require_current_schema, upgrade_schema
from db.unit_of_work import is_transient_error

logger = logging.getLogger(__name__)

ENVIRONMENTS = ("development", "production")


def app_environment(env: Mapping[str, str] | None = None) -> str:
    """`APP_ENV`: development (default) or production."""
    value = (os.environ if env is None else env).get("APP_ENV") or "development"
    if value not in ENVIRONMENTS:
        raise DatabaseConfigError(f"APP_ENV (environment): must be one of {', '.join(ENVIRONMENTS)}, got {value!r}")
    return value


def prepare_schema(connection: DatabaseConnection, environment: str) -> SchemaState:
    """Development: create or migrate the schema to head. Production: refuse a schema that is not at head."""
    if environment == "production":
        return require_current_schema(connection)
    result = upgrade_schema(connection)
    return SchemaState(result.after, result.before.head)


def start_database(
    config: Mapping[str, Any] | str | None = None,
    env: Mapping[str, str] | None = None,
    *,
    startup_timeout: float | None = None,
) -> DatabaseConnection:
    """Load the settings, initialise the process's connection and prepare the schema for APP_ENV.

    Once initialised, the process's connection is returned; a `config` naming another database raises
    RuntimeError (one database per process: `DatabaseConnection.reset()` first). `startup_timeout`: wait at
    most this long for the database instead of the configured DATABASE_STARTUP_TIMEOUT (0: one attempt).
    """
    environment = app_environment(env)
    if DatabaseConnection.is_initialized():
        connection = DatabaseConnection.get_instance()
        if config is not None:
            _check_same_database(DatabaseConfig.load(config, env), connection.config)
        return connection
    connection = DatabaseConnection.initialize(DatabaseConfig.load(config, env), startup_timeout=startup_timeout)
    seconds = connection.config.startup_timeout if startup_timeout is None else startup_timeout
    try:
        _prepare_while_transient(connection, environment, seconds)
    except BaseException:
        # Not started: the next start tries again from the beginning, schema included.
        DatabaseConnection.reset()
        raise
    return connection


def _prepare_while_transient(connection: DatabaseConnection, environment: str, seconds: float) -> None:
    """`prepare_schema`, again after a lost connection (a server restarting under agents starting) for up to
    `seconds`; what still fails is a DatabaseUnavailableError, as a server that never answered is."""
    # With `seconds` 0 the policy stops after the first attempt.
    retrying = Retrying(
        retry=retry_if_exception(is_transient_error), **retry_policy(seconds, 0.05, 2, "prepare the schema")
    )
    try:
        retrying(prepare_schema, connection, environment)
    except SQLAlchemyError as exc:
        if not is_transient_error(exc):
            raise
        raise DatabaseUnavailableError(f"the schema could not be prepared: {describe_driver_error(exc)}") from exc


def _check_same_database(wanted: DatabaseConfig, current: DatabaseConfig) -> None:
    """RuntimeError if `wanted` names another database than the process's; a warning naming the settings
    (never their values) that differ for the same database, where the process's stand."""
    if wanted.sqlalchemy_url != current.sqlalchemy_url:
        raise RuntimeError(
            f"this process's database is already initialised with {current.safe_url}, and this configuration names "
            f"{wanted.safe_url}; one process uses one database (DatabaseConnection.reset() first)"
        )
    differing = [
        item.name
        for item in fields(DatabaseConfig)
        if item.compare and getattr(wanted, item.name) != getattr(current, item.name)
    ]
    if differing:
        logger.warning(
            "database settings %s differ from those the process's connection was made with; those stand",
            ", ".join(differing),
        )
