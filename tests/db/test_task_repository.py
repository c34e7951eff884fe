"""TaskRepository behaviour, run on in-memory SQLite, file SQLite and PostgreSQL."""

from __future__ import annotations

import logging
import multiprocessing
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import inspect, text

from db import DatabaseConnection, Task, TaskAlreadyExistsError, TaskRepository, TaskStatus
from db.models.task import INT_MAX
from tests.support.data import count_rows, task_data
from tests.support.workers import add_statistics_fresh, add_statistics_inherited

MISSING = "00000000-0000-4000-8000-000000000000"


def test_create_and_get(repo: TaskRepository) -> None:
    data = task_data(user="alice", llm_provider="openai", model="gpt-4o", context_length=128000, process_id=4242)
    created = repo.create(data)
    fetched = repo.get_by_uuid(data["uuid"])
    assert fetched is not None
    assert fetched.to_dict() == created.to_dict()
    assert (fetched.user, fetched.model, fetched.context_length) == ("alice", "gpt-4o", 128000)


def test_get_missing_is_none(repo: TaskRepository) -> None:
    assert repo.get_by_uuid(MISSING) is None


def test_returned_tasks_are_detached_and_loaded(repo: TaskRepository, connection: DatabaseConnection) -> None:
    task = repo.create(task_data())
    fetched = repo.get_by_uuid(task.uuid)
    listed = repo.list_by_status("running")
    DatabaseConnection.reset()
    for item in (task, fetched, listed[0]):
        assert item is not None
        assert inspect(item).detached
        assert item.to_dict()["uuid"] == task.uuid


def test_create_refuses_unknown_and_missing_fields(repo: TaskRepository, connection: DatabaseConnection) -> None:
    with pytest.raises(ValueError, match="unknown task fields: colour, priority"):
        repo.create(task_data(priority=1, colour="red"))
    with pytest.raises(ValueError, match="missing required task fields: owner, task_id"):
        repo.create({k: v for k, v in task_data().items() if k not in ("owner", "task_id")})
    assert count_rows(connection) == 0


def test_duplicate_uuid_leaves_the_database_unchanged(repo: TaskRepository, connection: DatabaseConnection) -> None:
    original = repo.create(task_data(owner="first"))
    with pytest.raises(TaskAlreadyExistsError, match=original.uuid) as caught:
        repo.create(task_data(uuid=original.uuid, owner="second"))
    assert isinstance(caught.value, ValueError)
    stored = repo.get_by_uuid(original.uuid)
    assert stored is not None and stored.to_dict() == original.to_dict()
    assert count_rows(connection) == 1


def test_update_sets_fields(repo: TaskRepository) -> None:
    task = repo.create(task_data())
    finished = datetime(2025, 6, 1, 12, tzinfo=UTC)
    updated = repo.update(task.uuid, {"status": "stopped", "completed_at": finished, "hostname": "h"})
    assert updated is not None
    assert (updated.status, updated.completed_at, updated.hostname) == ("stopped", finished, "h")
    cleared = repo.update(task.uuid, {"completed_at": None, "status": TaskStatus.RUNNING})
    assert cleared is not None and cleared.completed_at is None and cleared.status == "running"


def test_update_refuses_immutable_and_unknown_keys(repo: TaskRepository) -> None:
    task = repo.create(task_data())
    for key in ("uuid", "created_at", "updated_at"):
        with pytest.raises(ValueError, match=f"cannot be updated: {key}"):
            repo.update(task.uuid, {key: task.to_dict()[key]})
    with pytest.raises(ValueError, match="unknown task fields: nope"):
        repo.update(task.uuid, {"nope": 1})
    stored = repo.get_by_uuid(task.uuid)
    assert stored is not None and stored.to_dict() == task.to_dict()


