"""Serving the dashboard with uvicorn on a socket bound before the app starts."""

from __future__ import annotations

import asyncio
import functools
import logging
import resource
import socket
import threading
import time
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from dashboard.access import Access
from dashboard.app import create_app
from dashboard.source import DatabaseSource
from dashboard.wiring import DashboardSettings

logger = logging.getLogger(__name__)

# How long a client has to send a request's headers once it has started (or connected).
HEADER_SECONDS = 10.0


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on `host`:`port` (0: a free port, which the socket then holds)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named explicitly: asyncio sets TCP_NODELAY only on sockets that say so, and without it
    # every answer on a kept-alive connection waits 40 ms for the browser's delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError:
        sock.close()
        raise
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/"


def serve(
    sock: socket.socket,
    source: DatabaseSource,
    access: Access,
    settings: DashboardSettings,
    header_seconds: float = HEADER_SECONDS,
) -> None:
    """Serve until interrupted (SIGINT or SIGTERM)."""
    app = create_app(source, access, settings)
    allow_file_descriptors()
    for name in ("uvicorn.error", "asyncio", "dashboard.app", "dashboard.pages", "dashboard.source"):
        logging.getLogger(name).addFilter(RepeatedLines())
    config = uvicorn.Config(
        app,
        log_level="info",
        access_log=False,
        server_header=False,
        proxy_headers=False,
        http=functools.partial(HeadersInTime, header_seconds=header_seconds),  # type: ignore[arg-type]
    )
    uvicorn.Server(config).run(sockets=[sock])


class HeadersInTime(H11Protocol):
    """HTTP/1.1 that closes a connection whose request (headers and body) is not all there `header_seconds` after
    its first byte (or after it opened): a client that trickles a request, or sends none, holds no socket long."""

    def __init__(self, *args: Any, header_seconds: float = HEADER_SECONDS, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_seconds = header_seconds
        self._headers_due: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._expect_headers()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state in _RECEIVING:
            if self._headers_due is None:
                self._expect_headers()  # a new request on a kept-alive connection
        elif self._headers_due is not None:
            self._headers_due.cancel()
            self._headers_due = None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._headers_due is not None:
            self._headers_due.cancel()
            self._headers_due = None
        super().connection_lost(exc)

    def _expect_headers(self) -> None:
        self._headers_due = self.loop.call_later(self._header_seconds, self._headers_late)

    def _headers_late(self) -> None:
        self._headers_due = None
        if self.conn.their_state in _RECEIVING and not self.transport.is_closing():
            self.transport.close()


# A request still arriving: its headers (IDLE) or its body (SEND_BODY). Both must be whole in time.
_RECEIVING = (h11.IDLE, h11.SEND_BODY)


def allow_file_descriptors() -> None:
    """Raise the soft limit of open files to the hard one: connections, not the default 1,024, set the bound."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class RepeatedLines(logging.Filter):
    """Lets the same message through at most `burst` times a minute: under a flood of failing connections (out
    of file descriptors, say) the log says so, and does not grow without bound."""

    def __init__(self, burst: int = 5, window: float = 60.0) -> None:
        super().__init__()
        self._burst = burst
        self._window = window
        self._seen: dict[str, tuple[float, int]] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        key = f"{record.name}:{record.msg}"
        now = time.monotonic()
        with self._lock:
            since, count = self._seen.get(key, (now, 0))
            if now - since > self._window:
                since, count = now, 0
            self._seen[key] = (since, count + 1)
            if len(self._seen) > 1000:
                self._seen.clear()
        if count == self._burst:
            record.msg = f"{record.msg} (repeated; more of these are left out for a minute)"
        return count <= self._burst
