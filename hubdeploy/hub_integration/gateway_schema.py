"""The gateway's routes in the deploy service's OpenAPI schema (`/endpoints/{name}/...`).

`GatewayMount` answers these paths before FastAPI routes anything, so the functions below are
never called: they exist so that the schema (`/openapi.json`, `/docs`) documents the stable
endpoint URLs with the engine's own request bodies, and schema-driven tools (schemathesis in
`tests/`) exercise the gateway like every other route.
"""
from __future__ import annotations

from typing import Any, NoReturn

from fastapi import APIRouter, Header, Path

from hubdeploy.serving.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    LoadLoRAAdapterRequest,
    UnloadLoRAAdapterRequest,
)

GATEWAY_TAG = "gateway"
_NAME = Path(..., min_length=1, max_length=64, description="endpoint name")
_SCALE_UP = Header(None, alias="X-Scale-Up-Timeout",
                   description="seconds to hold the request while a scaled-to-zero or starting endpoint comes up; "
                               "without it such an endpoint answers 503 with Retry-After")
_OPENAI = {"401": {"description": "missing or wrong credential for the endpoint's access mode"},
           "404": {"description": "no such endpoint, or the endpoint's own 404 (unknown model)"},
           "502": {"description": "the endpoint's server is unreachable or broke the connection"},
           "503": {"description": "the endpoint is not running (scaled to zero, paused, starting, failed)"},
           "504": {"description": "the endpoint's server did not answer in time"}}

gateway_router = APIRouter(prefix="/endpoints/{name}", tags=[GATEWAY_TAG], responses=_OPENAI)


def _answered_by_the_gateway() -> NoReturn:
    raise RuntimeError("gateway routes are answered by GatewayMount, before FastAPI's router")


@gateway_router.post("/v1/chat/completions", summary="OpenAI chat completions, proxied to the endpoint")
def gateway_chat_completions(body: ChatCompletionRequest, name: str = _NAME,
                             x_scale_up_timeout: float | None = _SCALE_UP) -> Any:
    """Streamed (`"stream": true`, server-sent events passed on as they come) or whole."""
    _answered_by_the_gateway()


@gateway_router.post("/v1/completions", summary="OpenAI completions, proxied to the endpoint")
def gateway_completions(body: CompletionRequest, name: str = _NAME,
                        x_scale_up_timeout: float | None = _SCALE_UP) -> Any:
    _answered_by_the_gateway()


@gateway_router.get("/v1/models", summary="The endpoint's served model and adapters")
def gateway_models(name: str = _NAME, x_scale_up_timeout: float | None = _SCALE_UP) -> Any:
    _answered_by_the_gateway()


@gateway_router.post("/v1/load_lora_adapter", summary="Load a LoRA adapter (a service credential, any access mode)")
def gateway_load_lora(body: LoadLoRAAdapterRequest, name: str = _NAME) -> Any:
    _answered_by_the_gateway()


@gateway_router.post("/v1/unload_lora_adapter", summary="Unload a LoRA adapter (a service credential, any access mode)")
def gateway_unload_lora(body: UnloadLoRAAdapterRequest, name: str = _NAME) -> Any:
    _answered_by_the_gateway()


@gateway_router.get("/health", summary="The endpoint's health (open in every access mode)")
def gateway_health(name: str = _NAME) -> Any:
    _answered_by_the_gateway()


@gateway_router.get("/metrics", summary="The endpoint's Prometheus metrics")
def gateway_metrics(name: str = _NAME) -> Any:
    _answered_by_the_gateway()
