"""Data access objects."""

from db.repositories.task_repository import TaskKeyLike, TaskRepository
from db.repositories.task_usage import DailyUsage, TaskUsageQuery, UserUsage

__all__ = ["DailyUsage", "TaskKeyLike", "TaskRepository", "TaskUsageQuery", "UserUsage"]
