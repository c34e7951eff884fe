"""ORM models."""

from db.models.base import Base, TimestampMixin, utcnow
from db.models.task import COUNTER_COLUMNS, FINISHED_STATUSES, INT_MAX, Task, TaskStatus

__all__ = ["COUNTER_COLUMNS", "FINISHED_STATUSES", "INT_MAX", "Base", "Task", "TaskStatus", "TimestampMixin", "utcnow"]
