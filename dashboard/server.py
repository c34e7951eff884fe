"""Serving the dashboard with uvicorn on a socket bound before the app starts."""

from __future__ import annotations

import logging
import socket

import uvicorn

from dashboard.access import Access
from dashboard.app import create_app
from dashboard.source import DatabaseSource
from dashboard.wiring import DashboardSettings

logger = logging.getLogger(__name__)


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


def serve(sock: socket.socket, source: DatabaseSource, access: Access, settings: DashboardSettings) -> None:
    """Serve until interrupted (SIGINT or SIGTERM)."""
    app = create_app(source, access, settings)
    config = uvicorn.Config(app, log_level="info", access_log=False, server_header=False, proxy_headers=False)
    uvicorn.Server(config).run(sockets=[sock])
