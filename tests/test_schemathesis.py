"""Fuzz every operation of the deploy service's OpenAPI schema: no input may cause a 5xx.

The app is real (store, local provisioner, local Hub for `/api/inspect` and repo checks);
it has no device slots (`cpu_slots=0`), so a generated spec that happens to be valid gets
a 409 instead of starting a process.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from hub_integration.service import build_service_app

_state: dict[str, Any] = {}


def _app() -> Any:
    if "app" not in _state:
        import tempfile

        d = Path(tempfile.mkdtemp(prefix="hubdeploy-fuzz-"))
        _state["app"] = build_service_app(d, hub_endpoint=_state.get("hub"), admin_token="fuzz-admin", cpu_slots=0)
    return _state["app"]


@pytest.fixture(scope="module", autouse=True)
def _hub(local_hub: Any) -> Any:
    _state["hub"] = local_hub.endpoint
    yield
    app = _state.pop("app", None)
    if app is not None:
        app.state.provisioner.close()


schema = schemathesis.pytest.from_fixture("api_schema")


@pytest.fixture(scope="module")
def api_schema(_hub: Any) -> Any:
    return schemathesis.openapi.from_asgi("/openapi.json", _app())


@schema.parametrize()
@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_no_server_errors(case: schemathesis.Case) -> None:
    case.call_and_validate(headers={"Authorization": "Bearer fuzz-admin"}, checks=[not_a_server_error])