@pytest.mark.parametrize(
    ("operation", "call"),
    [
        ("update", lambda repo: repo.update(MISSING, {"hostname": "x"})),
        ("update_status", lambda repo: repo.update_status(MISSING, "completed")),
        ("update_statistics", lambda repo: repo.update_statistics(MISSING, llm_calls=1)),
        ("update_statistics", lambda repo: repo.update_statistics(MISSING)),
        ("complete", lambda repo: repo.complete(MISSING)),
        ("fail", lambda repo: repo.fail(MISSING, "boom")),
        ("delete", lambda repo: repo.delete(MISSING)),
    ],
)
def test_missing_task_returns_none_or_false_and_warns(
    repo: TaskRepository, caplog: pytest.LogCaptureFixture, operation: str, call: Callable[[TaskRepository], Any]
) -> None:
    with caplog.at_level(logging.WARNING, logger="db.repositories.task_repository"):
        result = call(repo)
    assert result is None or result is False
    assert f"{operation}: task {MISSING} does not exist" in caplog.text


def test_update_status_sets_completed_at_once(repo: TaskRepository) -> None:
    task = repo.create(task_data())
    assert repo.update_status(task.uuid, "running")
    running = repo.get_by_uuid(task.uuid)
    assert running is not None and running.completed_at is None
    assert repo.update_status(task.uuid, "stopped", error_message="interrupted")
    stopped = repo.get_by_uuid(task.uuid)
    assert stopped is not None and stopped.completed_at is not None
    assert (stopped.status, stopped.error_message) == ("stopped", "interrupted")
    assert repo.update_status(task.uuid, TaskStatus.FAILED)
    failed = repo.get_by_uuid(task.uuid)
    assert failed is not None
    assert failed.completed_at == stopped.completed_at
    assert failed.error_message == "interrupted"


def test_complete_and_fail_stamp_now(repo: TaskRepository) -> None:
    first, second = repo.create(task_data()), repo.create(task_data())
    before = datetime.now(UTC)
    assert repo.complete(first.uuid)
    assert repo.fail(second.uuid, "LLM timeout\nTraceback ...")
    after = datetime.now(UTC)
    done, failed = repo.get_by_uuid(first.uuid), repo.get_by_uuid(second.uuid)
    assert done is not None and failed is not None
    assert done.status == "completed" and failed.status == "failed"
    assert failed.error_message == "LLM timeout\nTraceback ..."
    for task in (done, failed):
        assert task.completed_at is not None and before <= task.completed_at <= after


def test_update_statistics_adds(repo: TaskRepository) -> None:
    task = repo.create(task_data())
    assert repo.update_statistics(task.uuid, llm_calls=1, tool_calls=2, tokens=300, compressions=0)
    assert repo.update_statistics(task.uuid, llm_calls=2, tokens=50, compressions=1)
    assert repo.update_statistics(task.uuid)
    stored = repo.get_by_uuid(task.uuid)
    assert stored is not None
    assert (stored.llm_call_count, stored.tool_call_count, stored.total_tokens, stored.compression_count) == (
        3,
        2,
        350,
        1,
    )


@pytest.mark.parametrize(
    "amounts",
    [{"llm_calls": -1}, {"tokens": 1.5}, {"tool_calls": "3"}, {"compressions": True}, {"tokens": INT_MAX + 1}],
)
def test_update_statistics_refuses_bad_amounts(repo: TaskRepository, amounts: dict[str, Any]) -> None:
    task = repo.create(task_data())
    with pytest.raises(ValueError, match="increment must be an integer"):
        repo.update_statistics(task.uuid, **amounts)
    stored = repo.get_by_uuid(task.uuid)
    assert stored is not None and stored.to_dict() == task.to_dict()


def test_counter_overflow_is_refused_and_nothing_written(repo: TaskRepository) -> None:
    task = repo.create(task_data(total_tokens=INT_MAX - 10, llm_call_count=5))
    assert repo.update_statistics(task.uuid, tokens=10)
    before = repo.get_by_uuid(task.uuid)
    with pytest.raises(ValueError, match="past 2147483647"):
        repo.update_statistics(task.uuid, llm_calls=1, tokens=1)
    after = repo.get_by_uuid(task.uuid)
    assert before is not None and after is not None
    assert after.to_dict() == before.to_dict()
    assert (after.total_tokens, after.llm_call_count) == (INT_MAX, 5)


