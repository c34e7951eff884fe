"""Signing in to the dashboard: sessions that expire and can be ended, and sign-in attempts slowed per client.

Both live in the dashboard's process (one process serves it): a restart signs everyone out.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

SESSION_SECONDS = 12 * 3600
MAX_SESSIONS = 10_000
# Failed sign-ins a client may make before it must wait; each further failure doubles the wait, up to a cap.
FREE_FAILURES = 5
FIRST_WAIT_SECONDS = 2.0
LONGEST_WAIT_SECONDS = 15 * 60.0
# Clients remembered at once: the oldest are forgotten first (an attacker spreading over many addresses
# still meets every address's wait).
MAX_CLIENTS = 10_000


class Sessions:
    """Random session ids, each valid for `lifetime` seconds or until it is ended. Only a digest of each id is
    kept, so that the lookup tells nothing about ids that exist."""

    def __init__(
        self,
        lifetime: float = SESSION_SECONDS,
        limit: int = MAX_SESSIONS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.lifetime = lifetime
        self._limit = limit
        self._clock = clock
        self._expiry: OrderedDict[bytes, float] = OrderedDict()
        self._lock = threading.Lock()

    def open(self) -> str:
        """A new session's id (the cookie's value)."""
        session = secrets.token_urlsafe(32)
        with self._lock:
            self._forget_expired()
            self._expiry[_digest(session)] = self._clock() + self.lifetime
            while len(self._expiry) > self._limit:
                self._expiry.popitem(last=False)
        return session

    def accepts(self, session: str | None) -> bool:
        if not session:
            return False
        key = _digest(session)
        with self._lock:
            expiry = self._expiry.get(key)
            if expiry is None:
                return False
            if expiry <= self._clock():
                del self._expiry[key]
                return False
            return True

    def end(self, session: str | None) -> None:
        if session:
            with self._lock:
                self._expiry.pop(_digest(session), None)

    def _forget_expired(self) -> None:
        now = self._clock()
        while self._expiry and next(iter(self._expiry.values())) <= now:
            self._expiry.popitem(last=False)


@dataclass
class _Failures:
    count: int
    blocked_until: float


class SignInThrottle:
    """Failed sign-ins per client: after `FREE_FAILURES`, the client must wait before its next attempt is even
    looked at, twice as long after each further failure. A success forgets the client's failures."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._clients: OrderedDict[str, _Failures] = OrderedDict()
        self._lock = threading.Lock()

    def wait_for(self, client: str) -> float:
        """Seconds `client` must still wait before an attempt is looked at (0: go ahead)."""
        with self._lock:
            failures = self._clients.get(client)
            return 0.0 if failures is None else max(0.0, failures.blocked_until - self._clock())

    def failed(self, client: str) -> int:
        """Record a failure; the client's failures so far."""
        with self._lock:
            failures = self._clients.pop(client, None) or _Failures(0, 0.0)
            failures.count += 1
            beyond = failures.count - FREE_FAILURES + 1
            if beyond > 0:
                wait = min(FIRST_WAIT_SECONDS * 2 ** min(beyond - 1, 32), LONGEST_WAIT_SECONDS)
                failures.blocked_until = self._clock() + wait
            self._clients[client] = failures
            while len(self._clients) > MAX_CLIENTS:
                self._clients.popitem(last=False)
            return failures.count

    def succeeded(self, client: str) -> None:
        with self._lock:
            self._clients.pop(client, None)


def _digest(session: str) -> bytes:
    return hashlib.sha256(session.encode("utf-8", "surrogatepass")).digest()
