"""Fuzz every operation of the deploy service's OpenAPI schema: no input may cause a 5xx.

The app is real (store, local provisioner, local Hub for `/api/inspect` and repo checks);
it has no device slots (`cpu_slots=0`), so a generated spec that happens to be valid gets
a 409 instead of starting a process.
"""
from __future__ import annotations

from typing import Any, Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from hubdeploy.hub_integration.service import build_service_app


@pytest.fixture(scope="module")
def api_schema(local_hub: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    app = build_service_app(tmp_path_factory.mktemp("fuzz"), hub_endpoint=local_hub.endpoint,
                            admin_token="fuzz-admin", cpu_slots=0)
    yield schemathesis.openapi.from_asgi("/openapi.json", app)
    app.state.provisioner.close()


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case: schemathesis.Case) -> None:
    case.call_and_validate(headers={"Authorization": "Bearer fuzz-admin"}, checks=[not_a_server_error])
