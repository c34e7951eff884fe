"""Task persistence on SQLite or PostgreSQL through SQLAlchemy: config, connection, models, repository."""

from db.config import DatabaseConfig, PoolConfig
from db.connection import DatabaseConnection
from db.errors import DatabaseConfigError, DatabaseError, DatabaseUnavailableError, TaskAlreadyExistsError
from db.models import Base, Task, TaskStatus, TimestampMixin
from db.repositories import (
    DailyUsage,
    StaleTask,
    TaskLiveness,
    TaskRepository,
    TaskRetention,
    TaskUsageQuery,
    UserUsage,
)

__all__ = [
    "Base",
    "DailyUsage",
    "DatabaseConfig",
    "DatabaseConfigError",
    "DatabaseConnection",
    "DatabaseError",
    "DatabaseUnavailableError",
    "PoolConfig",
    "StaleTask",
    "Task",
    "TaskAlreadyExistsError",
    "TaskLiveness",
    "TaskRepository",
    "TaskRetention",
    "TaskStatus",
    "TaskUsageQuery",
    "TimestampMixin",
    "UserUsage",
]
