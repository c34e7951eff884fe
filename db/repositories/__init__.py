"""Data access objects."""

from db.repositories.task_liveness import StaleTask, TaskLiveness
from db.repositories.task_repository import TaskKeyLike, TaskRepository
from db.repositories.task_usage import DailyUsage, TaskUsageQuery, UserUsage

__all__ = ["DailyUsage", "StaleTask", "TaskKeyLike", "TaskLiveness", "TaskRepository", "TaskUsageQuery", "UserUsage"]
