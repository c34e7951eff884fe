"""main.py run as a user runs it: a subprocess, configured by config.yaml and the environment."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.support.data import child_environment

# The project's root: what a user's clone holds.
ROOT = Path(__file__).resolve().parents[2]
MAIN = ROOT / "main.py"


def run(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = child_environment()
    return subprocess.run(
        [sys.executable, str(MAIN), *args],
        cwd=cwd,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0]
