"""The statements of the hot calls, built and compiled once per dialect, and tasks made from their rows without
a session: per call, what lies between the caller and the driver is a dict of parameters and one execute."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Integer,
    Table,
    bindparam,
    cast,
    exists,
    func,
    insert,
    literal_column,
    select,
    update,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import class_mapper, make_transient_to_detached

from db.models import INT_MAX, Task, TaskOperation
from db.models.types import UTCDateTime, UUIDString

TASKS: Table = Task.__table__  # type: ignore[assignment]
OPERATIONS: Table = TaskOperation.__table__  # type: ignore[assignment]
COLUMNS = tuple(column.key for column in TASKS.columns)


@functools.cache
def sql(statement: Any, dialect: Dialect) -> str:
    """The statement's SQL in the driver's form, compiled once. Every statement here binds only named
    parameters (constants are written into the SQL), so the caller's dict is what the driver takes."""
    return str(statement.compile(dialect=dialect))


SELECT_BY_UUID = select(*TASKS.columns).where(TASKS.c.uuid == bindparam("key"))
INSERT_TASK = insert(TASKS).values({name: bindparam(name) for name in COLUMNS})


def _counter_guards(added: tuple[str, ...]) -> list[ColumnElement[bool]]:
    """The task, and room in each counter (added in BIGINT, so that INTEGER cannot overflow)."""
    guards: list[ColumnElement[bool]] = [TASKS.c.uuid == bindparam("key")]
    for name in added:
        added_in_bigint = cast(TASKS.c[name], BigInteger) + bindparam(f"add_{name}", type_=Integer())
        guards.append(added_in_bigint <= literal_column(str(INT_MAX)))
    return guards


def _add_to(added: tuple[str, ...]) -> dict[str, Any]:
    values: dict[str, Any] = {"updated_at": bindparam("now", type_=UTCDateTime())}
    for name in added:
        values[name] = TASKS.c[name] + bindparam(f"add_{name}", type_=Integer())
    return values


def _id_not_recorded() -> ColumnElement[bool]:
    return ~exists().where(OPERATIONS.c.operation_id == bindparam("operation", type_=UUIDString()))


@functools.cache
def add_once_postgresql(added: tuple[str, ...]) -> Any:
    """One statement: add to the counters if the operation id is not recorded yet, and record it only then;
    its one row says whether it added (1) or not (0: the id was recorded before, the task is missing, or a
    counter would overflow; a refused call leaves its id unused). Both writes are in the statement's one
    transaction, so a call sent twice counts once; two sends running at once collide on the id's unique key
    and the later one fails whole. The id's time is the server's, as is the expiry's."""
    added_rows = (
        update(TASKS)
        .where(*_counter_guards(added), _id_not_recorded())
        .values(_add_to(added))
        .returning(literal_column("1"))
        .cte("added")
    )
    recorded = (
        insert(OPERATIONS)
        .from_select(
            ["operation_id", "recorded_at"],
            select(cast(bindparam("operation"), UUIDString()), func.now()).select_from(added_rows),
        )
        .returning(literal_column("1"))
        .cte("recorded")
    )
    return select(func.count()).select_from(recorded)


@functools.cache
def add_once_sqlite(added: tuple[str, ...]) -> Any:
    """SQLite: the UPDATE; then, in the same transaction, `RECORD_OPERATION_SQLITE` if it added."""
    return update(TASKS).where(*_counter_guards(added), _id_not_recorded()).values(_add_to(added))


RECORD_OPERATION_SQLITE = insert(OPERATIONS).values(
    operation_id=bindparam("operation", type_=UUIDString()), recorded_at=bindparam("now", type_=UTCDateTime())
)
OPERATION_RECORDED = select(OPERATIONS.c.operation_id).where(
    OPERATIONS.c.operation_id == bindparam("operation", type_=UUIDString())
)
EXPIRY_BATCH = 5000


def expire_operations(postgresql_server: bool) -> Any:
    """Delete up to EXPIRY_BATCH ids recorded before the retention began (by the server's clock on PostgreSQL,
    skipping rows another expiry holds)."""
    if postgresql_server:
        cutoff: Any = func.now() - bindparam("retention")
        expired = select(OPERATIONS.c.operation_id).where(OPERATIONS.c.recorded_at < cutoff)
        expired = expired.limit(EXPIRY_BATCH).with_for_update(skip_locked=True)
    else:
        cutoff = bindparam("before", type_=UTCDateTime())
        expired = select(OPERATIONS.c.operation_id).where(OPERATIONS.c.recorded_at < cutoff).limit(EXPIRY_BATCH)
    return OPERATIONS.delete().where(OPERATIONS.c.operation_id.in_(expired))


@functools.cache
def _row_processors(dialect: Dialect) -> tuple[Callable[[Any], Any] | None, ...]:
    return tuple(column.type.dialect_impl(dialect).result_processor(dialect, None) for column in TASKS.columns)


_NEW_TASK = class_mapper(Task).class_manager.new_instance


def task_from_row(row: Sequence[Any], dialect: Dialect) -> Task:
    """A detached, fully loaded Task from a row of `SELECT_BY_UUID` as the driver returned it."""
    values = {
        name: value if process is None else process(value)
        for name, value, process in zip(COLUMNS, row, _row_processors(dialect), strict=True)
    }
    return detached(values)


def detached(values: dict[str, Any]) -> Task:
    """A Task holding `values` (every column, in stored form) as if loaded from its row, in no session."""
    task = _NEW_TASK()
    task.__dict__.update(values)
    make_transient_to_detached(task)
    return task
