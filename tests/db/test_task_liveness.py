"""Signs of life of running tasks, and the tasks whose agent stopped giving them, on every backend."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy import update

from db import DatabaseConnection, Task, TaskLiveness, TaskRepository
from db.models import NO_SIGN_OF_LIFE, TaskHeartbeat, utcnow

SILENT = timedelta(minutes=10)


def set_updated_at(connection: DatabaseConnection, key: str, moment: datetime) -> None:
    with connection.engine.begin() as raw:
        raw.execute(update(Task).where(Task.uuid == key).values(updated_at=moment))


def test_a_beat_keeps_a_task_off_the_stale_list_and_moves_nothing_of_the_row(
    connection: DatabaseConnection, repo: TaskRepository, make_task: Callable[..., Task]
) -> None:
    liveness = TaskLiveness(connection)
    quiet, beating, finished = make_task(hostname="old-host"), make_task(), make_task()
    repo.complete(finished.uuid)
    an_hour_ago = utcnow() - timedelta(hours=1)
    quiet = repo.update(quiet.uuid, {"model": "m"}) or quiet  # a write: its last sign, then made old
    set_updated_at(connection, quiet.uuid, an_hour_ago)
    assert liveness.beat(beating.uuid, "agent-7", 4242) == ("running", None)
    before = repo.get_by_uuid(beating.uuid)
    assert liveness.beat(beating.uuid, "agent-7", 4242) is not None
    # The one that beat is not silent; one that never beat is, by its last write, with the host its row
    # names; a finished task never is.
    stale = liveness.stale(SILENT)
    assert [(item.task.uuid, item.hostname) for item in stale] == [(quiet.uuid, "old-host")]
    assert stale[0].last_sign == an_hour_ago
    after = repo.get_by_uuid(beating.uuid)
    assert before is not None and after is not None and after.updated_at == before.updated_at
    later = utcnow() + timedelta(minutes=30)
    # Seen from further on, the beat too is old: listed with the host it beat from, the longest silent first.
    assert [(item.task.uuid, item.hostname) for item in liveness.stale(SILENT, now=later)] == [
        (quiet.uuid, "old-host"),
        (beating.uuid, "agent-7"),
    ]
    assert liveness.beat("00000000-0000-4000-8000-000000000009", "h", 1) is None


def test_failing_a_stale_task_names_its_host_and_last_sign_and_spares_one_that_beat(
    connection: DatabaseConnection, repo: TaskRepository, make_task: Callable[..., Task]
) -> None:
    liveness = TaskLiveness(connection)
    dead, alive = make_task(), make_task()
    liveness.beat(dead.uuid, "host-a", 1)
    liveness.beat(alive.uuid, "host-b", 2)
    later = utcnow() + timedelta(hours=1)
    # `alive` beat again in the meantime (seen from `later`, a minute ago): left running.
    with connection.engine.begin() as raw:
        raw.execute(
            update(TaskHeartbeat)
            .where(TaskHeartbeat.task_uuid == alive.uuid)
            .values(beat_at=later - timedelta(minutes=1))
        )
    assert liveness.fail_stale(alive.uuid, SILENT, now=later) is False
    assert liveness.fail_stale(dead.uuid, SILENT, now=later) is True
    failed = repo.get_by_uuid(dead.uuid)
    assert failed is not None and failed.status == "failed" and failed.completed_at == later
    assert failed.error_message is not None and failed.error_message.startswith(f"{NO_SIGN_OF_LIFE} from host-a since ")
    assert liveness.fail_stale(dead.uuid, SILENT, now=later) is False  # not running any more
    still = repo.get_by_uuid(alive.uuid)
    assert still is not None and still.status == "running"
    # The agent was alive after all: its next beat sees the failure, and the task goes on, recorded.
    status, message = liveness.beat(dead.uuid, "host-a", 1) or ("", None)
    assert (status, message) == ("failed", failed.error_message)
    assert liveness.revive(dead.uuid, failed.error_message) is True
    revived = repo.get_by_uuid(dead.uuid)
    assert revived is not None and revived.status == "running" and revived.completed_at is None
    assert revived.error_message is not None and revived.error_message.startswith(failed.error_message)
    assert "the agent was alive and went on" in revived.error_message
    # A finish written meanwhile stands: nothing to revive.
    repo.complete(dead.uuid)
    assert liveness.revive(dead.uuid, failed.error_message) is False


def test_a_resumed_task_whose_last_beat_is_old_is_judged_by_its_newer_row(
    connection: DatabaseConnection, repo: TaskRepository, make_task: Callable[..., Task]
) -> None:
    liveness = TaskLiveness(connection)
    task = make_task()
    liveness.beat(task.uuid, "host", 1)
    with connection.engine.begin() as raw:
        raw.execute(
            update(TaskHeartbeat)
            .where(TaskHeartbeat.task_uuid == task.uuid)
            .values(beat_at=utcnow() - timedelta(days=2))
        )
    repo.update(task.uuid, {"status": "running"})  # resumed now: its row moved on
    assert liveness.stale(SILENT) == [] and liveness.count_stale(SILENT) == 0
    assert liveness.fail_stale(task.uuid, SILENT) is False
    assert [item.task.uuid for item in liveness.stale(SILENT, now=utcnow() + timedelta(hours=1))] == [task.uuid]
    assert liveness.count_stale(SILENT, now=utcnow() + timedelta(hours=1)) == 1
    assert liveness.stale(SILENT, now=utcnow() + timedelta(hours=1), among=[str(uuid.uuid4())]) == []
