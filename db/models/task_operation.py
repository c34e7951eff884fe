"""The `task_operations` table: ids of the counter increments that took effect, kept for a week."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import Index
from sqlalchemy.orm import Mapped, mapped_column

from db.models.base import Base
from db.models.types import UTCDateTime, UUIDString

# How long an increment's id is kept: a call sent again within this finds its id and adds nothing. Far longer
# than any retry of the repository or of a live manager, and than a paused task usually waits; a batch kept
# on disk longer than this is decided by its task's row (context_storage/unsaved.py).
OPERATION_RETENTION = timedelta(days=7)


class TaskOperation(Base):
    """One increment of a task's counters, by the id its caller chose, written in the statement that adds."""

    __tablename__ = "task_operations"
    __table_args__ = (Index(None, "recorded_at"),)

    operation_id: Mapped[str] = mapped_column(UUIDString(), primary_key=True)
    recorded_at: Mapped[datetime] = mapped_column(UTCDateTime())
