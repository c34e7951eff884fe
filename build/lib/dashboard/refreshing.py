"""Answers that cost a scan of the whole table, computed at most once per `max_age` seconds for all viewers.

A value past its age is still served while one background thread computes its successor, so a viewer
waits only for the first computation of a key, or when its value is far too old (`max_age * STALE_LIMIT`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

logger = logging.getLogger(__name__)

V = TypeVar("V")
MAX_KEYS = 64
STALE_LIMIT = 10


@dataclass
class _Entry(Generic[V]):
    value: V
    computed_at: float
    refreshing: bool = False


class RefreshingValues(Generic[V]):
    """`get(key, compute)`: the value of `key`, recomputed in the background once older than `max_age`.

    `max_age` 0 computes at every call. At most MAX_KEYS keys are kept, the least recently used dropped.
    """

    def __init__(self, max_age: float, clock: Callable[[], float] = time.monotonic) -> None:
        if max_age < 0:
            raise ValueError(f"max_age must be 0 or more seconds, got {max_age}")
        self.max_age = max_age
        self._clock = clock
        self._entries: OrderedDict[Hashable, _Entry[V]] = OrderedDict()
        self._lock = threading.Lock()
        self._computing: dict[Hashable, threading.Lock] = {}

    def get(self, key: Hashable, compute: Callable[[], V]) -> tuple[V, float]:
        """The value and the clock reading at which it was computed."""
        if self.max_age == 0:
            return compute(), self._clock()
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                age = self._clock() - entry.computed_at
                if age <= self.max_age:
                    return entry.value, entry.computed_at
                if age <= self.max_age * STALE_LIMIT:
                    if not entry.refreshing:
                        entry.refreshing = True
                        threading.Thread(target=self._refresh, args=(key, compute), daemon=True).start()
                    return entry.value, entry.computed_at
            gate = self._computing.setdefault(key, threading.Lock())
        with gate:  # one computation per key; the others wait for it and take its value
            with self._lock:
                entry = self._entries.get(key)
                if entry is not None and self._clock() - entry.computed_at <= self.max_age:
                    return entry.value, entry.computed_at
            return self._store(key, compute)

    def _refresh(self, key: Hashable, compute: Callable[[], V]) -> None:
        try:
            self._store(key, compute)
        except Exception as exc:  # the stale value stays; the next request past max_age tries again
            logger.warning("dashboard: refreshing %r failed: %s", key, type(exc).__name__)
            with self._lock:
                entry = self._entries.get(key)
                if entry is not None:
                    entry.refreshing = False

    def _store(self, key: Hashable, compute: Callable[[], V]) -> tuple[V, float]:
        started = self._clock()
        value = compute()
        with self._lock:
            self._entries[key] = _Entry(value, started)
            self._entries.move_to_end(key)
            while len(self._entries) > MAX_KEYS:
                dropped, _ = self._entries.popitem(last=False)
                self._computing.pop(dropped, None)
        return value, started
