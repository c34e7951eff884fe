"""Exceptions of the db package; callers never need to import SQLAlchemy to handle them."""


class DatabaseError(Exception):
    """A database operation failed."""


class DatabaseConfigError(DatabaseError, ValueError):
    """A database setting is missing or invalid; the message names the setting and where it came from."""


class DatabaseUnavailableError(DatabaseError):
    """The database server could not be reached within the configured time."""


class TaskAlreadyExistsError(DatabaseError, ValueError):
    """A task with this uuid is already stored."""
