"""`GET /api/inspect?model=&revision=` as a plain function the deploy service mounts.

Returns the JSON payload (report, compatibility, one memory plan per GPU, and the
quantize-on-deploy option with its own plans, `quantize_offer`); raises
`hub_integration.errors.InspectError` subclasses whose `.status` / `.to_dict()` are the
HTTP answer (404 missing repo/revision, 401/403 gated, 422 broken repo, 502 Hub down).
"""
from __future__ import annotations

from typing import Any, Sequence

from hubdeploy.hub_integration.errors import InspectError
from hubdeploy.hub_integration.gpus import GPU
from hubdeploy.hub_integration.memory_plan import plan_all
from hubdeploy.hub_integration.quantize_offer import quantize_offer
from hubdeploy.hub_integration.report import inspect_model


def inspect_payload(model: str, revision: str | None = None, *, token: str | None = None,
                    endpoint: str | None = None, gpus: Sequence[GPU | str] | None = None,
                    adapters: Sequence[str] = ()) -> dict[str, Any]:
    """Everything the deploy page shows about a model, JSON-ready."""
    if not model or not model.strip():
        raise InspectError("query parameter 'model' is required (a Hub repo id such as org/name)")
    report = inspect_model(model.strip(), revision or None, token=token, endpoint=endpoint)
    plans = plan_all(report, gpus, adapters=list(adapters))
    fitting = [p for p in plans if p.fits]
    return {
        "report": report.to_dict(),
        "plans": [p.to_dict() for p in plans],
        "suggested_gpu": fitting[0].gpu if fitting else None,
        "engine_defaults": fitting[0].engine_defaults() if fitting else None,
        "serve_args": fitting[0].serve_args() if fitting else None,
        "quantize": quantize_offer(report, plans, adapters=list(adapters)),
    }


def error_body(exc: InspectError) -> tuple[int, dict[str, Any]]:
    """(HTTP status, JSON body) for a typed inspection error."""
    return exc.status, exc.to_dict()
