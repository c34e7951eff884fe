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
    insert,
    literal,
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
def compiled(statement: Any, dialect: Dialect) -> Any:
    return statement.compile(dialect=dialect)


def for_driver(statement: Any, dialect: Dialect, parameters: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The statement's SQL in the driver's form and every parameter it takes (its constants included)."""
    done = compiled(statement, dialect)
    return done.string, done.construct_params(parameters)


SELECT_BY_UUID = select(*TASKS.columns).where(TASKS.c.uuid == bindparam("key"))
INSERT_TASK = insert(TASKS).values({name: bindparam(name) for name in COLUMNS})


def _counter_guards(added: tuple[str, ...]) -> list[ColumnElement[bool]]:
    """The task, and room in each counter (added in BIGINT, so that INTEGER cannot overflow)."""
    guards: list[ColumnElement[bool]] = [TASKS.c.uuid == bindparam("key")]
    for name in added:
        guards.append(cast(TASKS.c[name], BigInteger) + bindparam(f"add_{name}", type_=Integer()) <= INT_MAX)
    return guards


def _add_to(added: tuple[str, ...]) -> dict[str, Any]:
    values: dict[str, Any] = {"updated_at": bindparam("now", type_=UTCDateTime())}
    for name in added:
        values[name] = TASKS.c[name] + bindparam(f"add_{name}", type_=Integer())
    return values


def record_operation(insert_factory: Callable[[Table], Any], added: tuple[str, ...]) -> Any:
    """`INSERT INTO task_operations` of the call's id, if its task can take the increments and the id is new."""
    possible = select(cast(bindparam("operation"), UUIDString()), cast(bindparam("now"), UTCDateTime())).where(
        exists().where(*_counter_guards(added))
    )
    return insert_factory(OPERATIONS).from_select(["operation_id", "recorded_at"], possible)


@functools.cache
def add_once_postgresql(added: tuple[str, ...]) -> Any:
    """One statement: record the operation id and add to the counters only if it was new. Both happen in the
    statement's one transaction, so a call sent twice counts once, whichever of its sends took effect."""
    recorded = (
        record_operation(postgresql.insert, added)
        .on_conflict_do_nothing(index_elements=["operation_id"])
        .returning(OPERATIONS.c.operation_id)
        .cte("recorded")
    )
    return (
        update(TASKS)
        .add_cte(recorded)
        .where(*_counter_guards(added), exists(select(recorded.c.operation_id)))
        .values(_add_to(added))
        .returning(literal(1))
    )


@functools.cache
def record_operation_sqlite(added: tuple[str, ...]) -> Any:
    """SQLite takes the two statements in one transaction: this first, then `add_sqlite` if it inserted."""
    return record_operation(lambda table: sqlite.insert(table).prefix_with("OR IGNORE"), added)


@functools.cache
def add_sqlite(added: tuple[str, ...]) -> Any:
    return update(TASKS).where(*_counter_guards(added)).values(_add_to(added))


OPERATION_RECORDED = select(OPERATIONS.c.operation_id).where(
    OPERATIONS.c.operation_id == bindparam("operation", type_=UUIDString())
)
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
