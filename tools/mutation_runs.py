"""Mutation runs of the suite, one part of the code at a time (docs/testing.md).

    .venv/bin/python -m tools.mutation_runs PART [--survivors]

Each part runs in its own copy of the project under .mutation/PART/, refreshed from the working tree before
every run, with a `[tool.mutmut]` of its own: which module is mutated and which tests judge it. mutmut keeps
its results there between runs; `--survivors` runs the last run's survivors again (mutmut keeps the result
of a mutant whose function did not change, so a new test only counts once its survivors run again). Parts
that need PostgreSQL get a throwaway cluster, or the server `TEST_DATABASE_URL` names.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Tests that restart servers of their own, or drive a browser, take minutes per mutant: left out.
SLOW = (
    "not restarts_under_load and not pgbouncer and not crash and not ssl and not eight_processes"
    " and not browser and not dashboard and not scale"
)
SERVER_TESTS = (
    "tests/db/test_contract.py",
    "tests/db/test_transient_errors.py",
    "tests/db/test_task_repository.py",
    "tests/deployment/test_faults.py",
    "tests/db/test_db_connection.py",
    "tests/db/test_task_usage.py",
)


@dataclass(frozen=True)
class Part:
    mutated: tuple[str, ...]
    tests: tuple[str, ...]  # empty: every test that reaches the mutated function
    server: bool

    @property
    def pytest_args(self) -> list[str]:
        chosen = ["-k", SLOW] if self.server else ["-m", "not postgres"]
        return ["-p", "no:cacheprovider", *chosen]


PARTS = {
    "task_context_manager": Part(("context_storage/task_context_manager.py",), (), server=False),
    "config": Part(("db/config.py",), ("tests/db/test_db_config.py",), server=False),
    "repositories": Part(
        ("db/repositories/task_repository.py", "db/repositories/task_usage.py"), SERVER_TESTS, server=True
    ),
    "unit_of_work": Part(("db/unit_of_work.py",), SERVER_TESTS, server=True),
}


def _copy_of_the_project(name: str, part: Part) -> Path:
    """.mutation/NAME: the working tree's tracked files (copied when changed) and a [tool.mutmut] for `part`."""
    copy = ROOT / ".mutation" / name
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True).stdout
    for relative in filter(None, tracked.decode().split("\0")):
        source, target = ROOT / relative, copy / relative
        if source.is_file() and (not target.exists() or target.read_bytes() != source.read_bytes()):
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    section = re.search(r"^\[tool\.mutmut\]\n(?:(?!\[).*\n)*", pyproject, re.MULTILINE)
    if section is None:
        raise SystemExit("pyproject.toml has no [tool.mutmut] section")
    kept = [line for line in section[0].splitlines() if line.startswith(("source_paths", "also_copy"))]
    settings = {
        "only_mutate": list(part.mutated),
        "pytest_add_cli_args": part.pytest_args,
        "pytest_add_cli_args_test_selection": list(part.tests),
    }
    table = "\n".join(["[tool.mutmut]", *kept, *(f"{key} = {json.dumps(value)}" for key, value in settings.items())])
    (copy / "pyproject.toml").write_text(pyproject.replace(section[0], table + "\n\n"), encoding="utf-8")
    return copy


@contextmanager
def _server_for_the_tests(needed: bool) -> Iterator[dict[str, str]]:
    """The environment of the run: TEST_DATABASE_URL naming a server when the part needs one."""
    env = dict(os.environ)
    if not needed:
        yield env
        return
    from tools.postgres_server import TEST_DATABASE, start_postgres

    server = start_postgres(need_cluster=not env.get("TEST_DATABASE_URL"))
    listed = f"SELECT datname FROM pg_database WHERE datname LIKE '{TEST_DATABASE}\\_%'"
    before = {row[0] for row in server.execute_admin(listed)}
    try:
        env["TEST_DATABASE_URL"] = server.url.render_as_string(hide_password=False)
        yield env
    finally:
        # Tests stopped at a mutant's first failure, or at its timeout, leave the databases they made.
        left = sorted({row[0] for row in server.execute_admin(listed)} - before)
        server.execute_admin(*(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)' for name in left))
        server.stop()


MUTMUT = str(Path(sys.executable).with_name("mutmut"))


def _statuses(copy: Path) -> dict[str, str]:
    results = [MUTMUT, "results", "--all", "true"]
    lines = subprocess.run(results, cwd=copy, check=True, capture_output=True, text=True).stdout.splitlines()
    return dict(line.strip().rsplit(": ", 1) for line in lines if ": " in line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=sorted(PARTS))
    parser.add_argument("--survivors", action="store_true", help="run the last run's survivors again")
    parser.add_argument("--max-children", type=int, default=2)
    arguments = parser.parse_args()
    part = PARTS[arguments.part]
    copy = _copy_of_the_project(arguments.part, part)
    names = []
    if arguments.survivors:
        names = [name for name, status in _statuses(copy).items() if status == "survived"]
        if not names:
            raise SystemExit("no survivors to run again")
    with _server_for_the_tests(part.server) as env:
        run = [MUTMUT, "run", "--max-children", str(arguments.max_children), *names]
        subprocess.run(run, cwd=copy, env=env, check=False)
    statuses = _statuses(copy)
    for module in part.mutated:
        prefix = module.removesuffix(".py").replace("/", ".") + "."
        counted = Counter(status for name, status in statuses.items() if name.startswith(prefix))
        caught = counted["killed"] + counted["timeout"]
        judged = caught + counted["survived"] + counted["no tests"]
        score = f"{100 * caught / judged:.1f}%" if judged else "-"
        print(f"{module}: {caught} / {judged} killed ({score}); {dict(counted)}")
    survivors = [name for name, status in statuses.items() if status == "survived"]
    print(f"{len(survivors)} survivors; `mutmut show NAME` in {copy.relative_to(ROOT)} prints one:")
    print("\n".join(survivors))


if __name__ == "__main__":
    main()
