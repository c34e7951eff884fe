"""The `task_heartbeats` table: when each running task's agent last showed a sign of life, and from where."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from db.models.base import Base
from db.models.types import UTCDateTime, UUIDString

# The error message of a task marked failed for want of a sign of life starts with this.
NO_SIGN_OF_LIFE = "no sign of life"


class TaskHeartbeat(Base):
    """One row per task whose manager beat at least once; apart from `tasks`, so that a beat moves neither
    `updated_at` nor any other column a reader of the task relies on."""

    __tablename__ = "task_heartbeats"

    task_uuid: Mapped[str] = mapped_column(UUIDString(), primary_key=True)
    beat_at: Mapped[datetime] = mapped_column(UTCDateTime())
    hostname: Mapped[str] = mapped_column(String(255))
    process_id: Mapped[int] = mapped_column(Integer())
