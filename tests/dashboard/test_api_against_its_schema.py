"""The JSON API against its own OpenAPI description, on every backend: every operation and parameter, generated
by schemathesis; no answer is a 500, and every answer fits the schema it documents."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.specs.openapi.schemas import OpenApiSchema

from dashboard import Access, DashboardSettings, DatabaseSource, create_app
from db import DatabaseConfig, DatabaseConnection, TaskRepository
from tests.support.data import task_data

NOW = datetime(2026, 11, 25, 3, 0, tzinfo=UTC)
TOKEN = "schema-test-token-0123456789"
# No 500, and every answer as documented: its status, media type, headers and body. A schema-valid value the API
# still refuses (an unknown zone name, an `after` naming no task) is a documented 400, not a failure.
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
# Examples per operation and backend: enough to reach every parameter's edges, within the suite's time.
EXAMPLES = 40


@pytest.fixture
def api_schema(connection: DatabaseConnection, db_config: DatabaseConfig) -> Iterator[OpenApiSchema]:
    repository = TaskRepository(connection)
    for index, status in enumerate(("running", "completed", "failed", "stopped", "completed")):
        task = repository.create(
            task_data(user=("alice", "bob", None)[index % 3], created_at=NOW - timedelta(days=index), status=status)
        )
        repository.update_statistics(task.uuid, tokens=100 * index)
    reader = connection if db_config.is_sqlite_memory else DatabaseConnection(db_config, read_only=True)
    app = create_app(DatabaseSource(lambda: reader), Access(TOKEN), DashboardSettings(clock=lambda: NOW))
    yield schemathesis.openapi.from_asgi("/openapi.json", app, headers={"Authorization": f"Bearer {TOKEN}"})
    if reader is not connection:
        reader.dispose()


def test_every_operation_answers_within_its_schema(api_schema: OpenApiSchema) -> None:
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert {operation.path for operation in operations} >= {"/api/tasks", "/api/token-usage/summary"}
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def answers_within_its_schema(case: schemathesis.Case) -> None:
            case.call_and_validate(headers={"Authorization": f"Bearer {TOKEN}"}, checks=CHECKS)

        answers_within_its_schema()
