"""Column types that behave the same on SQLite and PostgreSQL."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import DateTime, String
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator, TypeEngine

# Fixed width, so that SQLite's text comparison is time order; isoformat() of a UTC datetime has this form.
SQLITE_DATETIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%f+00:00"


def canonical_uuid(value: object) -> str:
    """Return `value` as a lower-case hyphenated UUID string, or raise ValueError."""
    if isinstance(value, uuid.UUID):
        return str(value)
    if not isinstance(value, str):
        raise ValueError(f"uuid must be a string, got {type(value).__name__}")
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise ValueError(f"not a valid UUID: {value[:64]!r}") from None


def parse_stored_datetime(value: str | datetime) -> datetime:
    """Read a stored date-time (any ISO-8601 text; no offset means UTC) as an aware UTC datetime."""
    parsed = value if isinstance(value, datetime) else datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def format_sqlite_datetime(value: datetime) -> str:
    """The fixed-width UTC text a date-time is stored as on SQLite."""
    return value.astimezone(UTC).strftime(SQLITE_DATETIME_FORMAT)


class UTCDateTime(TypeDecorator[datetime]):
    """TIMESTAMP WITH TIME ZONE on PostgreSQL; fixed-width UTC ISO-8601 text on SQLite.

    Only timezone-aware values are accepted; values always come back aware, in UTC.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(String(32))
        return dialect.type_descriptor(DateTime(timezone=True))

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if not isinstance(value, datetime) or value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"date-times must be timezone-aware, got {value!r}")
        if dialect.name == "sqlite":
            return format_sqlite_datetime(value)
        return value.astimezone(UTC)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return parse_stored_datetime(value)


class UUIDString(TypeDecorator[str]):
    """A UUID held as its canonical string: native UUID on PostgreSQL, VARCHAR(36) elsewhere."""

    impl = String(36)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "postgresql":
            return dialect.type_descriptor(postgresql.UUID(as_uuid=False))
        return dialect.type_descriptor(String(36))

    def process_bind_param(self, value: Any, dialect: Dialect) -> str | None:
        return None if value is None else canonical_uuid(value)

    def process_result_value(self, value: Any, dialect: Dialect) -> str | None:
        return None if value is None else str(value).lower()
