"""ORM models."""

from db.models.base import Base, TimestampMixin, utcnow
from db.models.task import COUNTER_COLUMNS, FINISHED_STATUSES, INT_MAX, Task, TaskStatus
from db.models.task_heartbeat import NO_SIGN_OF_LIFE, TaskHeartbeat
from db.models.task_operation import OPERATION_RETENTION, TaskOperation
from db.models.usage_bucket import BUCKET, UsageBucket, bucket_start

__all__ = [
    "BUCKET",
    "COUNTER_COLUMNS",
    "FINISHED_STATUSES",
    "INT_MAX",
    "NO_SIGN_OF_LIFE",
    "OPERATION_RETENTION",
    "Base",
    "Task",
    "TaskHeartbeat",
    "TaskOperation",
    "TaskStatus",
    "TimestampMixin",
    "UsageBucket",
    "bucket_start",
    "utcnow",
]
