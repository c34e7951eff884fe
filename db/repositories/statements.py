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
from sqlalchemy.dialects import postgresql, sqlite
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


@functools.cache
def add_once_postgresql(added: tuple[str, ...]) -> Any:
    """One statement: record the operation id, add to the counters only if the id was new, and say which of
    the two happened: (1, 1) added; (0, 0) the id was recorded before (an earlier send took effect); (1, 0) the
    id is recorded but the task could not take the increments (missing, or a counter would overflow).
    Both writes are in the statement's one transaction, so a call sent twice counts once."""
    recorded = (
        postgresql.insert(OPERATIONS)
        .values(operation_id=bindparam("operation"), recorded_at=bindparam("now"))
        .on_conflict_do_nothing(index_elements=["operation_id"])
        .returning(literal_column("1"))
        .cte("recorded")
    )
    added_rows = (
        update(TASKS)
        .where(*_counter_guards(added), exists(select(literal_column("1")).select_from(recorded)))
        .values(_add_to(added))
        .returning(literal_column("1"))
        .cte("added")
    )
    return select(
        select(func.count()).select_from(recorded).scalar_subquery(),
        select(func.count()).select_from(added_rows).scalar_subquery(),
    )


# SQLite takes the steps in one transaction: this first, then `add_sqlite` if it inserted a row.
RECORD_OPERATION_SQLITE = (
    sqlite.insert(OPERATIONS)
    .prefix_with("OR IGNORE")
    .values(operation_id=bindparam("operation", type_=UUIDString()), recorded_at=bindparam("now", type_=UTCDateTime()))
)


@functools.cache
def add_sqlite(added: tuple[str, ...]) -> Any:
    return update(TASKS).where(*_counter_guards(added)).values(_add_to(added))


FORGET_OPERATION = OPERATIONS.delete().where(OPERATIONS.c.operation_id == bindparam("operation", type_=UUIDString()))
EXPIRE_OPERATIONS = OPERATIONS.delete().where(OPERATIONS.c.recorded_at < bindparam("before", type_=UTCDateTime()))


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
