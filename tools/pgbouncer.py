"""A real PgBouncer in transaction pooling mode in front of a test server, started from the machine's binary.

PgBouncer refuses to run as root, so as root it runs as the `postgres` user, as the throwaway clusters do.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from sqlalchemy.engine import URL


class PgBouncerUnavailableError(RuntimeError):
    """No pgbouncer binary, or it did not start; the message says which."""


def find_pgbouncer() -> str | None:
    return shutil.which("pgbouncer") or next(
        (path for path in ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer") if Path(path).exists()), None
    )


class PgBouncer:
    """PgBouncer on a port of its own, pooling `database` of the server at `server_url` for `user`."""

    def __init__(self, server_url: URL, database: str, user: str, password: str, pool_size: int = 10) -> None:
        binary = find_pgbouncer()
        if binary is None:
            raise PgBouncerUnavailableError("pgbouncer is not installed: apt-get install pgbouncer (./dev setup does)")
        self.binary = binary
        self.root = Path(tempfile.mkdtemp(prefix="pgbouncer-"))
        self.run_as = "postgres" if os.geteuid() == 0 else None
        self.user, self.password, self.database = user, password, database
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self._held: socket.socket | None = None
        self.config = self.root / "pgbouncer.ini"
        # The port is held until PgBouncer is about to bind it, so that nothing else takes it meanwhile.
        self._held = socket.socket()
        self._held.bind(("127.0.0.1", 0))
        self.port = int(self._held.getsockname()[1])
        (self.root / "userlist.txt").write_text(f'"{user}" "{password}"\n', encoding="utf-8")
        self.config.write_text(
            "\n".join(
                [
                    "[databases]",
                    f"{database} = host={server_url.host} port={server_url.port} dbname={database}",
                    "[pgbouncer]",
                    "listen_addr = 127.0.0.1",
                    f"listen_port = {self.port}",
                    f"unix_socket_dir = {self.root}",
                    "auth_type = scram-sha-256",
                    f"auth_file = {self.root / 'userlist.txt'}",
                    "pool_mode = transaction",
                    f"default_pool_size = {pool_size}",
                    f"max_db_connections = {pool_size}",
                    "max_client_conn = 500",
                    "server_reset_query =",
                    "ignore_startup_parameters = extra_float_digits",
                    f"logfile = {self.root / 'pgbouncer.log'}",
                    f"pidfile = {self.root / 'pgbouncer.pid'}",
                    "",
                ]
            ),
            encoding="utf-8",
        )
        if self.run_as is not None:
            entry = pwd.getpwnam(self.run_as)
            for path in (self.root, *self.root.iterdir()):
                os.chown(path, entry.pw_uid, entry.pw_gid)
            self.root.chmod(0o700)

    @property
    def url(self) -> URL:
        return URL.create(
            "postgresql+psycopg2",
            username=self.user,
            password=self.password,
            host="127.0.0.1",
            port=self.port,
            database=self.database,
        )

    def start(self) -> None:
        kwargs: dict[str, object] = {}
        if self.run_as is not None:
            entry = pwd.getpwnam(self.run_as)
            kwargs = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
        if self._held is not None:
            self._held.close()
            self._held = None
        # Everything it says goes to its logfile too: a pipe nobody reads would fill, and PgBouncer, blocked
        # writing to it, would stop serving (it logs every dropped client of a restart).
        self.process = subprocess.Popen(  # type: ignore[call-overload]
            [self.binary, str(self.config)],
            cwd=self.root,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            **kwargs,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise PgBouncerUnavailableError(f"pgbouncer exited: {self.log_tail()}")
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise PgBouncerUnavailableError(f"pgbouncer did not listen on {self.port}: {self.log_tail()}")

    def restart(self) -> None:
        """Stop it at once (every client connection drops) and start it again on the same port."""
        self.kill()
        self.start()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=20)

    def log_tail(self) -> str:
        try:
            return (self.root / "pgbouncer.log").read_text(encoding="utf-8", errors="replace")[-2000:]
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        self.kill()
        if self._held is not None:
            self._held.close()
        shutil.rmtree(self.root, ignore_errors=True)
