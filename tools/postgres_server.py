"""A real PostgreSQL server for tests and benchmarks.

In order: `TEST_DATABASE_URL` when set; a `postgres:16` container when a Docker engine answers; else a
throwaway cluster started from this machine's PostgreSQL binaries on a free port (as the `postgres` user when
running as root, since initdb and pg_ctl refuse root), removed afterwards.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg2
from sqlalchemy.engine import URL, make_url

# Every character that needs escaping somewhere in a URL, so the suite proves passwords survive intact.
# Databases the suite creates for itself are named after this, and dropped afterwards.
TEST_DATABASE = "agent_test"
SUPERUSER_PASSWORD = "p@ss:w/rd%#?&=+ ;'\"[]ü"
SUPERUSER = "postgres"
# fsync off only skips flushing to disk, which an operating system that keeps running never needs; commits
# stay synchronous so that a crash of the server (pg_ctl stop -m immediate) loses nothing committed.
CLUSTER_SETTINGS = {
    "listen_addresses": "127.0.0.1",
    "fsync": "off",
    "full_page_writes": "off",
    "max_connections": "300",
    "shared_buffers": "256MB",
    "shared_preload_libraries": "pg_stat_statements",
}


class PostgresUnavailableError(RuntimeError):
    """No PostgreSQL server could be had; the message says what was tried."""


@dataclass
class PostgresServer:
    """A running server: `url` reaches its maintenance database as a superuser."""

    url: URL
    description: str
    stop: Callable[[], None]
    cluster: ThrowawayCluster | None = None

    def database_url(self, name: str) -> URL:
        return self.url.set(database=name)

    def execute_admin(self, *statements: str) -> list[Any]:
        """Run statements outside a transaction (CREATE DATABASE needs that); return the last one's rows."""
        url = self.url
        conn = psycopg2.connect(
            host=url.host, port=url.port, user=url.username, password=url.password, dbname=url.database
        )
        try:
            conn.autocommit = True
            rows: list[Any] = []
            with conn.cursor() as cursor:
                for statement in statements:
                    cursor.execute(statement)
                    rows = cursor.fetchall() if cursor.description else []
            return rows
        finally:
            conn.close()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def find_bindir() -> Path | None:
    """The directory of initdb/pg_ctl: PG_BINDIR, the newest /usr/lib/postgresql/*/bin, or the PATH."""
    explicit = os.environ.get("PG_BINDIR")
    if explicit:
        return Path(explicit)
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).resolve().parent if initdb else None


# Run beside each throwaway cluster: once the process that started the cluster is gone, however it ended (a run
# killed at a timeout, a second Ctrl-C), it stops the server and removes its directory. It learns of that end
# from a pipe whose writing end only that process holds: reading it returns nothing once no one does.
_WATCHDOG = """
import os, pwd, shutil, subprocess, sys
lifeline, pg_ctl, data, root, run_as = int(sys.argv[1]), *sys.argv[2:6]
while os.read(lifeline, 1):
    pass
who = {}
if run_as:
    entry = pwd.getpwnam(run_as)
    who = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
if os.path.exists(data):
    stop = [pg_ctl, "stop", "-D", data, "-m", "immediate", "-w"]
    subprocess.run(stop, capture_output=True, timeout=120, check=False, **who)
shutil.rmtree(root, ignore_errors=True)
"""


