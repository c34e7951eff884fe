"""Secrets taken out of free text before anyone is shown it: query statistics, error messages on a page."""

from __future__ import annotations

import re

MASK = "***"

# `PASSWORD '...'` (CREATE/ALTER ROLE, dblink and FDW options): the literal after it, in any quoting.
_PASSWORD_LITERAL = re.compile(
    r"""(password\b\s*[=:]?\s*)(E?'(?:[^'\\]|''|\\.)*'|\$(\w*)\$.*?\$\3\$|"(?:[^"]|"")*")""",
    re.IGNORECASE | re.DOTALL,
)
# `scheme://user:secret@host`: everything between the user's colon and the last `@` before the host.
_URL_PASSWORD = re.compile(r"(\b[a-z][a-z0-9+.\-]*://[^\s/@:]*:)[^\s]*?(@[^\s@]*(?:\s|$))", re.IGNORECASE)
# `password=secret` in a libpq connection string or a URL's query, unquoted.
_PASSWORD_VALUE = re.compile(r"(\b(?:ssl)?password\s*=\s*)(?!'\*\*\*')[^\s&;,()'\"]+", re.IGNORECASE)


def redact_secrets(text: str) -> str:
    """`text` with passwords replaced by `***`: a URL's, a `password=` value's, a literal after PASSWORD."""
    text = _PASSWORD_LITERAL.sub(lambda match: f"{match.group(1)}'{MASK}'", text)
    text = _URL_PASSWORD.sub(lambda match: f"{match.group(1)}{MASK}{match.group(2)}", text)
    return _PASSWORD_VALUE.sub(lambda match: f"{match.group(1)}{MASK}", text)
