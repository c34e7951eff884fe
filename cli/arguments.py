"""Argument types: each refuses a bad value as a usage error, naming what it takes."""

from __future__ import annotations

import argparse
import ipaddress
from collections.abc import Callable

from db.repositories.task_repository import MAX_PAGE
from db.repositories.task_retention import MAX_BATCH
from db.repositories.task_usage import MAX_DAYS, time_zone


def integer_in(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: an integer in low..high."""

    def parse(text: str) -> int:
        value = int(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be in {low}..{high}")
        return value

    return parse


days = integer_in(1, MAX_DAYS)
stale_minutes = integer_in(1, 525_600)
batch_size = integer_in(1, MAX_BATCH)


positive_limit = integer_in(1, MAX_PAGE)


def network(text: str) -> str:
    try:
        ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an IP address or network: {text!r}") from None
    return text


def zone_name(text: str) -> str:
    try:
        time_zone(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


port = integer_in(0, 65535)
