"""Secrets taken out of free text before anyone is shown it: query statistics, error messages agents stored.

Agents store what their tools printed, so the forms covered are the ones tools print: environment dumps
(`PGPASSWORD=x`, `POSTGRES_PASSWORD='x'`, `GITHUB_TOKEN=x`), YAML (`password: x`), JSON and Python reprs
(`{"password": "x"}`), libpq strings (`password=x`), SQL (`PASSWORD 'x'`), URLs with a password or with a
token in place of the user (`https://TOKEN@github.com/...`), HTTP authorisation headers, and the tokens of the
services agents work with, wherever they appear.
"""

from __future__ import annotations

import re

MASK = "***"

# A name that holds a secret: a word of its own, or the last part of a longer name (PGPASSWORD, GITHUB_TOKEN,
# OPENAI_API_KEY, client_secret), never a plural or a longer word (max_tokens, passwordless).
_HIDDEN_NAME = (
    r"[A-Za-z0-9_.\-]*?(?:password|passwd|passphrase|pwd|secret|token|api[_\-]?key|access[_\-]?key|private[_\-]?key"
    r"|credentials?|auth)(?![A-Za-z])[A-Za-z0-9_\-]*"
)
_QUOTED = r"""'(?:[^'\\\n]|''|\\.)*'|"(?:[^"\\\n]|\\.)*\""""

# `PASSWORD '...'` (CREATE/ALTER ROLE, dblink and FDW options): the literal after it, in any quoting.
_PASSWORD_LITERAL = re.compile(
    r"""(\bpassword\s+)(E?'(?:[^'\\]|''|\\.)*'|\$(\w*)\$.*?\$\3\$)""",
    re.IGNORECASE | re.DOTALL,
)
# `name=value`, `name = 'value'` (environment dumps, libpq strings, a URL's query): the value, quoted or not.
_ASSIGNED = re.compile(
    rf"""(?P<name>\b{_HIDDEN_NAME}\s*=\s*)(?P<value>{_QUOTED}|[^\s&;,)}}\]'"]+)""",
    re.IGNORECASE,
)
# `name: value` (YAML, a log line), `"name": "value"` (JSON), `'name': 'value'` (a Python repr): a quoted value,
# or an unquoted one to the end of its line (YAML's plain scalars may hold spaces).
_LABELLED = re.compile(
    rf"""(?P<name>["']?\b{_HIDDEN_NAME}["']?\s*:(?!//)[ \t]*)(?P<value>{_QUOTED}|[^\s'"][^\n]*)""",
    re.IGNORECASE,
)
# `scheme://user:secret@host` or `scheme://secret@host` (a token as the user, as git over HTTPS takes it); a
# password holding an unencoded `@` ends at the last `@` before the host.
_URL_USERINFO = re.compile(r"(\b(?P<scheme>[a-z][a-z0-9+.\-]*)://)(?P<userinfo>[^\s/?#]+)@", re.IGNORECASE)
# `Authorization: Bearer x` (any scheme) in a header or a curl command line, and a bearer credential elsewhere.
_AUTHORIZATION = re.compile(
    r"(\bauthorization\s*[:=]\s*(?:[a-z]+\s+)?)[^\s'\"]+|(\bbearer\s+)(?=[\w.~+/\-]*\d)[\w.~+/\-]+=*", re.IGNORECASE
)
# Tokens that say what they are: GitHub, GitLab, OpenAI and Anthropic-style keys, Slack, AWS secret keys.
_KNOWN_TOKEN = re.compile(
    r"\b(?:gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,}|glpat-[A-Za-z0-9_\-]{20,}"
    r"|sk-[A-Za-z0-9_\-]{20,}|xox[abposr]-[A-Za-z0-9\-]{10,})"
)
# Where a URL's user alone is a secret: git over HTTPS takes a token as the user.
_TOKEN_AS_USER_SCHEMES = frozenset({"http", "https", "git+https", "ws", "wss"})


def redact_secrets(text: str) -> str:
    """`text` with every secret in a form above replaced by `***`."""
    text = _PASSWORD_LITERAL.sub(lambda match: f"{match.group(1)}'{MASK}'", text)
    text = _URL_USERINFO.sub(_mask_userinfo, text)
    text = _AUTHORIZATION.sub(lambda match: f"{match.group(1) or match.group(2)}{MASK}", text)
    text = _ASSIGNED.sub(_mask_named_value, text)
    text = _LABELLED.sub(_mask_named_value, text)
    return _KNOWN_TOKEN.sub(MASK, text)


def _mask_userinfo(match: re.Match[str]) -> str:
    userinfo = match.group("userinfo")
    user, colon, _secret = userinfo.partition(":")
    if colon:
        return f"{match.group(1)}{user}:{MASK}@"
    if match.group("scheme").lower() in _TOKEN_AS_USER_SCHEMES:
        return f"{match.group(1)}{MASK}@"
    return match.group(0)


def _mask_named_value(match: re.Match[str]) -> str:
    value = match.group("value")
    if value.strip("'\"") == MASK or value.startswith(MASK):
        return match.group(0)
    quote = value[0] if value[0] in "'\"" and len(value) > 1 and value[-1] == value[0] else ""
    return f"{match.group('name')}{quote}{MASK}{quote}"
