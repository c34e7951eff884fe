"""Reads of a task's files that must cost what they return, not what the file holds.

Prints, for a last summary of 10 MB and 50 MB, `get_latest_summary()` against reading the same bytes with
one `read()` and parsing them (the floor); and for current.jsonl of 10,000 and 100,000 messages, the cost of
`get_current_token_count()` once a message was added, against adding that message.

    .venv/bin/python -m bench.context_files
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from context_storage.message_store import MessageStore
from context_storage.summary_store import SummaryStore


def best(call: Callable[[], object], repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return min(times)


def latest_summary(directory: Path, megabytes: int) -> None:
    store = SummaryStore(directory)
    store.add_summary(1, 1, "first", 10, 1)
    store.add_summary(1, 2, "x" * (megabytes << 20), 10, 1)
    path = store.summaries_file

    def floor() -> object:
        return json.loads(path.read_bytes().splitlines()[-1])

    ours, raw = best(store.get_latest_summary), best(floor)
    print(
        f"get_latest_summary, last record {megabytes} MB: {ours * 1000:8.1f} ms; read+parse {raw * 1000:8.1f} ms; "
        f"ratio {ours / raw:.2f}x"
    )


def token_count(directory: Path, messages: int) -> None:
    store = MessageStore(directory, {})
    for index in range(messages):
        store.add_message("user", f"message {index} " * 10)
    store.get_current_token_count()
    added = best(lambda: store.add_message("user", "one more"), repeat=20)
    counted = best(lambda: (store.add_message("user", "one more"), store.get_current_token_count()), repeat=20)
    print(
        f"get_current_token_count at {messages:,} messages: {max(counted - added, 0) * 1e6:8.1f} us after an "
        f"append (the append itself {added * 1e6:.1f} us)"
    )


def main() -> None:
    with tempfile.TemporaryDirectory() as scratch:
        for megabytes in (10, 50):
            directory = Path(scratch) / f"s{megabytes}"
            directory.mkdir()
            latest_summary(directory, megabytes)
        for messages in (10_000, 100_000):
            directory = Path(scratch) / f"m{messages}"
            directory.mkdir()
            token_count(directory, messages)


if __name__ == "__main__":
    main()
