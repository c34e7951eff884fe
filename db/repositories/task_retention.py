"""TaskRetention: finished tasks older than a cutoff, and their removal with their tokens kept in usage buckets."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import ColumnElement, Table, and_, delete, func, insert, literal, select, tuple_
from sqlalchemy.orm import Session

from db.connection import DatabaseConnection
from db.models import FINISHED_STATUSES, Task, TaskHeartbeat, UsageBucket, bucket_start
from db.models.types import UTCDateTime, canonical_uuid
from db.unit_of_work import run_in_transaction, run_single_statement, run_statement

TASKS: Table = Task.__table__  # type: ignore[assignment]
HEARTBEATS: Table = TaskHeartbeat.__table__  # type: ignore[assignment]
BUCKETS: Table = UsageBucket.__table__  # type: ignore[assignment]
MAX_BATCH = 1000
# Rows another transaction holds are skipped, not waited for; the buckets are computed from the epoch, so the
# session's time zone cannot move them.
PRUNE_POSTGRESQL = """
WITH chosen AS (
    SELECT uuid, "user", created_at, total_tokens FROM tasks
    WHERE uuid = ANY(%(keys)s::uuid[]) AND status = ANY(%(finished)s) AND completed_at < %(cutoff)s
      AND created_at < %(cutoff)s
    FOR UPDATE SKIP LOCKED
), gone AS (
    DELETE FROM tasks WHERE uuid IN (SELECT uuid FROM chosen) RETURNING uuid
), beats AS (
    DELETE FROM task_heartbeats WHERE task_uuid IN (SELECT uuid FROM gone)
)
INSERT INTO token_usage_buckets ("user", bucket_start, tokens)
SELECT "user", to_timestamp(floor(extract(epoch FROM created_at) / 900) * 900), sum(total_tokens)
FROM chosen WHERE uuid IN (SELECT uuid FROM gone)
GROUP BY 1, 2
"""
STILL_THERE_POSTGRESQL = "SELECT uuid::text FROM tasks WHERE uuid = ANY(%(keys)s::uuid[])"


@dataclass(frozen=True)
class PrunableTask:
    """A finished task past the cutoff; `created_at` and `uuid` order them, and resume a listing."""

    uuid: str
    status: str
    created_at: datetime
    completed_at: datetime
    total_tokens: int


@dataclass(frozen=True)
class PruneSummary:
    """What pruning at a cutoff would remove: tasks by status, their tokens and when they finished."""

    by_status: dict[str, int]
    tokens: int
    first_completed: datetime | None
    last_completed: datetime | None

    @property
    def tasks(self) -> int:
        return sum(self.by_status.values())


class TaskRetention:
    """Finished tasks whose `completed_at` is before a cutoff; running tasks are never among them."""

    def __init__(self, connection: DatabaseConnection | None = None) -> None:
        self._connection = connection if connection is not None else DatabaseConnection.get_instance()
        self._postgresql = self._connection.config.backend == "postgresql"

    def summary(self, cutoff: datetime) -> PruneSummary:
        """Counts by status, tokens, and the first and last completion of the tasks `prune` would remove."""
        statement = (
            select(
                TASKS.c.status,
                func.count(),
                func.sum(TASKS.c.total_tokens),
                func.min(TASKS.c.completed_at),
                func.max(TASKS.c.completed_at),
            )
            .where(_past(cutoff, postgresql=self._postgresql))
            .group_by(TASKS.c.status)
        )
        rows = run_single_statement(
            self._connection, lambda session: session.execute(statement).all(), "summarise prunable tasks"
        )
        firsts = [row[3] for row in rows]
        lasts = [row[4] for row in rows]
        return PruneSummary(
            by_status={row[0]: int(row[1]) for row in rows},
            tokens=sum(int(row[2] or 0) for row in rows),
            first_completed=min(firsts) if firsts else None,
            last_completed=max(lasts) if lasts else None,
        )

    def prunable(
        self, cutoff: datetime, *, after: PrunableTask | None = None, limit: int = MAX_BATCH
    ) -> list[PrunableTask]:
        """Up to `limit` tasks finished before `cutoff`, oldest created first, starting past `after`. Walks the
        `created_at` index: a task finished before the cutoff was created before it too."""
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_BATCH:
            raise ValueError(f"limit must be an integer in 1..{MAX_BATCH}, got {limit!r}")
        statement = (
            select(TASKS.c.uuid, TASKS.c.status, TASKS.c.created_at, TASKS.c.completed_at, TASKS.c.total_tokens)
            .where(_past(cutoff, postgresql=self._postgresql))
            .order_by(TASKS.c.created_at, TASKS.c.uuid)
            .limit(limit)
        )
        if after is not None:
            # The first condition starts the index scan where the last page ended (past the rows deleted since,
            # which the index still holds until vacuumed); the second orders ties.
            start = literal(after.created_at, UTCDateTime())
            statement = statement.where(
                TASKS.c.created_at >= start,
                tuple_(TASKS.c.created_at, TASKS.c.uuid) > tuple_(start, literal(after.uuid, TASKS.c.uuid.type)),
            )
        rows = run_single_statement(
            self._connection, lambda session: session.execute(statement).all(), "list prunable tasks"
        )
        return [PrunableTask(*row) for row in rows]

    def prune(self, uuids: Sequence[str], cutoff: datetime) -> list[str]:
        """Delete those of `uuids` that are still finished before `cutoff`, with their heartbeats, and add
        their tokens to the usage buckets, in one transaction; return the uuids deleted. On PostgreSQL a row
        another transaction holds is skipped, not waited for."""
        keys = sorted({canonical_uuid(uuid) for uuid in uuids})
        if len(keys) > MAX_BATCH:
            raise ValueError(f"at most {MAX_BATCH} tasks are pruned at once, got {len(keys)}")
        if not keys:
            return []
        if self._postgresql:
            return self._prune_in_one_statement(keys, cutoff)
        chosen = select(TASKS.c.uuid, TASKS.c.user, TASKS.c.created_at, TASKS.c.total_tokens).where(
            TASKS.c.uuid.in_(keys), _past(cutoff, postgresql=False)
        )

        def work(session: Session) -> list[str]:
            rows = session.execute(chosen).all()
            if not rows:
                return []
            sums: dict[tuple[str | None, datetime], int] = {}
            for _, user, created_at, tokens in rows:
                bucket = (user, bucket_start(created_at))
                sums[bucket] = sums.get(bucket, 0) + tokens
            # Buckets of no tokens too: every user the usage listed before is listed after.
            session.execute(
                insert(BUCKETS),
                [{"user": user, "bucket_start": start, "tokens": tokens} for (user, start), tokens in sums.items()],
            )
            deleted = [row[0] for row in rows]
            session.execute(delete(HEARTBEATS).where(HEARTBEATS.c.task_uuid.in_(deleted)))
            session.execute(delete(TASKS).where(TASKS.c.uuid.in_(deleted)))
            return deleted

        def committed(deleted: list[str]) -> bool:
            # Only pruning deletes tasks: a batch whose rows are all gone was committed.
            left = select(func.count()).select_from(TASKS).where(TASKS.c.uuid.in_(deleted))
            return (
                run_single_statement(
                    self._connection, lambda session: session.execute(left).scalar_one(), "check a pruned batch"
                )
                == 0
            )

        return run_in_transaction(self._connection, work, "prune finished tasks", committed=committed)

    def _prune_in_one_statement(self, keys: list[str], cutoff: datetime) -> list[str]:
        """PostgreSQL: the whole batch as one statement that commits on its own. Sending it again is safe (a
        task gone is not chosen again), so what was deleted is read afterwards, not from an answer that a
        lost connection may have taken with it."""
        parameters = {"keys": keys, "cutoff": cutoff, "finished": sorted(status.value for status in FINISHED_STATUSES)}
        run_statement(self._connection, PRUNE_POSTGRESQL, parameters, "prune finished tasks")
        left = run_statement(self._connection, STILL_THERE_POSTGRESQL, {"keys": keys}, "check a pruned batch")
        remaining = {row[0] for row in left}
        return [key for key in keys if key not in remaining]


def _past(cutoff: datetime, *, postgresql: bool) -> ColumnElement[bool]:
    """Finished before `cutoff`, and created before it too: the `created_at` index finds them, and a row whose
    clock put its creation after its finish is kept rather than missed by one listing and counted by another."""
    finished = sorted(status.value for status in FINISHED_STATUSES)
    moment = literal(cutoff, UTCDateTime())
    # On SQLite the status goes through a function, so that its planner does not reach for a status index: it
    # would then read every finished row and sort them all for each page (0.9 s a page at a million rows), where
    # the created_at index gives them in order (under a millisecond). PostgreSQL's planner walks that index with
    # an incremental sort by itself, and misjudges the function's selectivity.
    status = TASKS.c.status if postgresql else func.coalesce(TASKS.c.status, "")
    return and_(status.in_(finished), TASKS.c.completed_at < moment, TASKS.c.created_at < moment)
