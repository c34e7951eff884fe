"""The dashboard as a user sees it: `python main.py serve` on a public bind, driven in a real headless Chromium.

The screenshots are saved beside the test's files, and also into $DASHBOARD_SCREENSHOTS when it names a
directory (the pictures in docs/ are made that way).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.wait import WebDriverWait

from db import DatabaseConfig, DatabaseConnection, Task, TaskRepository
from db.schema import upgrade_schema
from tests.support.cli import ROOT
from tests.support.data import child_environment, task_data

TOKEN = "browser-test-token-0123456789abcdef"
USERS = ("alice", "bob", "carol")


@dataclass(frozen=True)
class Dashboard:
    url: str
    running: frozenset[str]


def _fill(repository: TaskRepository) -> frozenset[str]:
    """Three weeks of tasks for three users, and four running now."""
    now = datetime.now(UTC)
    for index in range(120):
        created = now - timedelta(hours=3 + index * 4)
        repository.create(
            task_data(
                owner="acme",
                repo=("web", "api")[index % 2],
                task_id=str(100 + index % 30),
                user=USERS[index % 3],
                status=("completed", "completed", "failed", "stopped")[index % 4],
                created_at=created,
                started_at=created,
                completed_at=created + timedelta(minutes=20),
                hostname=f"agent-{index % 5}",
                total_tokens=(index * 7919) % 60000 + 500,
                llm_call_count=index % 40,
                error_message="rate limited by the provider (429)" if index % 4 == 2 else None,
            )
        )
    running: list[Task] = [
        repository.create(
            task_data(
                owner="acme",
                repo="web",
                task_id=str(900 + index),
                user=USERS[index % 3],
                status="running",
                created_at=now - timedelta(minutes=5 + 40 * index),
                started_at=now - timedelta(minutes=5 + 40 * index),
                hostname=f"agent-{index}",
                process_id=31000 + index,
                total_tokens=1200 * (index + 1),
            )
        )
        for index in range(4)
    ]
    return frozenset(task.uuid for task in running)


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dashboard]:
    """`python main.py serve --host 0.0.0.0 --port 0` with DASHBOARD_TOKEN, over a SQLite file of tasks."""
    home = tmp_path_factory.mktemp("dashboard")
    config_file = home / "config.yaml"
    config_file.write_text(f"context_storage:\n  base_dir: {json.dumps(str(home))}\n", encoding="utf-8")
    writer = DatabaseConnection(DatabaseConfig.load(str(config_file), env={}))
    try:
        upgrade_schema(writer)
        running = _fill(TaskRepository(writer))
    finally:
        writer.dispose()
    server = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "main.py"),
            "--config",
            str(config_file),
            "serve",
            "--host",
            "0.0.0.0",
            "--port",
            "0",
        ],
        cwd=home,
        env={**child_environment(), "DASHBOARD_TOKEN": TOKEN},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        found = re.search(r"dashboard on http://0\.0\.0\.0:(\d+)/ \(token required\)", line)
        assert found, (line, server.poll())
        yield Dashboard(f"http://127.0.0.1:{found.group(1)}", running)
    finally:
        server.terminate()
        _, errors = server.communicate(timeout=30)
        assert TOKEN not in errors


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebDriver]:
    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if binary is None or driver is None:
        pytest.fail("the browser tests need Chromium: ./dev setup installs chromium and chromium-driver")
    options = Options()
    options.binary_location = binary
    for argument in (
        "--headless=new",
        "--no-sandbox",  # the tests may run as root, where Chromium's sandbox refuses to start
        "--disable-gpu",
        "--no-first-run",
        # The test machines have no internet: nothing may try to reach it.
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-quic",
        "--window-size=1280,1000",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium')}",
    ):
        options.add_argument(argument)
    chrome = webdriver.Chrome(options=options, service=Service(executable_path=driver))
    chrome.set_page_load_timeout(60)
    try:
        yield chrome
    finally:
        chrome.quit()


def _screenshot(browser: WebDriver, name: str, tmp_path: Path) -> None:
    saved = tmp_path / name
    assert browser.save_screenshot(str(saved))
    assert saved.stat().st_size > 10_000
    wanted = os.environ.get("DASHBOARD_SCREENSHOTS")
    if wanted:
        shutil.copyfile(saved, Path(wanted) / name)


def _status(url: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers=headers or {})  # noqa: S310 (a loopback http URL of the test's own)
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:  # noqa: S310
            return int(answer.status), answer.read().decode()
    except urllib.error.HTTPError as refused:
        return int(refused.code), refused.read().decode()


def _api(dashboard: Dashboard, path: str) -> Any:
    status, body = _status(dashboard.url + path, {"Authorization": f"Bearer {TOKEN}"})
    assert status == 200, body
    return json.loads(body)


def _submit(browser: WebDriver, token: str, arrives_at: str) -> None:
    browser.find_element(By.NAME, "token").send_keys(token)
    browser.find_element(By.CSS_SELECTOR, "form.login button").click()
    WebDriverWait(browser, 30).until(lambda page: page.title.startswith(arrives_at))


def _sign_in(browser: WebDriver, dashboard: Dashboard) -> None:
    browser.get(dashboard.url + "/")
    if browser.find_elements(By.NAME, "token"):
        _submit(browser, TOKEN, "Overview")


def test_without_the_token_a_public_bind_shows_nothing(browser: WebDriver, dashboard: Dashboard) -> None:
    for path in ("/", "/tasks", "/api/tasks", "/api/token-usage/summary"):
        status, body = _status(dashboard.url + path)
        assert status == 401, path
        assert "agent-0" not in body and "alice" not in body
    browser.delete_all_cookies()
    browser.get(dashboard.url + "/usage")
    assert browser.title.startswith("Sign in")
    assert not browser.find_elements(By.ID, "per-user")
    _submit(browser, "not-the-token-at-all", "Sign in")
    WebDriverWait(browser, 30).until(lambda page: "That is not the token." in page.page_source)
    assert not browser.find_elements(By.ID, "per-user")


def test_the_overview_shows_the_running_tasks(browser: WebDriver, dashboard: Dashboard, tmp_path: Path) -> None:
    _sign_in(browser, dashboard)
    assert browser.title.startswith("Overview")
    rows = browser.find_elements(By.CSS_SELECTOR, "table#running tbody tr")
    assert {row.get_attribute("data-uuid") for row in rows} == dashboard.running
    first = rows[0].find_elements(By.TAG_NAME, "td")
    assert [cell.text for cell in first[1:4]] == ["alice", "agent-0", "31000"]
    assert first[6].text == "1,200"
    counts = {
        card.get_attribute("data-status"): int(card.find_element(By.CLASS_NAME, "number").text.replace(",", ""))
        for card in browser.find_elements(By.CSS_SELECTOR, ".counts .count")
    }
    assert counts == {"running": 4, "completed": 60, "failed": 30, "stopped": 30}
    assert len(browser.find_elements(By.CSS_SELECTOR, "table#failures tbody tr")) == 10
    _screenshot(browser, "dashboard-overview.png", tmp_path)


def test_the_usage_chart_draws_the_api_numbers(browser: WebDriver, dashboard: Dashboard, tmp_path: Path) -> None:
    _sign_in(browser, dashboard)
    query = "?days=14&tz=Asia/Tokyo"
    before = _api(dashboard, f"/api/token-usage/alice/history{query}")["days"]
    browser.get(f"{dashboard.url}/usage{query}&user=alice")
    after = _api(dashboard, f"/api/token-usage/alice/history{query}")["days"]
    bars = browser.find_elements(By.CSS_SELECTOR, "figure#daily svg rect.bar")
    drawn = [
        {"date": bar.get_attribute("data-day"), "tokens": int(bar.get_attribute("data-tokens") or -1)} for bar in bars
    ]
    assert drawn in (before, after)  # the same unless a day ended between the two requests
    assert len(drawn) == 14 and any(day["tokens"] for day in drawn)

    peak = max(day["tokens"] for day in drawn)
    tallest = max(bar.size["height"] for bar in bars)
    for bar, day in zip(bars, drawn, strict=True):
        assert bar.size["height"] == pytest.approx(tallest * day["tokens"] / peak, abs=1.0), day

    summary = {row["user"]: row for row in _api(dashboard, "/api/token-usage/summary?tz=Asia/Tokyo")["users"]}
    for row in browser.find_elements(By.CSS_SELECTOR, "table#per-user tbody tr"):
        user = row.get_attribute("data-user")
        cells = [int(cell.text.replace(",", "")) for cell in row.find_elements(By.CSS_SELECTOR, "td.n")]
        expected = summary[user]
        assert cells == [expected[key] for key in ("today", "this_week", "this_month", "total")]
    _screenshot(browser, "dashboard-usage.png", tmp_path)
