"""What a user installs is what the tree holds: every package is packaged, copied into the image and
type-checked, and a plain (non-editable) install imports each of them and runs the command line."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import venv
import zipfile
from pathlib import Path

from tests.support.cli import ROOT
from tests.support.data import child_environment

# Trees of the repository that are not part of what is installed.
NOT_INSTALLED = {"tests", "tools", "bench"}


def packages() -> list[str]:
    return sorted(
        path.name for path in ROOT.iterdir() if (path / "__init__.py").is_file() and path.name not in NOT_INSTALLED
    )


def test_every_package_is_packaged_copied_into_the_image_and_type_checked() -> None:
    included = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    copied = set(re.findall(r"(?m)^COPY (\w+) \./\1$", (ROOT / "Dockerfile").read_text()))
    checked_line = next(line for line in (ROOT / ".ci/run").read_text().splitlines() if "mypy" in line)
    assert {"db", "context_storage", "dashboard", "cli"} <= set(packages())
    for package in packages():
        assert f"{package}*" in included, package
        assert package in copied, package
        assert package in checked_line.split(), package


def test_a_plain_install_imports_every_package_and_runs_the_command_line(tmp_path: Path) -> None:
    # Built from a copy of the tree: nothing left over from an earlier build in the clone can slip in.
    source = tmp_path / "source"
    shutil.copytree(
        ROOT,
        source,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", ".mutation", ".hypothesis", "build", "*.egg-info", "__pycache__", "contexts"
        ),
    )
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(wheels), "."],
        cwd=source,
        check=True,
        capture_output=True,
    )
    (wheel,) = wheels.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert any(name.startswith("db/migrations/versions/") and name.endswith(".py") for name in names)
    assert any(name.startswith("dashboard/templates/") for name in names)
    # A fresh environment, whose dependencies are the project's own (found through a path entry, where the
    # editable install's hook is not run): only what the wheel holds of this project can be imported.
    environment = tmp_path / "env"
    venv.create(environment, with_pip=False)
    python = environment / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    Path(site, "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    work = tmp_path / "work"
    work.mkdir()
    env = {**child_environment(), "PYTHONPATH": ""}
    imported = subprocess.run(
        [str(python), "-c", f"import {', '.join(packages())}; import db; print(db.__file__)"],
        cwd=work,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    assert imported.stdout.strip().startswith(site), imported.stdout
    helped = subprocess.run(
        [str(python), "-m", "cli", "--help"], cwd=work, env=env, capture_output=True, text=True, check=False
    )
    assert helped.returncode == 0 and "every command" in helped.stdout, helped.stderr
    started = subprocess.run([str(python), "-m", "cli"], cwd=work, env=env, capture_output=True, text=True, check=False)
    assert started.returncode == 0 and "backend:     sqlite" in started.stdout, started.stderr
    assert (work / "contexts" / "tasks.db").is_file() and os.access(work / "contexts" / "tasks.db", os.R_OK)


def test_the_file_helpers_load_neither_the_database_code_nor_sqlalchemy() -> None:
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, private_files; print(sorted({'db', 'sqlalchemy'} & set(sys.modules)))"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert loaded.stdout.strip() == "[]"


def layout_entries() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Layout", 1)[1].split("```", 2)[1]
    names: list[str] = []
    for line in block.splitlines():
        if line and not line[0].isspace():
            names.extend(name.strip() for name in line.split("  ", 1)[0].split(","))
    return names


def test_the_readme_layout_names_only_what_is_there_and_every_package_and_module_of_the_library() -> None:
    entries = layout_entries()
    for entry in entries:
        assert (ROOT / entry).exists(), entry
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, check=True, capture_output=True, text=True).stdout
    top = {line.split("/", 1)[0] for line in tracked.splitlines() if "/" in line and not line.startswith(".")}
    for directory in top - {"docker"}:
        assert f"{directory}/" in entries, directory
    # The flat library and the operators' tools are listed module by module, so a new one cannot hide.
    for package in ("db", "ops"):
        for module in (ROOT / package).glob("*.py"):
            if module.name != "__init__.py":
                assert f"{package}/{module.name}" in entries, module