def _make_listed(repo: TaskRepository) -> list[Task]:
    base = datetime(2025, 3, 1, tzinfo=UTC)
    tasks = []
    for index in range(6):
        created = base + timedelta(minutes=index // 2)  # pairs share a created_at: uuid breaks the tie
        tasks.append(repo.create(task_data(created_at=created, user="bob" if index % 3 else "alice")))
    return tasks


def test_list_by_status_is_newest_first_then_uuid(repo: TaskRepository) -> None:
    tasks = _make_listed(repo)
    repo.complete(tasks[0].uuid)
    expected = sorted(tasks[1:], key=lambda t: (-t.created_at.timestamp(), t.uuid))
    assert [t.uuid for t in repo.list_by_status("running")] == [t.uuid for t in expected]
    page = repo.list_by_status("running", limit=2, offset=1)
    assert [t.uuid for t in page] == [t.uuid for t in expected[1:3]]
    assert [t.uuid for t in repo.list_by_status("completed")] == [tasks[0].uuid]
    assert repo.list_by_status("failed") == []


def test_list_by_user(repo: TaskRepository) -> None:
    tasks = _make_listed(repo)
    expected = sorted((t for t in tasks if t.user == "alice"), key=lambda t: (-t.created_at.timestamp(), t.uuid))
    assert [t.uuid for t in repo.list_by_user("alice")] == [t.uuid for t in expected]
    assert repo.list_by_user("nobody") == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"limit": 0}, "limit"), ({"limit": 1001}, "limit"), ({"offset": -1}, "offset"), ({"limit": "5"}, "limit")],
)
def test_list_bounds(repo: TaskRepository, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        repo.list_by_status("running", **kwargs)
    with pytest.raises(ValueError, match=message):
        repo.list_by_user("alice", **kwargs)


def test_list_by_status_refuses_unknown_status(repo: TaskRepository) -> None:
    with pytest.raises(ValueError, match="unknown task status"):
        repo.list_by_status("done")


def test_delete(repo: TaskRepository, connection: DatabaseConnection) -> None:
    task = repo.create(task_data())
    assert repo.delete(task.uuid)
    assert repo.get_by_uuid(task.uuid) is None
    assert not repo.delete(task.uuid)
    assert count_rows(connection) == 0


@pytest.mark.parametrize(
    "call",
    [
        lambda repo, key: repo.get_by_uuid(key),
        lambda repo, key: repo.update(key, {}),
        lambda repo, key: repo.update_status(key, "completed"),
        lambda repo, key: repo.update_statistics(key, llm_calls=1),
        lambda repo, key: repo.complete(key),
        lambda repo, key: repo.fail(key, "x"),
        lambda repo, key: repo.delete(key),
    ],
)
@pytest.mark.parametrize("key", ["", "123", "g" * 32, "'; DROP TABLE tasks; --"])
def test_every_method_refuses_a_non_uuid(
    repo: TaskRepository, connection: DatabaseConnection, call: Callable[[TaskRepository, str], Any], key: str
) -> None:
    repo.create(task_data())
    with pytest.raises(ValueError, match="not a valid UUID"):
        call(repo, key)
    assert count_rows(connection) == 1


INVALID_CREATES = [
    ({"status": "paused"}, "unknown task status"),
    ({"owner": "o" * 256}, "owner is 256 characters long"),
    ({"model": "m" * 101}, "model is 101 characters long"),
    ({"started_at": datetime(2025, 1, 1)}, "timezone-aware"),  # noqa: DTZ001
    ({"total_tokens": INT_MAX + 1}, "total_tokens must be in"),
    ({"context_length": "big"}, "context_length must be an integer"),
    ({"uuid": "xyz"}, "not a valid UUID"),
    ({"task_source": None}, "missing required task fields: task_source"),
]


@pytest.mark.parametrize(("overrides", "message"), INVALID_CREATES)
def test_invalid_input_is_refused_the_same_way_with_nothing_written(
    repo: TaskRepository, connection: DatabaseConnection, overrides: dict[str, Any], message: str
) -> None:
    existing = repo.create(task_data())
    with pytest.raises(ValueError, match=message):
        repo.create(task_data(**overrides))
    field, value = next(iter(overrides.items()))
    if field not in ("uuid", "task_source"):
        with pytest.raises(ValueError, match=message):
            repo.update(existing.uuid, {field: value})
    assert count_rows(connection) == 1
    stored = repo.get_by_uuid(existing.uuid)
    assert stored is not None and stored.to_dict() == existing.to_dict()


def test_sql_metacharacters_are_data(repo: TaskRepository) -> None:
    nasty = "o'brien\"; DROP TABLE tasks; --"
    task = repo.create(task_data(user=nasty, error_message="\x01\n'\\"))
    assert [t.uuid for t in repo.list_by_user(nasty)] == [task.uuid]


@pytest.mark.parametrize("method", ["fork", "spawn"])
@pytest.mark.parametrize("backend", ["sqlite-file", "postgresql"])
def test_many_processes_add_to_one_task_exactly(
    repo: TaskRepository, connection: DatabaseConnection, method: str
) -> None:
    processes, rounds = 6, 40
    task = repo.create(task_data())
    with connection.engine.connect() as conn:  # the parent holds a pooled connection across the fork
        conn.execute(text("SELECT 1"))
    context = multiprocessing.get_context(method)
    url = connection.config.sqlalchemy_url.render_as_string(hide_password=False)
    workers = [
        context.Process(target=add_statistics_inherited, args=(task.uuid, rounds))
        if method == "fork"
        else context.Process(target=add_statistics_fresh, args=(url, task.uuid, rounds))
        for _ in range(processes)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    assert [worker.exitcode for worker in workers] == [0] * processes
    stored = repo.get_by_uuid(task.uuid)
    total = processes * rounds
    assert stored is not None
    assert (stored.llm_call_count, stored.tool_call_count, stored.total_tokens, stored.compression_count) == (
        total,
        2 * total,
        3 * total,
        total,
    )


def test_an_increment_sent_again_with_its_operation_id_counts_once(
    repo: TaskRepository, make_task: Callable[..., Task], caplog: pytest.LogCaptureFixture
) -> None:
    task, other = make_task(), make_task()
    operation = str(uuid.uuid4())
    assert repo.update_statistics(task.uuid, llm_calls=1, tokens=5, operation_id=operation) is True
    with caplog.at_level(logging.INFO, logger="db.repositories.task_repository"):
        assert repo.update_statistics(task.uuid, llm_calls=1, tokens=5, operation_id=operation.upper()) is True
    assert f"update_statistics: operation {operation} on task {task.uuid} took effect already" in caplog.messages
    stored = repo.get_by_uuid(task.uuid)
    assert stored is not None and (stored.llm_call_count, stored.total_tokens) == (1, 5)
    # An id is the call's, whichever task it names: sent with another task, it adds nothing there either.
    assert repo.update_statistics(other.uuid, llm_calls=1, operation_id=operation) is True
    unchanged = repo.get_by_uuid(other.uuid)
    assert unchanged is not None and unchanged.llm_call_count == 0
    # Without an id, each call is its own.
    assert repo.update_statistics(task.uuid, llm_calls=1) is True
    assert repo.update_statistics(task.uuid, llm_calls=1) is True
    again = repo.get_by_uuid(task.uuid)
    assert again is not None and again.llm_call_count == 3
    with pytest.raises(ValueError, match="not a valid UUID"):
        repo.update_statistics(task.uuid, llm_calls=1, operation_id="not-an-id")


def test_an_id_refused_with_its_increment_is_not_spent(repo: TaskRepository, make_task: Callable[..., Task]) -> None:
    task = make_task()
    missing = "00000000-0000-4000-8000-000000000003"
    operation = str(uuid.uuid4())
    assert repo.update_statistics(missing, llm_calls=1, operation_id=operation) is False
    assert repo.update_statistics(task.uuid, tokens=INT_MAX) is True
    with pytest.raises(ValueError, match="past"):
        repo.update_statistics(task.uuid, tokens=1, operation_id=operation)
    # Neither refusal recorded the id: the same call, once it can be taken, counts.
    assert repo.update_statistics(task.uuid, llm_calls=1, operation_id=operation) is True
    stored = repo.get_by_uuid(task.uuid)
    assert stored is not None and stored.llm_call_count == 1


def test_a_counter_may_reach_int_max_and_not_pass_it(repo: TaskRepository, make_task: Callable[..., Task]) -> None:
    task = make_task()
    assert repo.update_statistics(task.uuid, tokens=INT_MAX) is True
    with pytest.raises(ValueError, match=f"the increments would take a counter of task {task.uuid} past {INT_MAX}"):
        repo.update_statistics(task.uuid, tokens=1)
    with pytest.raises(ValueError, match=rf"tokens increment must be an integer in 0..{INT_MAX}, got {INT_MAX + 1}"):
        repo.update_statistics(task.uuid, tokens=INT_MAX + 1)


def test_earlier_runs_default_limit_order_and_since_boundary(repo: TaskRepository) -> None:
    fields = {"owner": "acme", "repo": "web", "task_type": "issue", "task_id": "5"}
    start = datetime(2026, 1, 1, tzinfo=UTC)
    # Created in one order, completed in the reverse one: the newest completion comes first.
    made = [
        repo.create(
            task_data(
                **fields,
                status="completed",
                created_at=start + timedelta(hours=index),
                completed_at=start + timedelta(days=30 - index),
            )
        )
        for index in range(11)
    ]
    runs = repo.find_previous(task_source="github", **fields)
    assert [run.uuid for run in runs] == [task.uuid for task in made[:10]]
    since = made[3].completed_at
    assert since is not None
    assert [run.uuid for run in repo.find_previous(task_source="github", **fields, since=since)] == [
        task.uuid for task in made[:4]
    ]
    with pytest.raises(ValueError, match=r"^give either a task key or task fields, not both$"):
        repo.find_previous(_Key(), owner="acme")
    with pytest.raises(ValueError, match=r"^statuses must be a non-empty sequence of task statuses$"):
        repo.find_previous(task_source="github", **fields, statuses=())


class _Key:
    def task_fields(self) -> dict[str, str]:
        return {"task_source": "github", "owner": "acme", "repo": "web", "task_type": "issue", "task_id": "5"}


def test_each_operation_logs_what_it_did_at_its_level(repo: TaskRepository, caplog: pytest.LogCaptureFixture) -> None:
    missing = "00000000-0000-4000-8000-000000000001"
    with caplog.at_level(logging.DEBUG, logger="db.repositories.task_repository"):
        task = repo.create(task_data())
        repo.get_by_uuid(missing)
        repo.update(task.uuid, {"model": "m", "hostname": "h"})
        repo.update(missing, {"model": "m"})
        repo.complete(task.uuid)
        repo.fail(missing, "boom")
    said = [(record.levelname, record.getMessage()) for record in caplog.records if record.name.startswith("db.repo")]
    assert said == [
        ("DEBUG", f"created task {task.uuid}"),
        ("DEBUG", f"task {missing} not found"),
        ("DEBUG", f"updated task {task.uuid}: hostname, model"),
        ("WARNING", f"update: task {missing} does not exist"),
        ("DEBUG", f"complete: task {task.uuid}"),
        ("WARNING", f"fail: task {missing} does not exist"),
    ]


def test_update_and_create_name_every_field_they_refuse(repo: TaskRepository, make_task: Callable[..., Task]) -> None:
    task = make_task()
    with pytest.raises(ValueError, match=r"^task fields cannot be updated: created_at, uuid$"):
        repo.update(task.uuid, {"uuid": task.uuid, "created_at": task.created_at})
    with pytest.raises(ValueError, match=r"^unknown task fields: colour, size$"):
        repo.update(task.uuid, {"size": 1, "colour": "red"})
    with pytest.raises(ValueError, match="updated_at"):
        repo.create(task_data(updated_at=datetime.now(UTC)))


def test_listings_give_a_hundred_by_default_and_keep_their_filters_across_pages(repo: TaskRepository) -> None:
    start = datetime(2026, 2, 1, tzinfo=UTC)
    for index in range(101):
        repo.create(task_data(created_at=start + timedelta(seconds=index), status="running", user="ann"))
    assert len(repo.list_tasks()) == 100
    assert len(repo.list_by_user("ann")) == 100
    assert len(repo.list_by_status("running")) == 100
    failed = [
        repo.create(task_data(created_at=start + timedelta(seconds=index), status="failed", user="bob")).uuid
        for index in range(5)
    ]
    newest_failed = failed[::-1]
    page = repo.list_tasks(status="failed", after=newest_failed[0], limit=3)
    assert [task.uuid for task in page] == newest_failed[1:4]


def test_increments_to_a_missing_task_leave_the_connection_clean(
    repo: TaskRepository, make_task: Callable[..., Task]
) -> None:
    missing = "00000000-0000-4000-8000-000000000002"
    for _ in range(3):  # more times than the pool holds idle connections to hand back
        assert repo.update_statistics(missing, llm_calls=1) is False
        assert repo.update_statistics(missing, llm_calls=1, operation_id=str(uuid.uuid4())) is False
    task = make_task()
    assert repo.update_statistics(task.uuid, llm_calls=2) is True
    stored = repo.get_by_uuid(task.uuid)
    assert stored is not None and stored.llm_call_count == 2


def test_keyset_pages_walk_through_tasks_created_at_the_same_instant(repo: TaskRepository) -> None:
    instant = datetime(2026, 3, 1, tzinfo=UTC)
    tied = sorted(repo.create(task_data(created_at=instant)).uuid for _ in range(4))
    older = repo.create(task_data(created_at=instant - timedelta(seconds=1))).uuid
    walked: list[str] = []
    page = repo.list_tasks(limit=1)
    while page:
        walked.append(page[0].uuid)
        page = repo.list_tasks(limit=1, after=walked[-1])
    assert walked == [*tied, older]  # newest first, ties by uuid, none skipped or repeated


def test_counts_name_every_status_even_without_tasks(repo: TaskRepository) -> None:
    assert repo.count_by_status() == dict.fromkeys((status.value for status in TaskStatus), 0)
    repo.create(task_data(status="failed"))
    assert repo.count_by_status() == {**dict.fromkeys((status.value for status in TaskStatus), 0), "failed": 1}


@pytest.mark.parametrize(
    ("limit", "offset", "message"),
    [
        (0, 0, "limit must be an integer 1..1000, got 0"),
        (1001, 0, "limit must be an integer 1..1000, got 1001"),
        (True, 0, "limit must be an integer 1..1000, got True"),
        (10, -1, "offset must be an integer >= 0, got -1"),
        (10, "5", "offset must be an integer >= 0, got '5'"),
    ],
)
def test_a_page_out_of_bounds_is_refused_saying_what_is_allowed(
    repo: TaskRepository, limit: Any, offset: Any, message: str
) -> None:
    with pytest.raises(ValueError) as raised:
        repo.list_tasks(limit=limit, offset=offset)
    assert str(raised.value) == message


def test_the_largest_page_is_allowed(repo: TaskRepository) -> None:
    repo.create(task_data())
    assert len(repo.list_tasks(limit=1000, offset=0)) == 1
