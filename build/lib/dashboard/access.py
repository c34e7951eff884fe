"""Who may read the dashboard: anyone on a loopback bind, otherwise only holders of DASHBOARD_TOKEN."""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field

from dashboard.sign_in import Sessions, SignInThrottle

TOKEN_VARIABLE = "DASHBOARD_TOKEN"  # noqa: S105 (the environment variable's name)
MIN_TOKEN_LENGTH = 16
SESSION_COOKIE = "dashboard_session"


class DashboardAccessError(ValueError):
    """The dashboard cannot start with these access settings."""


def is_loopback(host: str) -> bool:
    """True when only this machine can reach `host`: localhost or an address in 127.0.0.0/8 or ::1."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Access:
    """The token requests must carry, or None when none is needed; the sessions of those who signed in with
    it, and the failed attempts of those who did not. Its repr never shows the token."""

    token: str | None = field(default=None, repr=False)
    sessions: Sessions = field(default_factory=Sessions, repr=False, compare=False)
    throttle: SignInThrottle = field(default_factory=SignInThrottle, repr=False, compare=False)

    @classmethod
    def for_bind(cls, host: str, env: Mapping[str, str]) -> Access:
        """The access rule for serving on `host`: a token is required off loopback, and always used when set."""
        token = env.get(TOKEN_VARIABLE) or None
        if token is None and not is_loopback(host):
            raise DashboardAccessError(
                f"refusing to serve on {host} without a token: set {TOKEN_VARIABLE} "
                f"(at least {MIN_TOKEN_LENGTH} characters), or bind to 127.0.0.1"
            )
        if token is not None and len(token) < MIN_TOKEN_LENGTH:
            raise DashboardAccessError(f"{TOKEN_VARIABLE} is too short: use at least {MIN_TOKEN_LENGTH} characters")
        return cls(token)

    @property
    def required(self) -> bool:
        return self.token is not None

    def accepts_token(self, offered: str | None) -> bool:
        """Whether `offered` is the token, compared in constant time."""
        return self.token is None or _same(offered, self.token)

    def accepts_session(self, offered: str | None) -> bool:
        """Whether `offered` is a session signed in and neither expired nor ended."""
        return self.token is None or self.sessions.accepts(offered)

    def accepts_headers(self, authorization: str | None, cookie: str | None) -> bool:
        """A request passes with `Authorization: Bearer <token>` or the login cookie."""
        if self.token is None:
            return True
        scheme, _, credentials = (authorization or "").partition(" ")
        if scheme.lower() == "bearer" and self.accepts_token(credentials.strip()):
            return True
        return self.accepts_session(cookie)


def _same(offered: str | None, expected: str) -> bool:
    return offered is not None and hmac.compare_digest(offered.encode(), expected.encode())
