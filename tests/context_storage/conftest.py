"""The task-context tests run on a SQLite file and on PostgreSQL (a manager has no in-memory use)."""

from __future__ import annotations

import pytest


@pytest.fixture(params=["sqlite-file", "postgresql"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)
