"""The task lock: its file exists only while held, and a taker racing its holder's release still takes it."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

import private_files
from context_storage.task_lock import TaskAlreadyRunningError, TaskLock


def test_the_lock_file_exists_only_while_the_lock_is_held(tmp_path: Path) -> None:
    lock = TaskLock(tmp_path, str(uuid.uuid4()))
    lock.acquire()
    assert lock.path.is_file() and lock.held
    with pytest.raises(TaskAlreadyRunningError, match="once that process has ended or its manager is closed"):
        TaskLock(tmp_path, lock.path.stem).acquire()
    lock.release()
    assert not lock.path.exists() and not lock.held
    lock.release()  # again: nothing


def test_a_taker_racing_the_holders_release_takes_the_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    task_uuid = str(uuid.uuid4())
    holder = TaskLock(tmp_path, task_uuid)
    holder.acquire()
    real_open = os.open

    def holder_lets_go_between_the_takers_opens(path: str, flags: int, *mode: int) -> int:
        try:
            return real_open(path, flags, *mode)
        except FileExistsError:
            holder.release()  # the file is removed after the taker's O_EXCL open and before its plain one
            raise

    monkeypatch.setattr(private_files.os, "open", holder_lets_go_between_the_takers_opens)
    taker = TaskLock(tmp_path, task_uuid)
    taker.acquire()
    monkeypatch.undo()
    assert taker.held and taker.path.is_file()
    with pytest.raises(TaskAlreadyRunningError):
        TaskLock(tmp_path, task_uuid).acquire()
    taker.release()


def test_a_lock_object_dropped_unreleased_lets_go(tmp_path: Path) -> None:
    task_uuid = str(uuid.uuid4())
    lock = TaskLock(tmp_path, task_uuid)
    lock.acquire()
    del lock
    again = TaskLock(tmp_path, task_uuid)
    again.acquire()
    again.release()
