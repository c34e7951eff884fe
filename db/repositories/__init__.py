"""Data access objects."""

from db.repositories.task_liveness import StaleTask, TaskLiveness
from db.repositories.task_repository import TaskKeyLike, TaskRepository
from db.repositories.task_retention import PrunableTask, PruneSummary, TaskRetention
from db.repositories.task_usage import DailyUsage, TaskUsageQuery, UserUsage

__all__ = [
    "DailyUsage",
    "PrunableTask",
    "PruneSummary",
    "StaleTask",
    "TaskKeyLike",
    "TaskLiveness",
    "TaskRepository",
    "TaskRetention",
    "TaskUsageQuery",
    "UserUsage",
]
