"""The suite's throwaway PostgreSQL clusters leave nothing behind, even when the run that started one is killed."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.cli import ROOT
from tests.support.data import child_environment

# The watchdog gives `pg_ctl stop` this long before it removes the directory anyway.
WATCHDOG_STOP_SECONDS = 120

STARTER = """
import time
from tools.postgres_server import start_postgres
server = start_postgres(need_cluster=True)
print(server.cluster.root, server.cluster.port, flush=True)
time.sleep(600)
"""


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return True
    except OSError:
        return False


@pytest.mark.postgres
def test_a_cluster_whose_test_process_was_killed_is_stopped_and_removed() -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", STARTER], cwd=ROOT, env=child_environment(), stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        root, port_text = child.stdout.readline().split()
        port = int(port_text)
        assert (Path(root) / "data").is_dir() and _answers(port)
    finally:
        child.kill()  # SIGKILL: no finally, no atexit in that process
        child.wait()
    deadline = time.monotonic() + WATCHDOG_STOP_SECONDS + 10
    while (Path(root).exists() or _answers(port)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not Path(root).exists(), "the killed run's cluster directory is still there"
    assert not _answers(port), "the killed run's server still answers"
