"""`tasks reconcile` and a resuming TaskContextManager on damaged, crafted and hostile task folders: each is
reported and the others repaired, nothing outside base_dir is read or changed, and a dry run changes nothing."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import main
from context_storage import GitHubIssueTaskKey, TaskContextManager
from context_storage.reconcile import find_discrepancies
from db import DatabaseConfig, DatabaseConnection, TaskRepository
from db.schema import upgrade_schema

KEY = GitHubIssueTaskKey("acme", "web", 42)


@pytest.fixture
def base(tmp_path: Path) -> Iterator[Path]:
    """A base_dir whose database is at head, and the process initialised on it."""
    directory = tmp_path / "contexts"
    upgrade_schema(DatabaseConnection.initialize(DatabaseConfig(sqlite_path=str(directory / "tasks.db"))))
    yield directory
    DatabaseConnection.reset()


def config_of(base: Path) -> dict[str, Any]:
    return {"context_storage": {"base_dir": str(base)}}


def finished_task(base: Path, **metadata_changes: Any) -> str:
    """A task that completed; its metadata.json then changed as given (None removes a key)."""
    task_uuid = str(uuid.uuid4())
    manager = TaskContextManager(KEY, task_uuid, config_of(base))
    manager.complete()
    path = manager.context_dir / "metadata.json"
    metadata = json.loads(path.read_text())
    metadata.update(metadata_changes)
    path.write_text(json.dumps(metadata))
    return task_uuid


def snapshot(root: Path) -> dict[str, tuple[int, bytes | None]]:
    """Every entry under `root`, with its mode and, for a regular file, its bytes (links not followed)."""
    seen: dict[str, tuple[int, bytes | None]] = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        is_file = path.is_file() and not path.is_symlink()
        seen[str(path.relative_to(root))] = (info.st_mode, path.read_bytes() if is_file else None)
    return seen


def repairable(base: Path) -> str:
    """A task whose row says running while its metadata says it completed: what reconcile repairs."""
    task_uuid = finished_task(base)
    TaskRepository().update(task_uuid, {"status": "running", "completed_at": None})
    return task_uuid


DAMAGE = {
    "unsaved is a number": b'{"unsaved": 5}',
    "status is a list": b'{"status": ["completed"]}',
    "nested too deep": b"[" * 100_000 + b"]" * 100_000,
    "outcome is not one": b'{"unsaved": {"outcome": {"x": 1}}}',
    "tokens are text": b'{"unsaved": {"statistics": {"tokens": "abc"}}}',
    "tokens overflow": b'{"unsaved": {"statistics": {"tokens": 1e400}}}',
    "torn": b'{"uuid": "',
    "row_version is not a time": b'{"unsaved": {"in_flight": {"statistics": {"tokens": 1}, "row_version": "x"}}}',
    "two batches under one id": (
        b'{"unsaved": {"in_flight": ['
        b'{"statistics": {"tokens": 5}, "operation_id": "0f0e0d0c-0b0a-4909-8807-060504030201",'
        b' "sent_at": "2026-12-01T00:00:00+00:00"},'
        b'{"statistics": {"tokens": 7}, "operation_id": "0F0E0D0C-0B0A-4909-8807-060504030201",'
        b' "sent_at": "2026-12-01T00:00:00+00:00"}]}}'
    ),
    "operation_id is not a UUID": (
        b'{"unsaved": {"in_flight": [{"statistics": {"tokens": 5}, "operation_id": "x",'
        b' "sent_at": "2026-12-01T00:00:00+00:00"}]}}'
    ),
}


@pytest.mark.parametrize("damage", [*DAMAGE, "a directory", "a FIFO", "a link to /dev/zero", "a link out"])
def test_one_damaged_folder_is_reported_and_every_other_repaired(
    base: Path, tmp_path: Path, damage: str, capsys: pytest.CaptureFixture[str]
) -> None:
    damaged = finished_task(base)
    metadata = base / "completed" / damaged / "metadata.json"
    metadata.unlink()
    outside = tmp_path / "outside.json"
    outside.write_text('{"status": "completed", "unsaved": {"statistics": {"tokens": 9}}}')
    outside.chmod(0o644)
    if damage == "a directory":
        metadata.mkdir()
    elif damage == "a FIFO":
        os.mkfifo(metadata)
    elif damage == "a link to /dev/zero":
        metadata.symlink_to("/dev/zero")
    elif damage == "a link out":
        metadata.symlink_to(outside)
    else:
        metadata.write_bytes(DAMAGE[damage])
    fixed = repairable(base)
    DatabaseConnection.reset()
    config = write_config(tmp_path, base)
    before = snapshot(tmp_path)

    assert main.main(["--config", str(config), "tasks", "reconcile"]) == 1
    shown = capsys.readouterr().out
    assert damaged in shown and "left alone" in shown and fixed in shown
    assert snapshot(tmp_path) == before  # a dry run changes nothing at all

    assert main.main(["--config", str(config), "tasks", "reconcile", "--yes"]) == 1
    assert "fixed 1 of 2" in capsys.readouterr().out
    DatabaseConnection.reset()
    DatabaseConnection.initialize(DatabaseConfig(sqlite_path=str(base / "tasks.db")))
    assert TaskRepository().get_by_uuid(fixed).status == "completed"
    assert outside.read_text().startswith('{"status": "completed"') and outside.stat().st_mode & 0o777 == 0o644


def write_config(tmp_path: Path, base: Path) -> Path:
    path = tmp_path / "config.yaml"
    if not path.exists():
        path.write_text(f"context_storage:\n  base_dir: {base}\n")
    return path


def test_a_task_folder_that_links_out_of_base_dir_is_never_followed(
    base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    task_uuid = str(uuid.uuid4())
    (outside / "metadata.json").write_text(json.dumps({"uuid": task_uuid, "status": "completed"}))
    (base / "running").mkdir(parents=True, exist_ok=True)
    (base / "running" / task_uuid).symlink_to(outside, target_is_directory=True)
    before = snapshot(outside)
    DatabaseConnection.reset()
    config = write_config(tmp_path, base)
    main.main(["--config", str(config), "tasks", "reconcile"])
    main.main(["--config", str(config), "tasks", "reconcile", "--yes"])
    assert "is a link, not a task directory; left alone" in capsys.readouterr().out
    assert snapshot(outside) == before
    with pytest.raises(ValueError, match="is a link"):
        TaskContextManager(KEY, task_uuid, config_of(base), is_resumed=True)
    assert snapshot(outside) == before


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_resume_sets_a_damaged_metadata_aside_and_the_task_goes_on(base: Path, damage: str) -> None:
    task_uuid = finished_task(base)
    directory = base / "completed" / task_uuid
    (directory / "metadata.json").write_bytes(DAMAGE[damage])
    manager = TaskContextManager(KEY, task_uuid, config_of(base), is_resumed=True)
    manager.update_statistics(tokens=3)
    manager.complete()
    assert [path.name.startswith("metadata.json.damaged-") for path in directory.iterdir()].count(True) == 1
    assert TaskRepository().get_by_uuid(task_uuid).status == "completed"


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=12), children, max_size=3),
    max_leaves=12,
)
KEYS = st.sampled_from(["status", "unsaved", "completed_at", "error_message", "uuid", "process_id", "hostname"])
UNSAVED_KEYS = st.sampled_from(["statistics", "in_flight", "outcome", "other"])
METADATA = st.one_of(
    JSON,
    st.dictionaries(KEYS, JSON, max_size=4),
    st.fixed_dictionaries({"unsaved": st.dictionaries(UNSAVED_KEYS, JSON, max_size=3)}),
    st.fixed_dictionaries(
        {"unsaved": st.fixed_dictionaries({"statistics": st.dictionaries(st.sampled_from(["tokens", "x"]), JSON)})}
    ),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.one_of(METADATA.map(lambda value: json.dumps(value).encode()), st.binary(max_size=64)))
def test_whatever_metadata_json_holds_reconcile_reports_or_repairs_and_never_raises(base: Path, content: bytes) -> None:
    task_uuid = finished_task(base)
    directory = base / "completed" / task_uuid
    (directory / "metadata.json").write_bytes(content)
    before = snapshot(base / "completed")
    found = find_discrepancies(base, TaskRepository())
    assert snapshot(base / "completed") == before
    for item in found:
        if item.apply is not None:
            item.apply()
    resumed = TaskContextManager(KEY, task_uuid, config_of(base), is_resumed=True)
    resumed.complete()
    assert TaskRepository().get_by_uuid(task_uuid).status == "completed"


@pytest.mark.parametrize("area", ["running", "completed", "locks"])
def test_an_area_that_links_out_of_base_dir_is_left_alone_with_every_task(
    base: Path, tmp_path: Path, area: str, capsys: pytest.CaptureFixture[str]
) -> None:
    fixed = repairable(base)
    outside = tmp_path / "outside"
    shutil.move(base / area, outside) if (base / area).exists() else outside.mkdir()
    (base / area).symlink_to(outside, target_is_directory=True)
    before = snapshot(outside)
    DatabaseConnection.reset()
    config = write_config(tmp_path, base)
    assert main.main(["--config", str(config), "tasks", "reconcile", "--yes"]) == 1
    assert f"{area}/ is a link out of {base}; nothing in it is checked" in capsys.readouterr().out
    assert snapshot(outside) == before
    DatabaseConnection.initialize(DatabaseConfig(sqlite_path=str(base / "tasks.db")))
    assert TaskRepository().get_by_uuid(fixed).status == "running"


@pytest.mark.parametrize("lock", ["a directory", "a link"])
def test_a_lock_that_is_not_a_lock_file_is_reported_and_the_others_repaired(
    base: Path, tmp_path: Path, lock: str, capsys: pytest.CaptureFixture[str]
) -> None:
    odd = repairable(base)
    fixed = repairable(base)
    path = base / "locks" / f"{odd}.lock"
    path.parent.mkdir(exist_ok=True)
    if lock == "a directory":
        path.mkdir()
    else:
        path.symlink_to("/etc/hostname")
    DatabaseConnection.reset()
    assert main.main(["--config", str(write_config(tmp_path, base)), "tasks", "reconcile", "--yes"]) == 1
    assert f"locks/{odd}.lock is not a lock file" in capsys.readouterr().out
    DatabaseConnection.initialize(DatabaseConfig(sqlite_path=str(base / "tasks.db")))
    assert TaskRepository().get_by_uuid(fixed).status == "completed"
    assert TaskRepository().get_by_uuid(odd).status == "running"


@pytest.mark.parametrize("instant", ["9999-12-31T23:59:59-01:00", "0001-01-01T00:00:00+01:00", "2026-11-30T12:00:00"])
def test_an_instant_the_database_cannot_hold_is_damage_not_a_crash(base: Path, instant: str) -> None:
    task_uuid = finished_task(base, completed_at=instant)
    TaskRepository().update(task_uuid, {"status": "running", "completed_at": None})
    found = find_discrepancies(base, TaskRepository())
    assert [item.fix for item in found if item.uuid == task_uuid] == [None]
    assert "completed_at that is not an ISO date-time" in found[0].problem
