"""`tasks prune`: finished tasks past the cutoff go with their directories, usage stays, nothing else moves; a
dry run changes nothing; an interrupted run is finished by the next."""

from __future__ import annotations

import json
import os
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import delete, insert, select, update

from context_storage import GitHubIssueTaskKey, TaskContextManager
from context_storage.metadata_file import load_metadata, write_metadata
from context_storage.task_context_manager import PRUNING
from context_storage.task_lock import TaskLock
from db import DatabaseConfig, DatabaseConnection, Task, TaskRepository, TaskRetention, TaskUsageQuery
from db.models import UsageBucket
from db.schema import upgrade_schema
from db.startup import start_database
from ops.backup import backup_database, restore_database
from ops.migrate_data import DataMigrationError, migrate_data
from ops.prune import plan_prune, prune
from tests.support.cli import run_here
from tests.support.data import task_data

LONG_AGO = datetime.now(UTC) - timedelta(days=200)


@pytest.fixture(params=["sqlite-file", "postgresql"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def finished_task(config: dict[str, Any], number: int, tokens: int, how: str = "complete", old: bool = True) -> str:
    manager = TaskContextManager(GitHubIssueTaskKey("acme", "web", number), str(uuid.uuid4()), config, user="ann")
    manager.get_message_store().add_message("user", f"issue {number}")
    manager.update_statistics(llm_calls=1, tokens=tokens)
    getattr(manager, how)(*(("it broke",) if how == "fail" else ()))
    if old:
        with DatabaseConnection.get_instance().engine.begin() as raw:
            raw.execute(
                update(Task)
                .where(Task.uuid == manager.uuid)
                .values(created_at=LONG_AGO, completed_at=LONG_AGO + timedelta(hours=1))
            )
    return manager.uuid


def tree_state(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every path under `root` (links not followed) with its mode, and a file's size and modification time. A
    directory's own time is left out: a reader of the SQLite file makes and removes its -wal and -shm."""
    state = {}
    for path in [root, *root.rglob("*")]:
        info = path.lstat()
        timed = not path.is_dir() or path.is_symlink()
        state[str(path.relative_to(root))] = (
            info.st_mode,
            info.st_size if timed else 0,
            info.st_mtime_ns if timed else 0,
        )
    return state


def rows() -> set[str]:
    with DatabaseConnection.get_instance().engine.connect() as raw:
        return set(raw.execute(select(Task.uuid)).scalars())


def tasks_of_every_kind(config: dict[str, Any], tmp_path: Path) -> dict[str, str]:
    """Old finished tasks (one with a second run's directory, one with links inside), old ones that must stay
    (statistics not yet written, a directory that is a link, one being worked on), a recent one."""
    base = Path(config["context_storage"]["base_dir"])
    completed = base / "completed"
    outside = tmp_path / "outside"
    (outside / "dir").mkdir(parents=True)
    (outside / "dir" / "keep.txt").write_text("not the task's")
    done = finished_task(config, 1, 100)
    failed = finished_task(config, 2, 200, "fail")
    stopped = finished_task(config, 3, 300, "stop")
    unsaved = finished_task(config, 4, 400)
    linked = finished_task(config, 5, 500)
    held = finished_task(config, 6, 600)
    recent = finished_task(config, 7, 700, old=False)
    (completed / f"{failed}-20260101T000000000000Z").mkdir()
    (completed / stopped / "to-file").symlink_to(outside / "dir" / "keep.txt")
    (completed / stopped / "to-dir").symlink_to(outside / "dir")
    metadata = load_metadata(completed / unsaved)
    write_metadata(completed / unsaved, {**metadata, "unsaved": {"statistics": {"tokens": 9}}})
    (completed / linked).rename(tmp_path / "moved")
    (completed / linked).symlink_to(tmp_path / "moved")
    names = ("done", "failed", "stopped", "unsaved", "linked", "held", "recent")
    return dict(zip(names, (done, failed, stopped, unsaved, linked, held, recent), strict=True))


def test_prune_removes_old_finished_tasks_and_their_directories_and_keeps_usage_and_everything_else(
    agent_config: dict[str, Any], tmp_path: Path
) -> None:
    base = Path(agent_config["context_storage"]["base_dir"])
    completed = base / "completed"
    tasks = tasks_of_every_kind(agent_config, tmp_path)
    done, failed, stopped, unsaved, linked, held, recent = tasks.values()
    running = TaskContextManager(GitHubIssueTaskKey("acme", "web", 8), str(uuid.uuid4()), agent_config)
    lock = TaskLock(base, held)
    lock.acquire()
    (tmp_path / "config.yaml").write_text(json.dumps(agent_config), encoding="utf-8")
    usage_before = TaskUsageQuery().per_user(zone="Asia/Kathmandu")
    DatabaseConnection.reset()

    assert run_here(tmp_path, "tasks", "prune", "--older-than", "30").returncode == 2  # inheritance: 90 days
    before = tree_state(tmp_path)
    dry = run_here(tmp_path, "tasks", "prune", "--older-than", "100")
    assert dry.returncode == 0, dry.stderr
    assert tree_state(tmp_path) == before  # the SQLite file, locks/, every directory: as they were
    assert "would prune 3 of the 6 tasks" in dry.stdout and "would remove 4 directories" in dry.stdout
    assert all(key in dry.stdout for key in (done, failed, stopped, unsaved, linked))
    assert "not yet written" in dry.stdout and "is a link" in dry.stdout

    DatabaseConnection.reset()
    pruned = run_here(tmp_path, "tasks", "prune", "--older-than", "100", "--yes")
    assert pruned.returncode == 1, pruned.stderr  # some were kept, and said why
    assert "pruned 3 tasks" in pruned.stdout and "4 directories" in pruned.stdout
    assert "being worked on" in pruned.stdout and "not yet written" in pruned.stdout
    start_database(agent_config)
    assert rows() == {unsaved, linked, held, recent, running.uuid}
    assert sorted(path.name for path in completed.iterdir()) == sorted([unsaved, linked, held, recent])
    assert (tmp_path / "outside" / "dir" / "keep.txt").read_text() == "not the task's" and (tmp_path / "moved").is_dir()
    assert TaskUsageQuery().per_user(zone="Asia/Kathmandu") == usage_before
    assert {path.stem for path in (base / "locks").iterdir()} == {held, running.uuid}  # none of prune's left

    lock.release()
    running.complete()
    DatabaseConnection.reset()
    again = run_here(tmp_path, "tasks", "prune", "--older-than", "100", "--yes")
    assert "pruned 1 tasks" in again.stdout and again.returncode == 1
    start_database(agent_config)
    assert rows() == {unsaved, linked, recent, running.uuid}
    assert TaskUsageQuery().per_user(zone="Asia/Kathmandu") == usage_before


class _Interrupted(TaskRetention):
    """Stops the run at its second batch, before or after the batch's transaction committed."""

    def __init__(self, after_commit: bool) -> None:
        super().__init__()
        self.after_commit = after_commit
        self.batches = 0

    def prune(self, uuids: Any, cutoff: datetime) -> list[str]:
        self.batches += 1
        if self.batches == 2 and not self.after_commit:
            raise KeyboardInterrupt
        deleted = super().prune(uuids, cutoff)
        if self.batches == 2:
            raise KeyboardInterrupt
        return deleted


@pytest.mark.parametrize("after_commit", [False, True])
def test_an_interrupted_prune_is_finished_by_the_next_and_no_directory_outlives_its_row(
    agent_config: dict[str, Any], after_commit: bool
) -> None:
    base = Path(agent_config["context_storage"]["base_dir"])
    old = [finished_task(agent_config, number, 10 * number) for number in range(1, 6)]
    usage_before = TaskUsageQuery().per_user()
    cutoff = datetime.now(UTC) - timedelta(days=100)
    repository = TaskRepository()
    with pytest.raises(KeyboardInterrupt):
        prune(base, _Interrupted(after_commit), repository, cutoff, batch_size=2)
    left_aside = [path.name for path in (base / "completed").iterdir() if path.name.startswith(PRUNING)]
    assert len(left_aside) == 2
    if not after_commit:
        # An agent resuming a task set aside while its row remains takes its directory back, files and all.
        key = left_aside[0].removeprefix(PRUNING)
        resumed = TaskContextManager(GitHubIssueTaskKey("acme", "web", 99), key, agent_config, is_resumed=True)
        assert resumed.get_message_store().count_messages() > 0
        resumed.stop()
        old.remove(key)
    # Set aside or not, every directory's row is still there, or its directory is on its way out.
    assert TaskUsageQuery().per_user() == usage_before
    assert plan_prune(base, TaskRetention(), cutoff).leftovers == (2 if after_commit else 1)
    result = prune(base, TaskRetention(), repository, cutoff, batch_size=2)
    assert result.leftovers_removed == (2 if after_commit else 0)
    assert result.tasks == (1 if after_commit else 2) and not result.skipped
    assert rows().isdisjoint(old) and all(path.name not in old for path in (base / "completed").iterdir())
    assert TaskUsageQuery().per_user() == usage_before
    assert not [name for name in os.listdir(base / "locks")]


def old_finished(connection: DatabaseConnection, count: int, user: str, tokens: int) -> None:
    when = LONG_AGO - timedelta(minutes=count)
    rows = [
        task_data(
            user=user, status="completed", created_at=when, updated_at=when, completed_at=when, total_tokens=tokens
        )
        for _ in range(count)
    ]
    with connection.engine.begin() as raw:
        raw.execute(insert(Task), [Task.check_values(row) for row in rows])


def prune_all(connection: DatabaseConnection) -> int:
    retention = TaskRetention(connection)
    cutoff = datetime.now(UTC) - timedelta(days=100)
    return sum(len(retention.prune([task.uuid for task in batch], cutoff)) for batch in [retention.prunable(cutoff)])


def test_a_restore_brings_the_usage_of_pruned_tasks_back_with_the_tasks_in_place_of_the_current(
    blank_connection: DatabaseConnection, tmp_path: Path
) -> None:
    upgrade_schema(blank_connection)
    old_finished(blank_connection, 10, "ann", 7)
    assert prune_all(blank_connection) == 10
    old_finished(blank_connection, 3, "bob", 5)  # not pruned: tasks
    at_backup = TaskUsageQuery(blank_connection).per_user()
    backup = backup_database(blank_connection, tmp_path / "backups" / "tasks.dump")
    old_finished(blank_connection, 4, "ann", 1000)
    assert prune_all(blank_connection) == 7
    assert TaskUsageQuery(blank_connection).per_user() != at_backup
    restore_database(blank_connection, backup)
    assert TaskUsageQuery(blank_connection).per_user() == at_backup


def test_migrate_data_carries_the_usage_of_pruned_tasks_into_an_empty_target_only(
    blank_connection: DatabaseConnection, tmp_path: Path
) -> None:
    target = blank_connection.config
    DatabaseConnection.reset()
    source_path = tmp_path / "source.db"
    source = DatabaseConnection.initialize(DatabaseConfig(url=f"sqlite:///{source_path}"))
    upgrade_schema(source)
    old_finished(source, 6, "ann", 11)
    old_finished(source, 2, "bob", 0)
    assert prune_all(source) == 8
    old_finished(source, 3, "ann", 1)
    expected = TaskUsageQuery(source).per_user()
    DatabaseConnection.reset()
    connection = DatabaseConnection.initialize(target)
    first = migrate_data(str(source_path), connection)
    assert first.copied == 3 and first.usage_buckets > 0
    assert TaskUsageQuery(connection).per_user() == expected
    # Run again, or after the target pruned tasks of its own: its buckets cannot tell which tasks they stand
    # for, so a copy that could bring one back beside its usage is refused whole, the target untouched.
    with DatabaseConnection.get_instance().engine.begin() as raw:
        raw.execute(update(Task).values(completed_at=LONG_AGO))
    prune_all(connection)
    before = (TaskUsageQuery(connection).per_user(), rows())
    for overwrite in (False, True):
        with pytest.raises(DataMigrationError, match="twice"):
            migrate_data(str(source_path), connection, overwrite=overwrite)
    assert (TaskUsageQuery(connection).per_user(), rows()) == before
    # A pruned source into a target that holds tasks (perhaps the pruned ones): refused as well.
    with DatabaseConnection.get_instance().engine.begin() as raw:
        raw.execute(delete(UsageBucket))
    old_finished(connection, 1, "cy", 9)
    with pytest.raises(DataMigrationError, match="twice"):
        migrate_data(str(source_path), connection)


def test_stray_links_and_files_in_the_tree_are_kept_and_stop_nothing_else(
    agent_config: dict[str, Any], tmp_path: Path
) -> None:
    base = Path(agent_config["context_storage"]["base_dir"])
    completed, locks = base / "completed", base / "locks"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("not the task's")
    dangling, directory, linked_out, blocked, healthy = (finished_task(agent_config, n, 5) for n in range(1, 6))
    locks.mkdir(exist_ok=True)
    (locks / f"{dangling}.lock").symlink_to(tmp_path / "nowhere")
    (locks / f"{directory}.lock").mkdir()
    (locks / f"{linked_out}.lock").symlink_to(outside / "keep.txt")
    # Names only a prune gives, but not what a prune makes: a link out of the tree and a file.
    (completed / f"{PRUNING}{uuid.uuid4()}").symlink_to(outside)
    (completed / f"{PRUNING}{uuid.uuid4()}").write_text("a file")
    (completed / f"{PRUNING}{blocked}").mkdir()  # beside completed/<blocked>: neither may replace the other
    cutoff = datetime.now(UTC) - timedelta(days=100)
    result = prune(base, TaskRetention(), TaskRepository(), cutoff, batch_size=2)
    assert result.tasks == 1 and not (completed / healthy).exists()
    assert {uuid for uuid, _ in result.skipped} == {dangling, directory, linked_out, blocked}
    assert rows() >= {dangling, directory, linked_out, blocked}
    assert all((completed / key).is_dir() for key in (dangling, directory, linked_out, blocked))
    assert (completed / f"{PRUNING}{blocked}").is_dir()
    assert sorted(path.name for path in outside.iterdir()) == ["keep.txt"]
    assert (outside / "keep.txt").read_text() == "not the task's"
