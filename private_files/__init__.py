"""Files and directories that hold task data: opened by exactly the path given, private to their owner.

Apart from `db` and `context_storage`, both of which use it: it loads neither SQLAlchemy nor the database code.

SQLite reads a `file:` URI's `%`, `?` and `#` as syntax, so a path is always handed over as a properly
encoded URI (or opened by the driver as a plain name), never pasted into one. New files are created 0600
and new directories 0700 whatever the umask; existing ones keep their permissions.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

PRIVATE_FILE = 0o600
PRIVATE_DIR = 0o700


def sqlite_uri(path: str | os.PathLike[str], *, read_only: bool) -> str:
    """A `file:` URI naming exactly `path` (percent-encoded) that never creates a file.

    Read-only: a WAL database opened read-only leaves `-wal` and `-shm` files behind, so a WAL file without a
    `-wal` (nothing uncheckpointed to read) is opened as immutable, which creates nothing; any other file is
    opened read-only with its locks. Read-write: the
    last connection to close removes the WAL files it made, so a connection that writes nothing leaves the
    directory as it found it.
    """
    absolute = Path(os.path.abspath(path))
    uri = absolute.as_uri()
    if not read_only:
        return f"{uri}?mode=rw"
    if _in_wal_mode(absolute) and not absolute.with_name(absolute.name + "-wal").exists():
        return f"{uri}?mode=ro&immutable=1"
    # A rollback-journal file is read with its locks, never as immutable: a writer may be changing it (an old
    # agent still running), and reading through its write would see a half-written file.
    return f"{uri}?mode=ro"


def _in_wal_mode(path: Path) -> bool:
    """Whether the SQLite file's header says WAL (its read and write versions are 2)."""
    try:
        with path.open("rb") as file:
            header = file.read(20)
    except OSError:
        return False
    return header.startswith(b"SQLite format 3\x00") and header[18:20] == b"\x02\x02"


def connect_sqlite(
    path: str | os.PathLike[str], *, read_only: bool, timeout: float = 5.0, check_same_thread: bool = True
) -> sqlite3.Connection:
    """Open the existing SQLite file at `path` (sqlite3.OperationalError if there is none); see `sqlite_uri`."""
    return sqlite3.connect(
        sqlite_uri(path, read_only=read_only), uri=True, timeout=timeout, check_same_thread=check_same_thread
    )


def make_private_dirs(path: str | os.PathLike[str]) -> None:
    """Create `path` and any missing parents as 0700 directories; existing ones are left as they are."""
    directory = Path(path)
    missing: list[Path] = []
    while not directory.exists():
        missing.append(directory)
        if directory.parent == directory:
            break
        directory = directory.parent
    for created in reversed(missing):
        with contextlib.suppress(FileExistsError):
            created.mkdir(mode=PRIVATE_DIR)
            os.chmod(created, PRIVATE_DIR)  # mkdir's mode passes through the umask


def create_private_file(path: str | os.PathLike[str], *, exclusive: bool = False) -> bool:
    """Create `path` empty with mode 0600 unless it exists (an error when `exclusive`); True if created."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    try:
        descriptor = os.open(path, flags, PRIVATE_FILE)
    except FileExistsError:
        if exclusive:
            raise
        return False
    try:
        os.fchmod(descriptor, PRIVATE_FILE)
    finally:
        os.close(descriptor)
    return True


def open_private(path: str | os.PathLike[str], flags: int) -> int:
    """`os.open(path, flags | O_CREAT)`; a file it creates is made 0600 whatever the umask."""
    try:
        descriptor = os.open(path, flags | os.O_CREAT | os.O_EXCL, PRIVATE_FILE)
    except FileExistsError:
        return os.open(path, flags & ~os.O_CREAT)
    os.fchmod(descriptor, PRIVATE_FILE)
    return descriptor


def partial_path(target: Path) -> Path:
    """Where a file is written before it is complete enough to take `target`'s name."""
    return target.with_name(f".{target.name}.partial")


def remove_with_journals(path: Path) -> None:
    """Remove a SQLite file and its journal, WAL and shared-memory files, if present."""
    for suffix in ("", "-journal", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            path.with_name(path.name + suffix).unlink()


@contextlib.contextmanager
def written_then_named(target: Path) -> Iterator[Path]:
    """Yield a private temporary path beside `target`; renamed to `target` only when the block succeeds."""
    if target.exists():
        raise FileExistsError(f"{target} exists; choose a new path")
    make_private_dirs(target.parent)
    temporary = partial_path(target)
    remove_with_journals(temporary)
    create_private_file(temporary, exclusive=True)
    try:
        yield temporary
        os.replace(temporary, target)
    finally:
        remove_with_journals(temporary)
