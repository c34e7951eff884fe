"""The `tasks` table: one row per agent task."""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import Index, Integer, String, Text, text
from sqlalchemy.orm import Mapped, mapped_column, validates

from db.models.base import Base, TimestampMixin
from db.models.types import UTCDateTime, UUIDString, canonical_uuid

INT_MAX = 2_147_483_647
INT_MIN = -2_147_483_648
COUNTER_COLUMNS = ("llm_call_count", "tool_call_count", "total_tokens", "compression_count")
NUL_REPLACEMENT = "\u2400"
SURROGATE_REPLACEMENT = "\ufffd"
_SURROGATE = re.compile("[\ud800-\udfff]")


class TaskStatus(StrEnum):
    """The life-cycle states of a task."""

    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    STOPPED = "stopped"

    @classmethod
    def parse(cls, value: object) -> TaskStatus:
        """Return the status named by `value`, or raise ValueError listing the allowed ones."""
        if isinstance(value, cls):
            return value
        if isinstance(value, str) and value in cls._value2member_map_:
            return cls(value)
        allowed = ", ".join(status.value for status in cls)
        raise ValueError(f"unknown task status {value!r}; allowed: {allowed}")


FINISHED_STATUSES = frozenset({TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.STOPPED})


class Task(TimestampMixin, Base):
    """A task row. Values are validated on assignment, so bad input fails before any SQL on every backend."""

    __tablename__ = "tasks"
    __table_args__ = (
        Index(None, "created_at"),
        Index(None, "task_source", "owner", "repo"),
        # The listings: one status or one user, newest first (migration 0002).
        Index(None, "status", "created_at"),
        Index(None, "user", "created_at"),
    )

    uuid: Mapped[str] = mapped_column(UUIDString(), primary_key=True)
    task_source: Mapped[str] = mapped_column(String(50))
    owner: Mapped[str] = mapped_column(String(255))
    repo: Mapped[str] = mapped_column(String(255))
    task_type: Mapped[str] = mapped_column(String(50))
    task_id: Mapped[str] = mapped_column(String(50))
    status: Mapped[str] = mapped_column(String(20), index=True, default=TaskStatus.RUNNING.value)
    started_at: Mapped[datetime | None]
    completed_at: Mapped[datetime | None]
    process_id: Mapped[int | None]
    hostname: Mapped[str | None] = mapped_column(String(255))
    llm_provider: Mapped[str | None] = mapped_column(String(50))
    model: Mapped[str | None] = mapped_column(String(100))
    context_length: Mapped[int | None]
    llm_call_count: Mapped[int] = mapped_column(default=0, server_default=text("0"))
    tool_call_count: Mapped[int] = mapped_column(default=0, server_default=text("0"))
    total_tokens: Mapped[int] = mapped_column(default=0, server_default=text("0"))
    compression_count: Mapped[int] = mapped_column(default=0, server_default=text("0"))
    error_message: Mapped[str | None] = mapped_column(Text)
    user: Mapped[str | None] = mapped_column(String(255), index=True)

    @validates(
        "uuid",
        "task_source",
        "owner",
        "repo",
        "task_type",
        "task_id",
        "status",
        "created_at",
        "updated_at",
        "started_at",
        "completed_at",
        "process_id",
        "hostname",
        "llm_provider",
        "model",
        "context_length",
        *COUNTER_COLUMNS,
        "error_message",
        "user",
    )
    def _validate(self, key: str, value: Any) -> Any:
        return check_value(key, value)

    @classmethod
    def check_values(cls, values: Mapping[str, Any]) -> dict[str, Any]:
        """Validate and normalise column values without touching the database."""
        return {key: check_value(key, value) for key, value in values.items()}

    def to_dict(self) -> dict[str, Any]:
        """All columns as a JSON-serialisable dict; date-times as ISO-8601 text."""
        result: dict[str, Any] = {}
        for column in self.__table__.columns:
            value = getattr(self, column.key)
            result[column.key] = value.isoformat() if isinstance(value, datetime) else value
        return result

    def reference(self) -> str:
        """The issue or merge request, as every page and command names it: `github acme/web#42`,
        `gitlab 321!6` (a merge request), `gitlab 321#5` (an issue)."""
        if self.task_source == "gitlab":
            separator = "!" if self.task_type == "merge_request" else "#"
            return f"gitlab {self.repo}{separator}{self.task_id}"
        return f"{self.task_source} {self.owner}/{self.repo}#{self.task_id}"

    def __repr__(self) -> str:
        return f"Task(uuid={self.uuid!r}, status={self.status!r}, {self.task_source}:{self.owner}/{self.repo})"


def check_value(key: str, value: Any) -> Any:
    """Validate one column value the same way on every backend; return its stored form."""
    column = Task.__table__.columns.get(key)
    if column is None:
        raise ValueError(f"tasks has no column {key!r}")
    if value is None:
        if not column.nullable:
            raise ValueError(f"{key} must not be None")
        return None
    if key == "uuid":
        return canonical_uuid(value)
    if key == "status":
        return TaskStatus.parse(value).value
    if isinstance(column.type, UTCDateTime):
        return _check_datetime(key, value)
    if isinstance(column.type, Integer):
        return _check_integer(key, value)
    return _check_string(key, value, getattr(column.type, "length", None))


def _check_datetime(key: str, value: Any) -> datetime:
    if not isinstance(value, datetime):
        raise ValueError(f"{key} must be a datetime, got {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{key} must be timezone-aware, got the naive datetime {value.isoformat()}")
    return value


def _check_integer(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{key} must be an integer, got {type(value).__name__}")
    low = 0 if key in COUNTER_COLUMNS else INT_MIN
    if not low <= value <= INT_MAX:
        raise ValueError(f"{key} must be in {low}..{INT_MAX}, got {value}")
    return value


def storable_text(value: str) -> str:
    """`value` as every backend can store it: NUL (which PostgreSQL text cannot hold) becomes U+2400 `␀`,
    and a lone surrogate (which UTF-8 cannot encode) becomes U+FFFD `�`; anything else is kept as it is."""
    if "\x00" in value:
        value = value.replace("\x00", NUL_REPLACEMENT)
    if _SURROGATE.search(value):
        value = _SURROGATE.sub(SURROGATE_REPLACEMENT, value)
    return value


def _check_string(key: str, value: Any, length: int | None) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{key} must be a string, got {type(value).__name__}")
    text = storable_text(value)
    if length is not None and len(text) > length:
        raise ValueError(f"{key} is {len(text)} characters long; at most {length} are allowed")
    return text
