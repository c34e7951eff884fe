"""ORM models."""

from db.models.base import Base, TimestampMixin, utcnow
from db.models.task import COUNTER_COLUMNS, FINISHED_STATUSES, INT_MAX, Task, TaskStatus
from db.models.task_operation import OPERATION_RETENTION, TaskOperation

__all__ = [
    "COUNTER_COLUMNS",
    "FINISHED_STATUSES",
    "INT_MAX",
    "OPERATION_RETENTION",
    "Base",
    "Task",
    "TaskOperation",
    "TaskStatus",
    "TimestampMixin",
    "utcnow",
]