class ThrowawayCluster:
    """A private PostgreSQL cluster in a temporary directory; `restart` is there for fault tests."""

    def __init__(self, bindir: Path, settings: dict[str, str] | None = None) -> None:
        self.bindir = bindir
        self.settings = {**CLUSTER_SETTINGS, **(settings or {})}
        self.run_as = "postgres" if os.geteuid() == 0 else None
        self.root = Path(tempfile.mkdtemp(prefix="pgtest-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.port = 0
        self._lifeline: int | None = None
        self._watchdog: subprocess.Popen[bytes] | None = None

    def _watch(self) -> None:
        reading, self._lifeline = os.pipe()
        arguments = [str(reading), str(self.bindir / "pg_ctl"), str(self.data), str(self.root), self.run_as or ""]
        self._watchdog = subprocess.Popen(
            [sys.executable, "-c", _WATCHDOG, *arguments],
            pass_fds=(reading,),
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(reading)

    def _run(
        self, *args: str, timeout: float = 120, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        kwargs: dict[str, Any] = {}
        if self.run_as is not None:
            entry = pwd.getpwnam(self.run_as)
            kwargs = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
        env = {**os.environ, "HOME": str(self.root), "LC_ALL": "C.UTF-8", **(env or {})}
        result = subprocess.run(
            [str(self.bindir / args[0]), *args[1:]],
            cwd=self.root,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            **kwargs,
        )
        if result.returncode != 0:
            raise PostgresUnavailableError(f"{args[0]} failed ({result.returncode}): {result.stderr.strip()[-2000:]}")
        return result

    def start(self) -> URL:
        self._watch()
        if self.run_as is not None:
            entry = pwd.getpwnam(self.run_as)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        password_file = self.root / "pwfile"
        password_file.write_text(SUPERUSER_PASSWORD + "\n", encoding="utf-8")
        if self.run_as is not None:
            os.chown(password_file, pwd.getpwnam(self.run_as).pw_uid, -1)
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            SUPERUSER,
            "--pwfile",
            str(password_file),
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "-E",
            "UTF8",
            "--no-locale",
            "--no-sync",
        )
        password_file.unlink()
        return self._start_on_a_free_port()

    def _start_on_a_free_port(self) -> URL:
        last_error: Exception | None = None
        for _ in range(3):
            self.port = free_port()
            try:
                self._pg_ctl("start")
                return self.url
            except PostgresUnavailableError as exc:
                last_error = exc
        raise PostgresUnavailableError(f"the throwaway cluster did not start: {last_error}; log: {self._log_tail()}")

    def _pg_ctl(self, action: str, *extra: str) -> None:
        options = " ".join(
            f"-c {key}={value}"
            for key, value in {
                **self.settings,
                "port": str(self.port),
                "unix_socket_directories": str(self.root),
            }.items()
        )
        self._run("pg_ctl", action, "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "-o", options, *extra)

    def standby(self) -> ThrowawayCluster:
        """A streaming standby of this running cluster: a copy made by `pg_basebackup -R` (which also writes
        how to follow this one), started on a free port. Stop it with `stop` as any cluster."""
        standby = ThrowawayCluster(self.bindir, self.settings)
        standby._watch()
        if standby.run_as is not None:
            entry = pwd.getpwnam(standby.run_as)
            os.chown(standby.root, entry.pw_uid, entry.pw_gid)
        standby._run(
            "pg_basebackup",
            *("-h", "127.0.0.1", "-p", str(self.port), "-U", SUPERUSER, "-D", str(standby.data)),
            *("-R", "-X", "stream", "--checkpoint=fast", "--no-sync"),
            env={"PGPASSWORD": SUPERUSER_PASSWORD},
        )
        standby._start_on_a_free_port()
        return standby

    def promote(self) -> None:
        """Make this standby a primary, and wait until it accepts writes."""
        self._run("pg_ctl", "promote", "-D", str(self.data), "-w", "-t", "60")

    def restart(self, mode: str = "fast") -> None:
        """Restart the server; `immediate` is a crash as far as clients can tell."""
        self._pg_ctl("restart", "-m", mode)

    def shutdown(self, mode: str = "fast") -> None:
        """Stop the server but keep its data, for `resume`."""
        self._run("pg_ctl", "stop", "-D", str(self.data), "-m", mode, "-w")

    def resume(self) -> None:
        """Start the server again on the same port."""
        self._pg_ctl("start")

    @property
    def url(self) -> URL:
        return URL.create(
            "postgresql+psycopg2",
            username=SUPERUSER,
            password=SUPERUSER_PASSWORD,
            host="127.0.0.1",
            port=self.port,
            database="postgres",
        )

    def _log_tail(self) -> str:
        try:
            return self.log.read_text(encoding="utf-8", errors="replace")[-2000:]
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        try:
            if self.data.exists():
                self._run("pg_ctl", "stop", "-D", str(self.data), "-m", "immediate", "-w")
        except PostgresUnavailableError:
            pass
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
            if self._lifeline is not None:
                os.close(self._lifeline)
                self._lifeline = None
            if self._watchdog is not None:
                # It ends at once, unless a process forked from this one still holds the pipe: it ends with that.
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._watchdog.wait(timeout=10)
                self._watchdog = None


def _docker_engine_answers() -> bool:
    try:
        import docker

        docker.from_env(timeout=3).ping()  # type: ignore[attr-defined]
    except Exception:
        return False
    return True


def _start_container() -> PostgresServer:
    from testcontainers.postgres import PostgresContainer

    container = PostgresContainer("postgres:16", username=SUPERUSER, password=SUPERUSER_PASSWORD, dbname="postgres")
    container.start()
    url = URL.create(
        "postgresql+psycopg2",
        username=SUPERUSER,
        password=SUPERUSER_PASSWORD,
        host=container.get_container_host_ip(),
        port=int(container.get_exposed_port(5432)),
        database="postgres",
    )
    return PostgresServer(url, "postgres:16 container (testcontainers)", container.stop)


def _server_url(text: str) -> URL:
    """TEST_DATABASE_URL as the URL of a server on which the suite creates and drops databases of its own."""
    try:
        url = make_url(text)
    except Exception:
        raise PostgresUnavailableError("TEST_DATABASE_URL is not a valid URL") from None
    if url.get_backend_name() not in ("postgresql", "postgres"):
        raise PostgresUnavailableError(
            f"TEST_DATABASE_URL must name a PostgreSQL server (postgresql://user:password@host:port/postgres), "
            f"not {url.get_backend_name()}"
        )
    # The database it names is only where the suite connects to create its own.
    return url.set(drivername="postgresql+psycopg2")


def start_postgres(*, need_cluster: bool = False) -> PostgresServer:
    """Start or find a server; `need_cluster` insists on a throwaway cluster that the caller may restart."""
    tried: list[str] = []
    if not need_cluster:
        explicit = os.environ.get("TEST_DATABASE_URL")
        if explicit:
            return PostgresServer(_server_url(explicit), "TEST_DATABASE_URL", lambda: None)
        tried.append("TEST_DATABASE_URL is not set")
        if _docker_engine_answers():
            try:
                return _start_container()
            except Exception as exc:
                tried.append(f"a postgres:16 container did not start ({type(exc).__name__}: {exc})")
        else:
            tried.append("no Docker engine answers")
    bindir = find_bindir()
    if bindir is None:
        tried.append("no PostgreSQL binaries (initdb) found: install the postgresql package or set PG_BINDIR")
        raise PostgresUnavailableError("; ".join(tried))
    cluster = ThrowawayCluster(bindir)
    try:
        url = cluster.start()
    except (PostgresUnavailableError, OSError, KeyError, subprocess.TimeoutExpired) as exc:
        cluster.stop()
        tried.append(f"throwaway cluster from {bindir} failed: {exc}")
        raise PostgresUnavailableError("; ".join(tried)) from exc
    return PostgresServer(url, f"throwaway cluster from {bindir} on port {cluster.port}", cluster.stop, cluster)
