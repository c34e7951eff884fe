"""What commands print: tables, bars and nested values shown safely, and their exit statuses."""

from __future__ import annotations

import signal
from collections.abc import Sequence
from typing import Any

from db import Task
from db.redaction import redact_secrets

EXIT_ERROR = 1


EXIT_USAGE = 2


EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE
# Stopped by Ctrl-C, as a shell reports it.
EXIT_INTERRUPTED = 128 + signal.SIGINT


def printable(text: str) -> str:
    """`text` with control and format characters (terminal escapes, bidi overrides) shown as escapes."""
    if text.isprintable():
        return text
    return "".join(
        character if character.isprintable() else character.encode("unicode_escape", "backslashreplace").decode()
        for character in text
    )


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    shown = [[printable(cell) for cell in row] for row in rows]
    widths = [max([len(header), *(len(row[index]) for row in shown)]) for index, header in enumerate(headers)]
    for row in (headers, *shown):
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def print_bars(rows: Sequence[tuple[str, int]], width: int = 40) -> None:
    largest = max((value for _, value in rows), default=0)
    for label, value in rows:
        eighths = round(value / largest * width * 8) if largest else 0
        bar = "█" * (eighths // 8) + ("", "▏", "▎", "▍", "▌", "▋", "▊", "▉")[eighths % 8]
        print(f"{label}  {bar:<{width}}  {value:,}")


def print_nested(value: object, indent: str = "") -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, dict | list):
                print(f"{indent}{key}:")
                print_nested(item, indent + "  ")
            else:
                print(f"{indent}{key}: {item}")
    elif isinstance(value, list):
        for item in value:
            print(f"{indent}-")
            print_nested(item, indent + "  ")
    else:
        print(f"{indent}{value}")


def shown(task: Task) -> dict[str, Any]:
    """The task's fields as they may be shown: any secret in its stored error masked, as the dashboard does."""
    data = task.to_dict()
    if data.get("error_message"):
        data["error_message"] = redact_secrets(data["error_message"])
    return data
