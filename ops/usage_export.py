"""Token usage as CSV, one row per user and calendar day, for billing tokens to teams."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable

from db.repositories.task_usage import UserDay

HEADER = ("user", "day", "tokens")
# A spreadsheet takes a cell starting with one of these as a formula: such a user name is quoted.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def usage_csv(rows: Iterable[UserDay]) -> str:
    """The rows as CSV text (RFC 4180, CRLF line ends), with a header; a task without a user has an empty
    user cell, and a name a spreadsheet would run as a formula is kept as text (a leading apostrophe)."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(HEADER)
    for row in rows:
        writer.writerow((_as_text(row.user or ""), row.day.isoformat(), row.tokens))
    return out.getvalue()


def _as_text(cell: str) -> str:
    return f"'{cell}" if cell.startswith(FORMULA_STARTS) else cell
