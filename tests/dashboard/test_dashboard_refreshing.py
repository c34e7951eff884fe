"""RefreshingValues: whole-table sums computed at most once per max_age, a stale value served while the next
one is computed in the background."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from dashboard.refreshing import MAX_KEYS, STALE_LIMIT, RefreshingValues


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Counter:
    """A computation that counts its calls and can be held until released."""

    def __init__(self) -> None:
        self.calls = 0
        self.release = threading.Event()
        self.release.set()
        self.finished = threading.Event()

    def __call__(self) -> int:
        self.calls += 1
        self.release.wait(10)
        self.finished.set()
        return self.calls


def test_max_age_zero_computes_every_time() -> None:
    values: RefreshingValues[int] = RefreshingValues(0)
    compute = Counter()
    assert [values.get("k", compute)[0] for _ in range(3)] == [1, 2, 3]


def test_a_fresh_value_is_reused_and_a_stale_one_served_while_its_successor_is_computed() -> None:
    clock = Clock()
    values: RefreshingValues[int] = RefreshingValues(30, clock)
    compute = Counter()
    assert values.get("k", compute) == (1, 1000.0)
    clock.now += 30
    assert values.get("k", compute) == (1, 1000.0)
    assert compute.calls == 1

    clock.now += 1
    compute.release.clear()
    compute.finished.clear()
    assert values.get("k", compute) == (1, 1000.0)  # stale: served at once, successor under way
    assert values.get("k", compute) == (1, 1000.0)  # only one refresh at a time
    compute.release.set()
    assert compute.finished.wait(10)
    deadline = time.monotonic() + 10
    while values.get("k", compute)[0] != 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert values.get("k", compute) == (2, 1031.0)
    assert compute.calls == 2


def test_a_value_far_too_old_is_computed_before_answering() -> None:
    clock = Clock()
    values: RefreshingValues[int] = RefreshingValues(30, clock)
    compute = Counter()
    values.get("k", compute)
    clock.now += 30 * STALE_LIMIT + 1
    assert values.get("k", compute)[0] == 2
    assert compute.calls == 2


def test_viewers_arriving_together_share_one_computation() -> None:
    values: RefreshingValues[int] = RefreshingValues(30)
    compute = Counter()
    compute.release.clear()
    answers: list[int] = []
    viewers = [threading.Thread(target=lambda: answers.append(values.get("k", compute)[0])) for _ in range(8)]
    for viewer in viewers:
        viewer.start()
    time.sleep(0.2)
    compute.release.set()
    for viewer in viewers:
        viewer.join(10)
    assert answers == [1] * 8
    assert compute.calls == 1


def test_a_failed_refresh_keeps_the_stale_value_and_is_tried_again(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    values: RefreshingValues[int] = RefreshingValues(30, clock)
    values.get("k", lambda: 7)
    clock.now += 31
    failed = threading.Event()

    def broken() -> int:
        failed.set()
        raise ConnectionError("postgresql://agent:hunter2@db/x unreachable")

    with caplog.at_level(logging.WARNING, logger="dashboard.refreshing"):
        assert values.get("k", broken)[0] == 7
        assert failed.wait(10)
        deadline = time.monotonic() + 10
        while "refreshing" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.01)
    assert "ConnectionError" in caplog.text and "hunter2" not in caplog.text
    retried = threading.Event()

    def working() -> int:
        retried.set()
        return 8

    deadline = time.monotonic() + 10
    while not retried.is_set() and time.monotonic() < deadline:
        values.get("k", working)
        time.sleep(0.01)
    assert retried.is_set()


def test_only_the_most_recently_used_keys_are_kept() -> None:
    values: RefreshingValues[int] = RefreshingValues(30)
    compute = Counter()
    for key in range(MAX_KEYS + 1):
        values.get(key, compute)
    values.get(MAX_KEYS, compute)
    assert compute.calls == MAX_KEYS + 1
    values.get(0, compute)  # the oldest was dropped
    assert compute.calls == MAX_KEYS + 2


def test_a_negative_max_age_is_refused() -> None:
    with pytest.raises(ValueError, match="max_age"):
        RefreshingValues(-1)
