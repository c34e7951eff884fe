"""Data access objects."""

from db.repositories.task_repository import TaskRepository

__all__ = ["TaskRepository"]
