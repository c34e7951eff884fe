"""TaskRepository: every read and write of the `tasks` table."""

from __future__ import annotations

import logging
import time
import uuid as uuid_module
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, ClassVar, Protocol

from sqlalchemy import (
    ColumnElement,
    Result,
    and_,
    bindparam,
    case,
    delete,
    func,
    literal,
    or_,
    select,
    true,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from db.connection import DatabaseConnection
from db.errors import DatabaseError, TaskAlreadyExistsError
from db.models import COUNTER_COLUMNS, FINISHED_STATUSES, INT_MAX, OPERATION_RETENTION, Task, TaskStatus, utcnow
from db.models.types import UTCDateTime, canonical_uuid, parse_stored_datetime
from db.repositories import statements
from db.unit_of_work import run_in_transaction, run_single_statement, run_statement

logger = logging.getLogger(__name__)

REQUIRED_FIELDS = ("uuid", "task_source", "owner", "repo", "task_type", "task_id")
IMMUTABLE_FIELDS = frozenset({"uuid", "created_at", "updated_at"})
MAX_PAGE = 1000
PREVIOUS_STATUSES = (TaskStatus.COMPLETED.value, TaskStatus.STOPPED.value)
NEWEST_FIRST = (Task.created_at.desc(), Task.uuid.asc())
EXPIRY_INTERVAL = timedelta(hours=1)
EXPIRY_BATCHES = 20
_BY_UUID = select(Task).where(Task.uuid == bindparam("key"))


class TaskKeyLike(Protocol):
    """What identifies a task's issue or merge request: the context_storage task keys have this."""

    def task_fields(self) -> Mapping[str, str]: ...


def _rowcount(result: Result[Any]) -> int:
    return int(getattr(result, "rowcount", 0))


def _column_names() -> frozenset[str]:
    return frozenset(column.key for column in Task.__table__.columns)


class TaskRepository:
    """Reads and writes tasks; each method is one transaction and returns detached, fully loaded objects."""

    # When this process next expires operation ids (time.monotonic()): its first increment does it at once.
    next_expiry: ClassVar[float] = 0.0

    def __init__(self, connection: DatabaseConnection | None = None) -> None:
        self._connection = connection if connection is not None else DatabaseConnection.get_instance()
        self._columns = _column_names()
        self._dialect = self._connection.engine.dialect
        self._postgresql = self._connection.config.backend == "postgresql"

    def ping(self) -> bool:
        """True when the database answers now (one attempt, no retry); never raises."""
        return self._connection.health_check()

    def create(self, task_data: Mapping[str, Any]) -> Task:
        """Insert a new task; `status` defaults to running. Raises TaskAlreadyExistsError for a known uuid."""
        unknown = sorted(set(task_data) - (self._columns - {"updated_at"}))
        if unknown:
            raise ValueError(f"unknown task fields: {', '.join(unknown)}")
        missing = [name for name in REQUIRED_FIELDS if task_data.get(name) is None]
        if missing:
            raise ValueError(f"missing required task fields: {', '.join(missing)}")
        if self._postgresql:
            return self._insert(Task.check_values(task_data))
        task = Task(**task_data)

        def work(session: Session) -> Task:
            session.add(task)
            return task

        try:
            run_in_transaction(
                self._connection,
                work,
                "create task",
                committed=lambda _: self._is_ours(task.uuid, task.created_at, task.updated_at),
                single_statement=True,
            )
        except IntegrityError:
            if self.get_by_uuid(task.uuid) is not None:
                raise TaskAlreadyExistsError(f"task {task.uuid} already exists") from None
            raise
        logger.debug("created task %s", task.uuid)
        return task

    def _insert(self, given: dict[str, Any]) -> Task:
        """PostgreSQL: the INSERT in one round trip, with no session or ORM object on the way (the values are
        checked as the model checks them); a lost answer is looked up."""
        now = utcnow()
        values: dict[str, Any] = dict.fromkeys(statements.COLUMNS)
        values.update(status=TaskStatus.RUNNING.value, created_at=now, updated_at=now)
        values.update(dict.fromkeys(COUNTER_COLUMNS, 0))
        values.update({name: value for name, value in given.items() if value is not None})
        key = str(values["uuid"])
        try:
            run_statement(
                self._connection,
                statements.sql(statements.INSERT_TASK, self._dialect),
                values,
                "create task",
                committed=lambda: self._is_ours(key, values["created_at"], values["updated_at"]),
            )
        except IntegrityError:
            if self.get_by_uuid(key) is not None:
                raise TaskAlreadyExistsError(f"task {key} already exists") from None
            raise
        logger.debug("created task %s", key)
        return statements.detached(values)

    def _is_ours(self, key: str, created_at: datetime, updated_at: datetime) -> bool:
        """After a lost answer to an INSERT: whether the row with this uuid is the one it sent (an earlier task of
        the same uuid is not), by the times it carried."""
        found = self.get_by_uuid(key)
        return found is not None and (found.created_at, found.updated_at) == (created_at, updated_at)

    def get_by_uuid(self, uuid: str) -> Task | None:
        """The task with this uuid, or None."""
        key = canonical_uuid(uuid)
        if self._postgresql:
            sql = statements.sql(statements.SELECT_BY_UUID, self._dialect)
            rows = run_statement(self._connection, sql, {"key": key}, "get task")
            task = statements.task_from_row(rows[0], self._dialect) if rows else None
        else:
            task = run_single_statement(
                self._connection,
                lambda session: session.scalars(_BY_UUID, {"key": key}).first(),
                "get task",
            )
        if task is None and logger.isEnabledFor(logging.DEBUG):
            logger.debug("task %s not found", key)
        return task

    def update(self, uuid: str, updates: Mapping[str, Any]) -> Task | None:
        """Set the given columns; None when the task does not exist."""
        key = canonical_uuid(uuid)
        immutable = sorted(set(updates) & IMMUTABLE_FIELDS)
        if immutable:
            raise ValueError(f"task fields cannot be updated: {', '.join(immutable)}")
        unknown = sorted(set(updates) - self._columns)
        if unknown:
            raise ValueError(f"unknown task fields: {', '.join(unknown)}")
        values = Task.check_values(updates)
        # One statement (UPDATE ... RETURNING the row): setting values twice is setting them once.
        statement = (
            update(Task)
            .where(Task.uuid == key)
            .values({**values, "updated_at": utcnow()})
            .returning(Task)
            .execution_options(synchronize_session=False)
        )
        task = run_single_statement(self._connection, lambda session: session.scalars(statement).first(), "update task")
        if task is None:
            logger.warning("update: task %s does not exist", key)
        else:
            logger.debug("updated task %s: %s", key, ", ".join(sorted(values)))
        return task

    def update_status(self, uuid: str, status: str, error_message: str | None = None) -> bool:
        """Set the status; a finished status also sets `completed_at` when it is unset."""
        key = canonical_uuid(uuid)
        new_status = TaskStatus.parse(status)
        values: dict[str, Any] = {"status": new_status.value}
        if error_message is not None:
            values.update(Task.check_values({"error_message": error_message}))
        if new_status in FINISHED_STATUSES:
            now = literal(utcnow(), UTCDateTime())
            values["completed_at"] = case((Task.completed_at.is_(None), now), else_=Task.completed_at)
        return self._report(self._update_row(key, values, "update_status"), "update_status", key)

    def update_statistics(
        self,
        uuid: str,
        llm_calls: int = 0,
        tool_calls: int = 0,
        tokens: int = 0,
        compressions: int = 0,
        *,
        operation_id: str | None = None,
    ) -> bool:
        """Add to the counters, exactly once: concurrent callers lose nothing, and a call sent again counts once.

        The call carries an operation id (`operation_id`, or a new one), recorded in the transaction that adds;
        a call whose id is already recorded adds nothing and returns True. So a lost answer, a dropped
        connection or a COMMIT cut off by a crash is simply sent again, and a caller that keeps increments
        across its own crash sends them again with the id it chose (kept for OPERATION_RETENTION).
        """
        key = canonical_uuid(uuid)
        amounts = dict(zip(COUNTER_COLUMNS, (llm_calls, tool_calls, tokens, compressions), strict=True))
        for name, amount in amounts.items():
            if isinstance(amount, bool) or not isinstance(amount, int) or not 0 <= amount <= INT_MAX:
                raise ValueError(f"{name} increment must be an integer in 0..{INT_MAX}, got {amount!r}")
        operation = canonical_uuid(operation_id) if operation_id is not None else str(uuid_module.uuid4())
        added = tuple(name for name, amount in amounts.items() if amount)
        parameters = {"key": key, "operation": operation, "now": utcnow()}
        parameters.update({f"add_{name}": amounts[name] for name in added})
        found = self._add_once(added, parameters) or self._added_before(key, operation, added)
        self._expire_operations()
        return self._report(found, "update_statistics", key)

    def _add_once(self, added: tuple[str, ...], parameters: dict[str, Any]) -> bool:
        """Whether this send added. Safe to send again: once its id is recorded, a send adds nothing; a send
        that collides with another of the same id, running at once, fails whole and adds nothing."""
        try:
            if self._postgresql:
                sql = statements.sql(statements.add_once_postgresql(added), self._dialect)
                ((recorded,),) = run_statement(self._connection, sql, parameters, "update_statistics")
                return bool(recorded)

            def work(session: Session) -> bool:
                if _rowcount(session.execute(statements.add_once_sqlite(added), parameters)) == 0:
                    return False
                session.execute(statements.RECORD_OPERATION_SQLITE, parameters)
                return True

            return run_in_transaction(self._connection, work, "update_statistics", redo_safe=True)
        except IntegrityError:
            return False  # the other send of this id added: `_added_before` finds its id

    def _added_before(self, key: str, operation: str, added: tuple[str, ...]) -> bool:
        """After a send that added nothing: True if the id is recorded (an earlier send of the call added),
        False for a missing task; ValueError if a counter cannot take the increments."""
        recorded = run_single_statement(
            self._connection,
            lambda session: session.execute(statements.OPERATION_RECORDED, {"operation": operation}).first(),
            "update_statistics",
        )
        if recorded is not None:
            logger.info("update_statistics: operation %s on task %s took effect already", operation, key)
            return True
        if added and self.get_by_uuid(key) is not None:
            raise ValueError(f"the increments would take a counter of task {key} past {INT_MAX}")
        return False

    def _expire_operations(self) -> None:
        """Forget operation ids older than OPERATION_RETENTION, at most once an hour per process, in batches
        (each a short indexed DELETE; on PostgreSQL by the server's clock, skipping rows another process is
        expiring), never more than EXPIRY_BATCHES of them at a time."""
        now = time.monotonic()
        if now < TaskRepository.next_expiry:
            return
        TaskRepository.next_expiry = now + EXPIRY_INTERVAL.total_seconds()
        statement = statements.expire_operations(self._postgresql)
        parameters = {"retention": OPERATION_RETENTION, "before": utcnow() - OPERATION_RETENTION}
        try:
            for _ in range(EXPIRY_BATCHES):
                deleted = run_single_statement(
                    self._connection,
                    lambda session: _rowcount(session.execute(statement, parameters)),
                    "expire operation ids",
                )
                if deleted < statements.EXPIRY_BATCH:
                    break
        except DatabaseError as exc:
            logger.warning("operation ids were not expired (tried again in an hour): %s", exc)

    def complete(self, uuid: str) -> bool:
        """Mark the task completed, now."""
        values = {"status": TaskStatus.COMPLETED.value, "completed_at": utcnow()}
        key = canonical_uuid(uuid)
        return self._report(self._update_row(key, values, "complete"), "complete", key)

    def fail(self, uuid: str, error_message: str) -> bool:
        """Mark the task failed, now, with its error message."""
        values = Task.check_values({"error_message": error_message})
        values.update(status=TaskStatus.FAILED.value, completed_at=utcnow())
        key = canonical_uuid(uuid)
        return self._report(self._update_row(key, values, "fail"), "fail", key)

    def list_by_status(self, status: str, limit: int = 100, offset: int = 0) -> list[Task]:
        """Tasks in this status, newest first."""
        return self.list_tasks(status=status, limit=limit, offset=offset)

    def list_by_user(self, user: str, limit: int = 100, offset: int = 0) -> list[Task]:
        """Tasks of this user, newest first."""
        return self.list_tasks(user=user, limit=limit, offset=offset)

    def list_tasks(
        self,
        *,
        status: str | None = None,
        user: str | None = None,
        limit: int = 100,
        offset: int = 0,
        after: str | None = None,
    ) -> list[Task]:
        """Tasks matching every filter given, newest `created_at` first, ties by uuid.

        `after`: the uuid of the last task of the previous page; the page starts right after it, wherever
        the listing has moved since, and costs the same at any depth (unlike `offset`). A uuid that names
        no task gives an empty page.
        """
        conditions: list[ColumnElement[bool]] = []
        if status is not None:
            conditions.append(Task.status == TaskStatus.parse(status).value)
        if user is not None:
            conditions.append(Task.user == Task.check_values({"user": user})["user"])
        if after is not None:
            key = canonical_uuid(after)
            anchor = select(Task.created_at).where(Task.uuid == key).scalar_subquery()
            # The first condition alone bounds the index range; the second drops the anchor's ties up to it.
            conditions += [Task.created_at <= anchor, or_(Task.created_at < anchor, Task.uuid > key)]
        return self._list(and_(true(), *conditions), limit, offset)

    def find_previous(
        self,
        task_key: TaskKeyLike | None = None,
        *,
        task_source: str | None = None,
        owner: str | None = None,
        repo: str | None = None,
        task_type: str | None = None,
        task_id: str | None = None,
        statuses: Sequence[str] = PREVIOUS_STATUSES,
        since: datetime | None = None,
        limit: int = 10,
    ) -> list[Task]:
        """Earlier runs of one issue or merge request, most recently completed first.

        Give a task key (anything with `task_fields()`) or the fields; `task_type=None` matches every type
        (a GitHub number is shared by issues and pull requests). `since` keeps runs completed at or after it.
        Served by ix_tasks_task_source_owner_repo.
        """
        given = {"task_source": task_source, "owner": owner, "repo": repo, "task_type": task_type, "task_id": task_id}
        if task_key is not None:
            if any(value is not None for value in given.values()):
                raise ValueError("give either a task key or task fields, not both")
            given = {name: task_key.task_fields()[name] for name in given}
        missing = [name for name in ("task_source", "owner", "repo", "task_id") if given[name] is None]
        if missing:
            raise ValueError(f"missing task fields: {', '.join(missing)}")
        values = Task.check_values({name: value for name, value in given.items() if value is not None})
        if isinstance(statuses, str) or not statuses:
            raise ValueError("statuses must be a non-empty sequence of task statuses")
        conditions = [getattr(Task, name) == value for name, value in values.items()]
        conditions.append(Task.status.in_([TaskStatus.parse(status).value for status in statuses]))
        if since is not None:
            conditions.append(Task.completed_at >= Task.check_values({"completed_at": since})["completed_at"])
        order = (Task.completed_at.desc().nulls_last(), Task.created_at.desc(), Task.uuid.asc())
        return self._list(and_(*conditions), limit, 0, order)

    def delete(self, uuid: str) -> bool:
        """Delete the task; False when it did not exist."""
        key = canonical_uuid(uuid)
        statement = delete(Task).where(Task.uuid == key)
        # On PostgreSQL one statement in autocommit; if its answer is lost, a task no longer there was deleted.
        # `found` is None there (the answer never came): only the row can tell, as it can after a lost COMMIT of
        # a DELETE that found the row; one that found none changed nothing.
        deleted = run_in_transaction(
            self._connection,
            lambda session: _rowcount(session.execute(statement)) > 0,
            "delete task",
            committed=lambda found: found is False or self.get_by_uuid(key) is None,
            single_statement=True,
        )
        return self._report(deleted is not False, "delete", key)

    def oldest_running_start(self) -> datetime | None:
        """When the longest-running task started (its creation if it has no start); None when none runs."""
        statement = select(func.min(func.coalesce(Task.started_at, Task.created_at))).where(
            Task.status == TaskStatus.RUNNING.value
        )
        found = run_single_statement(
            self._connection, lambda session: session.execute(statement).scalar_one(), "find the oldest running task"
        )
        return None if found is None else parse_stored_datetime(found)

    def count_by_status(self) -> dict[str, int]:
        """Number of tasks in each status, every status listed."""
        statement = select(Task.status, func.count()).group_by(Task.status)
        rows = run_single_statement(self._connection, lambda session: session.execute(statement).all(), "count tasks")
        counts = dict.fromkeys((status.value for status in TaskStatus), 0)
        counts.update({status: int(count) for status, count in rows})
        return counts

    def _update_row(self, key: str, values: Mapping[str, Any], operation: str) -> bool:
        """Set values on one row: doing it twice leaves what doing it once does, so it is always redone."""
        # A Core UPDATE does not fire onupdate: updated_at is set here.
        statement = update(Task).where(Task.uuid == key).values({**values, "updated_at": utcnow()})
        return run_single_statement(
            self._connection, lambda session: _rowcount(session.execute(statement)) > 0, operation
        )

    @staticmethod
    def _report(found: bool, operation: str, key: str) -> bool:
        if found:
            logger.debug("%s: task %s", operation, key)
        else:
            logger.warning("%s: task %s does not exist", operation, key)
        return found

    def _list(
        self,
        condition: ColumnElement[bool],
        limit: int,
        offset: int,
        order: tuple[ColumnElement[Any], ...] = NEWEST_FIRST,
    ) -> list[Task]:
        for name, value, low, high in (("limit", limit, 1, MAX_PAGE), ("offset", offset, 0, None)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low or (high and value > high):
                allowed = f"{low}..{high}" if high else f">= {low}"
                raise ValueError(f"{name} must be an integer {allowed}, got {value!r}")
        statement = select(Task).where(condition).order_by(*order).limit(limit).offset(offset)
        return run_single_statement(self._connection, lambda session: list(session.scalars(statement)), "list tasks")
