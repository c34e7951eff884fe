"""Alembic environment: migrations run on the project's own connection and metadata."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from db.config import DatabaseConfig
from db.connection import build_engine
from db.models import Base

target_metadata = Base.metadata


def run_migrations(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        transactional_ddl=True,
        compare_type=True,
        user_module_prefix="db.models.types.",
    )
    with context.begin_transaction():
        context.run_migrations()


def main() -> None:
    if context.is_offline_mode():
        raise SystemExit("offline (--sql) migrations are not supported: run them against a database")
    connection = context.config.attributes.get("connection")
    if connection is not None:
        run_migrations(connection)
        return
    # Run from the alembic command line: connect as the application would.
    engine = build_engine(DatabaseConfig.load())
    try:
        with engine.connect() as own_connection:
            run_migrations(own_connection)
            own_connection.commit()
    finally:
        engine.dispose()


main()
