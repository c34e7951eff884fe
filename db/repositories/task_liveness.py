"""TaskLiveness: signs of life of running tasks, and the running tasks whose agent stopped giving them."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Table, and_, case, func, literal, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from db.connection import DatabaseConnection
from db.models import NO_SIGN_OF_LIFE, Task, TaskHeartbeat, TaskStatus, utcnow
from db.models.types import UTCDateTime, canonical_uuid, parse_stored_datetime
from db.unit_of_work import run_in_transaction, run_once, run_single_statement

logger = logging.getLogger(__name__)

HEARTBEATS: Table = TaskHeartbeat.__table__  # type: ignore[assignment]
TASKS: Table = Task.__table__  # type: ignore[assignment]
# A task's last sign of life: its last beat or the last write to its row, whichever is later (a resumed task's
# beat may be days old; a task that never beat is judged by its row).
LAST_SIGN = case(
    (and_(HEARTBEATS.c.beat_at.is_not(None), HEARTBEATS.c.beat_at > TASKS.c.updated_at), HEARTBEATS.c.beat_at),
    else_=TASKS.c.updated_at,
)
MAX_LISTED = 1000


@dataclass(frozen=True)
class StaleTask:
    """A running task without a sign of life: where it ran and when it was last heard from."""

    task: Task
    hostname: str | None
    last_sign: datetime


class TaskLiveness:
    """Heartbeats of running tasks; each method is one transaction."""

    def __init__(self, connection: DatabaseConnection | None = None) -> None:
        self._connection = connection if connection is not None else DatabaseConnection.get_instance()

    def beat(self, uuid: str, hostname: str, process_id: int) -> tuple[str, str | None] | None:
        """Record a sign of life of the task's agent, now; the task's status and error message as they stand
        (None for a task that does not exist). Touches no column of the task itself."""
        key = canonical_uuid(uuid)
        values = {"task_uuid": key, "beat_at": utcnow(), "hostname": hostname[:255], "process_id": process_id}
        dialect = postgresql if self._connection.config.backend == "postgresql" else sqlite
        upsert = dialect.insert(HEARTBEATS).values(values)
        upsert = upsert.on_conflict_do_update(index_elements=["task_uuid"], set_=values)
        row_of_task = select(TASKS.c.status, TASKS.c.error_message).where(TASKS.c.uuid == key)

        def work(session: Session) -> tuple[str, str | None] | None:
            found = session.execute(row_of_task).first()
            if found is None:
                return None
            session.execute(upsert)
            return str(found[0]), found[1]

        # One attempt: a beat is sent again by the next one, and a retry's log lines every minute of an outage
        # would say nothing the first did not.
        return run_once(self._connection, work, "heartbeat")

    def stale(
        self, older_than: timedelta, *, now: datetime | None = None, among: Sequence[str] | None = None
    ) -> list[StaleTask]:
        """Running tasks with no sign of life for `older_than`, the longest silent first: at most 1000, or those
        of the tasks named in `among`."""
        statement = (
            select(Task, HEARTBEATS.c.hostname, LAST_SIGN)
            .outerjoin(HEARTBEATS, HEARTBEATS.c.task_uuid == Task.uuid)
            .where(self._silent(older_than, now))
            .order_by(LAST_SIGN, Task.uuid)
            .limit(MAX_LISTED)
        )
        if among is not None:
            statement = statement.where(Task.uuid.in_([canonical_uuid(key) for key in among]))

        def work(session: Session) -> list[StaleTask]:
            return [
                StaleTask(task, hostname or task.hostname, _aware(last_sign))
                for task, hostname, last_sign in session.execute(statement)
            ]

        return run_single_statement(self._connection, work, "find stale tasks")

    def count_stale(self, older_than: timedelta, *, now: datetime | None = None) -> int:
        """How many running tasks have had no sign of life for `older_than`."""
        statement = (
            select(func.count())
            .select_from(TASKS)
            .outerjoin(HEARTBEATS, HEARTBEATS.c.task_uuid == TASKS.c.uuid)
            .where(self._silent(older_than, now))
        )
        counted = run_single_statement(
            self._connection, lambda session: session.execute(statement).scalar_one(), "count stale tasks"
        )
        return int(counted)

    @staticmethod
    def _silent(older_than: timedelta, now: datetime | None) -> ColumnElement[bool]:
        cutoff = literal((now or utcnow()) - older_than, UTCDateTime())
        return and_(TASKS.c.status == TaskStatus.RUNNING.value, cutoff > LAST_SIGN)

    def fail_stale(self, uuid: str, older_than: timedelta, *, now: datetime | None = None) -> bool:
        """Mark the task failed if it still runs with no sign of life for `older_than`, with a message naming
        its host and its last sign. False when it gave one meanwhile, finished, or does not exist."""
        key = canonical_uuid(uuid)
        moment = now or utcnow()
        # Locked: a beat arriving meanwhile waits, and then finds the task failed (its manager records that).
        last_beat = (
            select(HEARTBEATS.c.beat_at, HEARTBEATS.c.hostname).where(HEARTBEATS.c.task_uuid == key).with_for_update()
        )

        def work(session: Session) -> bool:
            beat = session.execute(last_beat).first()
            task = session.get(Task, key)
            if task is None or task.status != TaskStatus.RUNNING.value:
                return False
            last_sign = max(_aware(beat[0]), task.updated_at) if beat is not None else task.updated_at
            if last_sign >= moment - older_than:
                return False
            host = (beat[1] if beat is not None else None) or task.hostname or "an unknown host"
            message = f"{NO_SIGN_OF_LIFE} from {host} since {last_sign.isoformat()}; marked failed {moment.isoformat()}"
            # Guarded: a write to the row since it was read (a finish, counters) leaves the task as it is.
            guarded = (
                update(TASKS)
                .where(TASKS.c.uuid == key, TASKS.c.status == TaskStatus.RUNNING.value)
                .where(TASKS.c.updated_at == task.updated_at)
                .values(status=TaskStatus.FAILED.value, error_message=message, completed_at=moment, updated_at=moment)
            )
            return bool(session.execute(guarded).rowcount)  # type: ignore[attr-defined]

        failed = run_in_transaction(self._connection, work, "fail a stale task", redo_safe=True)
        if failed:
            logger.warning("task %s had no sign of life for %s; marked failed", key, older_than)
        return failed

    def revive(self, uuid: str, stale_message: str) -> bool:
        """A task marked failed for want of a sign of life whose agent turns out alive: running again, the
        failure kept in its error message with the time it went on. Only while the row still holds that very
        failure (a finish written meanwhile stands)."""
        key = canonical_uuid(uuid)
        moment = utcnow()
        revived = (
            update(TASKS)
            .where(
                TASKS.c.uuid == key,
                TASKS.c.status == TaskStatus.FAILED.value,
                TASKS.c.error_message == stale_message,
            )
            .values(
                status=TaskStatus.RUNNING.value,
                completed_at=None,
                error_message=f"{stale_message}; the agent was alive and went on {moment.isoformat()}",
                updated_at=moment,
            )
        )
        return bool(
            run_single_statement(
                self._connection,
                lambda session: session.execute(revived).rowcount,  # type: ignore[attr-defined]
                "revive a task",
            )
        )


def _aware(value: Any) -> datetime:
    """A date-time read from a computed column or a Core select (no model to convert it): aware, in UTC."""
    return parse_stored_datetime(value)
