"""The dashboard application: pages and JSON API over the tasks table, read-only, behind the access rule."""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from importlib.resources import files
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from sqlalchemy.exc import SQLAlchemyError
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from dashboard import api, metrics, pages
from dashboard.access import SESSION_COOKIE, Access
from dashboard.metrics import RequestMetrics
from dashboard.readers import DEFAULT_DAYS, TOP_USERS, DashboardReader, NotFoundError
from dashboard.refreshing import RefreshingValues
from dashboard.source import DatabaseSource
from dashboard.wiring import DashboardSettings
from db.connection import describe_driver_error
from db.errors import DatabaseError
from db.redaction import redact_secrets

logger = logging.getLogger(__name__)

# Reachable without the token: signing in, the health check, the style sheet.
OPEN_PATHS = frozenset({"/login", "/healthz", "/static/style.css"})
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def _wants_json(request: Request) -> bool:
    return request.url.path.startswith("/api/") or request.url.path in {"/openapi.json", "/healthz"}


def _problem(request: Request, status_code: int, title: str, message: str) -> Response:
    if _wants_json(request):
        return JSONResponse({"detail": message}, status_code=status_code)
    return pages.error_page(request, status_code, title, message)


def create_app(source: DatabaseSource, access: Access, settings: DashboardSettings | None = None) -> FastAPI:
    """The app, reading through `source`, admitting requests that `access` accepts."""
    chosen = settings if settings is not None else DashboardSettings()
    sums: RefreshingValues[Any] = RefreshingValues(chosen.sums_max_age)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if chosen.sums_max_age:
            threading.Thread(target=_warm, args=(source, chosen, sums), daemon=True, name="dashboard-warm").start()
        yield
        # At shutdown (SIGTERM, SIGINT): the server re-raises the signal right after, so this is the last word.
        source.close()

    app = FastAPI(
        title="Agent tasks",
        summary="Read-only view of the coding agent's tasks and token usage.",
        version="1",
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.source = source
    app.state.access = access
    app.state.settings = chosen
    app.state.sums = sums
    app.state.request_metrics = request_metrics = RequestMetrics()

    @app.middleware("http")
    async def require_token(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        path = request.url.path
        # Open paths answer anyone, but say more (the database's name, why it cannot be read) only to those
        # who may read the rest.
        request.state.signed_in = access.accepts_headers(
            request.headers.get("authorization"), request.cookies.get(SESSION_COOKIE)
        )
        admitted = path in OPEN_PATHS or request.state.signed_in
        # HEAD (load balancers, link checkers) is answered as GET would be, without the body.
        head = request.method == "HEAD"
        if head:
            request.scope["method"] = "GET"
        if not admitted:
            if _wants_json(request):
                response: Response = JSONResponse(
                    {"detail": "a token is required: send Authorization: Bearer <DASHBOARD_TOKEN>"},
                    status_code=401,
                    headers={"WWW-Authenticate": "Bearer"},
                )
            else:
                target = path + (f"?{request.url.query}" if request.url.query else "")
                response = pages.render(request, "login.html", status_code=401, next=target, failed=False)
        else:
            response = await call_next(request)
        if head:
            response = Response(status_code=response.status_code, headers=dict(response.headers))
        response.headers.update(SECURITY_HEADERS)
        return response

    # Inside the access rule: what is counted is what was answered, refusals included.
    app.middleware("http")(request_metrics.measure)
    _answer_errors(app)
    _answer_health(app, source)
    if chosen.trusted_proxies:
        # Added last, so it runs first: the access rule and the sign-in see the client and scheme it sets.
        app.add_middleware(ProxyHeadersMiddleware, trusted_hosts=list(chosen.trusted_proxies))
    app.include_router(api.router)
    app.include_router(metrics.router)
    app.include_router(pages.router)
    app.mount("/static", StaticFiles(directory=str(files("dashboard") / "static")), name="static")
    return app


def _answer_errors(app: FastAPI) -> None:
    """Errors as answers: a JSON error on the API, an error page elsewhere, never a bare traceback."""

    @app.exception_handler(NotFoundError)
    async def not_found(request: Request, exc: NotFoundError) -> Response:
        return _problem(request, 404, "Not found", str(exc))

    @app.exception_handler(DatabaseError)
    async def database_unavailable(request: Request, exc: DatabaseError) -> Response:
        return _problem(request, 503, "Database unavailable", redact_secrets(str(exc)))

    @app.exception_handler(SQLAlchemyError)
    async def database_failed(request: Request, exc: SQLAlchemyError) -> Response:
        logger.warning("dashboard: %s failed: %s", request.url.path, redact_secrets(describe_driver_error(exc)))
        return _problem(request, 503, "Database unavailable", "the database could not answer; try again shortly")

    @app.exception_handler(ValueError)
    async def bad_parameter(request: Request, exc: ValueError) -> Response:
        return _problem(request, 400, "Bad request", str(exc))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        logger.error("dashboard: %s failed: %s", request.url.path, type(exc).__name__, exc_info=exc)
        response = _problem(request, 500, "Internal error", "the dashboard could not answer; its log says why")
        response.headers.update(SECURITY_HEADERS)
        return response


def _answer_health(app: FastAPI, source: DatabaseSource) -> None:
    """`/healthz`, open to all: the status to anyone, and why the database cannot be read to the signed in."""

    @app.get("/healthz", include_in_schema=False)
    def healthz(request: Request) -> Response:
        try:
            reachable = source.connection().health_check()
            reason = "the database does not answer"
        except DatabaseError as exc:
            reachable, reason = False, redact_secrets(str(exc))
        if reachable:
            return JSONResponse({"status": "ok"})
        body = {"status": "unavailable"}
        if request.state.signed_in:
            body["detail"] = reason
        return JSONResponse(body, status_code=503)


def _warm(source: DatabaseSource, settings: DashboardSettings, sums: RefreshingValues[Any]) -> None:
    """Compute the usage page's sums before the first viewer asks for them."""
    try:
        reader = DashboardReader(source.connection(), settings.clock, sums)
        reader.usage(settings.zone, TOP_USERS)
        reader.history(None, DEFAULT_DAYS, settings.zone)
    except Exception as exc:  # the first viewer computes them instead
        logger.info("dashboard: sums not computed ahead: %s", type(exc).__name__)
