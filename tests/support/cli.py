"""main.py run as a user runs it: configured by config.yaml and the environment; in a subprocess where the
process is the point, in this one where only the command's answer is."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from cli.app import main
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


def run_here(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`main.py ARGS` in this process, in `cwd`, with `env` added to the environment: the same answer as `run`
    (exit status, standard output and error) without the cost of a new interpreter."""
    out, err = io.StringIO(), io.StringIO()
    # What main.py's logging.basicConfig would print to standard error, where the test's handlers already are.
    logged = logging.StreamHandler(err)
    logged.setLevel(logging.DEBUG if {"-v", "--verbose"} & set(args) else logging.WARNING)
    logged.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(logged)
    try:
        with _inside(cwd, env), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                status = main(list(args))
            except SystemExit as exit_:  # argparse's usage errors and --help
                status = exit_.code if isinstance(exit_.code, int) else 0 if exit_.code is None else 2
    finally:
        root.removeHandler(logged)
    return subprocess.CompletedProcess(["main.py", *args], status, out.getvalue(), err.getvalue())


@contextlib.contextmanager
def _inside(cwd: Path, env: dict[str, str]) -> Iterator[None]:
    before_cwd = Path.cwd()
    before_env = {name: os.environ.get(name) for name in env}
    os.chdir(cwd)
    os.environ.update(env)
    try:
        yield
    finally:
        os.chdir(before_cwd)
        for name, value in before_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
