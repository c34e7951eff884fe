"""The JSON API: the dashboard's data for programs, under the agent's token-usage field names."""

from __future__ import annotations

from datetime import date, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Response
from pydantic import BaseModel, Field

from dashboard.readers import DashboardReader, task_record
from dashboard.wiring import Zone, reader
from db.models import TaskStatus
from db.repositories.task_repository import MAX_PAGE
from db.repositories.task_usage import MAX_DAYS
from ops.usage_export import usage_csv

router = APIRouter(prefix="/api", tags=["api"])

Reader = Annotated[DashboardReader, Depends(reader)]
TaskId = Annotated[str, Path(description="The task's UUID.", max_length=64)]
UserName = Annotated[str, Path(description="The user's name as the agent records it.", max_length=255)]


class ErrorOut(BaseModel):
    detail: Any = Field(description="What was wrong: a message, or for 422 the parameters that were refused.")


class TaskOut(BaseModel):
    uuid: str
    task_source: str
    owner: str
    repo: str
    task_type: str
    task_id: str
    status: TaskStatus
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    completed_at: datetime | None
    process_id: int | None
    hostname: str | None
    llm_provider: str | None
    model: str | None
    context_length: int | None
    llm_call_count: int
    tool_call_count: int
    total_tokens: int
    compression_count: int
    error_message: str | None = Field(description="With any password in it masked.")
    user: str | None
    stale: bool = Field(description="Running with no sign of life from its agent for the dashboard's --stale-minutes.")


class TaskPageOut(BaseModel):
    tasks: list[TaskOut]
    next_after: str | None = Field(description="Pass as `after` for the next page; null on the last page.")


class HistoryOut(BaseModel):
    task: str
    earlier_runs: list[TaskOut] = Field(description="Runs of the same issue or merge request created before it.")


class UserUsageOut(BaseModel):
    user: str | None = Field(description="null for tasks recorded without a user.")
    today: int
    this_week: int = Field(description="Since Monday 00:00 in the time zone asked for.")
    this_month: int
    total: int


class UsageSummaryOut(BaseModel):
    zone: str
    as_of: datetime = Field(description="When these sums were computed; they are reused for `--usage-cache` seconds.")
    users: list[UserUsageOut] = Field(description="Every user, the month's largest first.")
    top_users: list[UserUsageOut] = Field(description="The users with the most tokens this month.")


class DayOut(BaseModel):
    date: date
    tokens: int


class UsageHistoryOut(BaseModel):
    user: str
    zone: str
    days: list[DayOut] = Field(description="Oldest first, today last, days without tokens included.")


CSV_COLUMNS = "user,day,tokens: one row per user and calendar day, days without tokens included."
ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorOut, "description": "A parameter that cannot be used (a malformed UUID, an unknown zone)."},
    404: {"model": ErrorOut, "description": "No such task or user."},
    503: {"model": ErrorOut, "description": "The database cannot be read now."},
}


@router.get("/tasks", response_model=TaskPageOut, responses=ERRORS, summary="Tasks, newest first, one page")
def list_tasks(
    tasks: Reader,
    status: Annotated[TaskStatus | None, Query(description="Only tasks in this status.")] = None,
    user: Annotated[str | None, Query(description="Only this user's tasks.", max_length=255)] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE, description="Tasks per page.")] = 50,
    after: Annotated[str | None, Query(description="`next_after` of the previous page.", max_length=64)] = None,
) -> dict[str, Any]:
    page = tasks.page(status=status, user=user, after=after, limit=limit)
    stale = tasks.stale(page.tasks)
    return {"tasks": [task_record(task, stale) for task in page.tasks], "next_after": page.next_after}


@router.get("/tasks/{uuid}", response_model=TaskOut, responses=ERRORS, summary="One task, every column")
def get_task(tasks: Reader, uuid: TaskId) -> dict[str, Any]:
    task = tasks.task(uuid)
    return task_record(task, tasks.stale([task]))


@router.get(
    "/tasks/{uuid}/history", response_model=HistoryOut, responses=ERRORS, summary="Earlier runs of the task's issue"
)
def task_history(tasks: Reader, uuid: TaskId) -> dict[str, Any]:
    task = tasks.task(uuid)
    runs = tasks.earlier_runs(task)
    stale = tasks.stale(runs)
    return {"task": task.uuid, "earlier_runs": [task_record(run, stale) for run in runs]}


@router.get(
    "/token-usage/summary",
    response_model=UsageSummaryOut,
    responses=ERRORS,
    summary="Tokens of every user today, this week, this month and in all",
)
def usage_summary(
    tasks: Reader,
    zone: Zone,
    top: Annotated[int, Query(ge=1, le=100, description="How many top users.")] = 10,
) -> dict[str, Any]:
    usage = tasks.usage(zone, top)
    return {"zone": usage.zone, "as_of": usage.as_of, "users": usage.users, "top_users": usage.top_users}


@router.get(
    "/token-usage/export.csv",
    responses={200: {"content": {"text/csv": {"schema": {"type": "string"}}}, "description": CSV_COLUMNS}, **ERRORS},
    summary="Tokens per user and calendar day, as CSV, for billing",
)
def usage_export(
    tasks: Reader,
    zone: Zone,
    days: Annotated[int, Query(ge=1, le=MAX_DAYS, description="Days, today included.")] = 30,
    user: Annotated[str | None, Query(description="Only this user.", max_length=255)] = None,
) -> Response:
    body = usage_csv(tasks.usage_by_day(days, zone, user))
    headers = {"Content-Disposition": 'attachment; filename="token-usage.csv"'}
    return Response(body, media_type="text/csv; charset=utf-8", headers=headers)


@router.get("/token-usage/{user}", response_model=UserUsageOut, responses=ERRORS, summary="One user's tokens by period")
def user_usage(tasks: Reader, user: UserName, zone: Zone) -> dict[str, Any]:
    return tasks.user_usage(user, zone)


@router.get(
    "/token-usage/{user}/history",
    response_model=UsageHistoryOut,
    responses=ERRORS,
    summary="One user's tokens per day",
)
def user_usage_history(
    tasks: Reader,
    user: UserName,
    zone: Zone,
    days: Annotated[int, Query(ge=1, le=MAX_DAYS, description="How many days, today included.")] = 30,
) -> dict[str, Any]:
    history = tasks.history(user, days, zone)
    return {
        "user": user,
        "zone": history.zone,
        "days": [{"date": day, "tokens": tokens} for day, tokens in history.days],
    }
