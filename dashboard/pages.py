"""The HTML pages: rendered on the server, readable without JavaScript."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Annotated, Any
from urllib.parse import parse_qs, urlencode

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, PackageLoader, StrictUndefined, pass_context, select_autoescape
from jinja2.runtime import Context
from starlette.requests import ClientDisconnect

from dashboard.access import SESSION_COOKIE, Access
from dashboard.chart import bar_chart
from dashboard.readers import ALL_STATUSES, DEFAULT_DAYS, RUNNING_SHOWN, TOP_USERS, DashboardReader, task_record
from dashboard.wiring import DashboardSettings, Zone, access, reader, settings
from db.models import COUNTER_COLUMNS, Task, TaskStatus
from db.redaction import redact_secrets
from db.repositories.task_usage import MAX_DAYS, time_zone

logger = logging.getLogger(__name__)
router = APIRouter(include_in_schema=False)

PAGE_SIZE = 50
MAX_FORM_BYTES = 4096
COMMON_ZONES = (
    "UTC",
    "Asia/Tokyo",
    "Asia/Kolkata",
    "Europe/London",
    "Europe/Berlin",
    "America/New_York",
    "America/Los_Angeles",
    "Australia/Sydney",
)

Reader = Annotated[DashboardReader, Depends(reader)]
Settings = Annotated[DashboardSettings, Depends(settings)]
Rule = Annotated[Access, Depends(access)]


@pass_context
def _when(context: Context, value: datetime | None) -> str:
    if value is None:
        return "—"
    return value.astimezone(time_zone(context["zone"])).strftime("%Y-%m-%d %H:%M:%S")


def _age(start: datetime | None, now: datetime) -> str:
    if start is None:
        return "—"
    seconds = max(0, int((now - start).total_seconds()))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m {seconds}s"


def _number(value: int | None) -> str:
    return "—" if value is None else f"{value:,}"


def _redact(value: str | None) -> str:
    return "" if value is None else redact_secrets(value)


templates = Environment(
    loader=PackageLoader("dashboard", "templates"),
    autoescape=select_autoescape(default=True, default_for_string=True),
    undefined=StrictUndefined,
)
templates.filters.update(when=_when, age=_age, task_name=Task.reference, number=_number, redact=_redact)


def _signed_in(request: Request) -> bool:
    return bool(getattr(request.state, "signed_in", False))


def render(request: Request, name: str, *, status_code: int = 200, **context: Any) -> HTMLResponse:
    """`name` rendered with what every page needs: the section, the zone, whether a sign-out applies."""
    rule: Access = request.app.state.access
    page_settings: DashboardSettings = request.app.state.settings
    context.setdefault("zone", page_settings.zone)
    context.setdefault("notice", request.app.state.source.notice if _signed_in(request) else None)
    context.setdefault("section", "")
    html = templates.get_template(name).render(signed_in=rule.required, **context)
    return HTMLResponse(html, status_code=status_code)


def error_page(
    request: Request, status_code: int, title: str, message: str, headers: dict[str, str] | None = None
) -> HTMLResponse:
    page = render(request, "error.html", status_code=status_code, title=title, message=message)
    page.headers.update(headers or {})
    return page


@router.get("/", response_class=HTMLResponse)
def overview(request: Request, tasks: Reader, page_settings: Settings) -> HTMLResponse:
    return render(
        request,
        "overview.html",
        section="overview",
        overview=tasks.overview(),
        refresh_seconds=page_settings.refresh_seconds,
        running_shown=RUNNING_SHOWN,
    )


@router.get("/tasks", response_class=HTMLResponse)
def task_list(request: Request, tasks: Reader, status: str = "", user: str = "", after: str = "") -> HTMLResponse:
    chosen_status = TaskStatus.parse(status).value if status else None
    chosen_user = user or None
    page = tasks.page(status=chosen_status, user=chosen_user, after=after or None, limit=PAGE_SIZE)
    filters = {name: value for name, value in (("status", chosen_status), ("user", chosen_user)) if value}
    return render(
        request,
        "tasks.html",
        section="tasks",
        page=page,
        statuses=ALL_STATUSES,
        status=chosen_status,
        user=chosen_user,
        after=after,
        first_link="/tasks?" + urlencode(filters),
        next_link="/tasks?" + urlencode({**filters, "after": page.next_after or ""}),
    )


@router.get("/tasks/{uuid}", response_class=HTMLResponse)
def task_page(request: Request, tasks: Reader, uuid: str) -> HTMLResponse:
    task = tasks.task(uuid)
    return render(
        request,
        "task.html",
        section="tasks",
        task=task,
        record=task_record(task, tasks.stale([task])),
        earlier=tasks.earlier_runs(task),
        numbers=(*COUNTER_COLUMNS, "context_length"),
    )


@router.get("/usage", response_class=HTMLResponse)
def usage(request: Request, tasks: Reader, zone: Zone, user: str = "", days: str = str(DEFAULT_DAYS)) -> HTMLResponse:
    if not days.isdecimal() or not 1 <= int(days) <= MAX_DAYS:
        raise ValueError(f"days must be a whole number from 1 to {MAX_DAYS}, got {days!r}")
    day_count = int(days)
    history = tasks.history(user or None, day_count, zone)
    title = f"Tokens per day in {zone}" + (f" for {user}" if user else "")
    return render(
        request,
        "usage.html",
        section="usage",
        zone=zone,
        user=user,
        days=day_count,
        max_days=MAX_DAYS,
        common_zones=COMMON_ZONES,
        usage=tasks.usage(zone, TOP_USERS),
        sums_max_age=request.app.state.settings.sums_max_age,
        chart=bar_chart(history.days, title=title),
    )


@router.get("/api", response_class=HTMLResponse)
def api_page(request: Request, rule: Rule) -> HTMLResponse:
    routes = []
    for path, methods in request.app.openapi()["paths"].items():
        for method, operation in methods.items():
            parameters = [
                {
                    "name": parameter["name"],
                    "where": parameter["in"],
                    "required": parameter.get("required", False),
                    "type": _schema_type(parameter.get("schema", {})),
                    "description": parameter.get("description", ""),
                }
                for parameter in operation.get("parameters", [])
            ]
            routes.append(
                {
                    "method": method.upper(),
                    "path": path,
                    "summary": operation.get("summary", ""),
                    "description": operation.get("description", ""),
                    "parameters": parameters,
                }
            )
    return render(request, "api.html", section="api", routes=routes, token_required=rule.required)


def _schema_type(schema: dict[str, Any]) -> str:
    if "anyOf" in schema:
        return " or ".join(_schema_type(option) for option in schema["anyOf"])
    if "enum" in schema:
        return " | ".join(str(value) for value in schema["enum"])
    if "$ref" in schema:
        return str(schema["$ref"]).rsplit("/", 1)[-1]
    bounds = [f"{word} {schema[key]}" for key, word in (("minimum", "≥"), ("maximum", "≤")) if key in schema]
    return " ".join([str(schema.get("type", "any")), *bounds])


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request, rule: Rule, next: str = "/") -> Response:
    if not rule.required:
        return RedirectResponse(_local(next), status_code=303)
    return render(request, "login.html", next=_local(next), failed=False)


@router.post("/login", response_class=HTMLResponse)
async def login(request: Request, rule: Rule) -> Response:
    client = request.client.host if request.client else "unknown"
    try:
        body = await _form_body(request)
    except ClientDisconnect:
        return Response(status_code=400)  # nobody is there to read an answer
    # From here to the failure's record nothing awaits: attempts sent at once are counted one after another.
    wait = rule.throttle.wait_for(client)
    if wait:
        # Not even looked at: waiting, not guessing faster, is what the client can do.
        seconds = int(wait) + 1
        message = f"Too many failed sign-ins: try again in {seconds} s."
        return error_page(request, 429, "Too many attempts", message, headers={"Retry-After": str(seconds)})
    if body is None:
        return error_page(request, 413, "Too large", "The sign-in form is larger than any token.")
    form = parse_qs(body.decode("utf-8", errors="replace"), max_num_fields=4)
    next_page = _local(form.get("next", ["/"])[0])
    if not rule.accepts_token(form.get("token", [""])[0]):
        failures = rule.throttle.failed(client)
        logger.warning("dashboard: failed sign-in from %s (%d in a row)", client, failures)
        return render(request, "login.html", status_code=401, next=next_page, failed=True)
    rule.throttle.succeeded(client)
    response = RedirectResponse(next_page, status_code=303)
    response.set_cookie(
        SESSION_COOKIE,
        rule.sessions.open(),
        httponly=True,
        samesite="strict",
        # https as the client sees it: behind a trusted proxy, as its X-Forwarded-Proto says (see server.py).
        secure=request.url.scheme == "https",
        max_age=int(rule.sessions.lifetime),
    )
    return response


async def _form_body(request: Request) -> bytes | None:
    """The sign-in form's bytes, or None when it is larger than any form (read no further than that)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_FORM_BYTES:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


@router.post("/logout")
def logout(request: Request, rule: Rule) -> Response:
    rule.sessions.end(request.cookies.get(SESSION_COOKIE))
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE)
    return response


def _local(target: str) -> str:
    """`target` when it is a path on this site, else `/`: a sign-in never sends the browser elsewhere."""
    if not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target
