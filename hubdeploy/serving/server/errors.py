"""OpenAI error bodies: `{"error": {"message", "type", "param", "code"}}` with the HTTP status.

Every failure a client can cause becomes an `OpenAIError` with the field at fault in
`param`, so SDKs raise their typed exceptions (`BadRequestError`, `NotFoundError`, ...)
with a message that says what to change. Pydantic's 422 is mapped to OpenAI's 400.
"""
from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from hubdeploy.serving.server.log_text import printable

logger = logging.getLogger("hubdeploy.server")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    501: "not_implemented_error",
    503: "service_unavailable_error",
}


class OpenAIError(Exception):
    """An error a route answers with; `status` is the HTTP status code."""

    def __init__(self, message: str, status: int = 400, param: str | None = None,
                 code: str | None = None, type: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "invalid_request_error")

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


class ClientGone(Exception):
    """The client closed the connection before its (non-streamed) answer was ready."""


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(err: OpenAIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


_TYPE_NAMES = {"str", "int", "float", "bool", "none", "dict", "list"}


def _is_type_marker(p: Any) -> bool:
    p = str(p)
    return p in _TYPE_NAMES or "[" in p or p.startswith("function-") or p[:1].isupper()


def _param_of(loc: tuple[Any, ...]) -> str | None:
    """`("body", "messages", 0, "content")` -> `"messages[0].content"`."""
    parts = [p for p in loc if p != "body"]
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        elif _is_type_marker(p):
            continue  # union-branch markers pydantic adds to the location
        else:
            out += ("." if out else "") + str(p)
    return out or None


def validation_error(exc: RequestValidationError) -> OpenAIError:
    """Map FastAPI/pydantic errors to one OpenAI 400 naming the first field at fault."""
    errors = exc.errors()
    if not errors:
        return OpenAIError("the request body is invalid", 400)
    first = errors[0]
    if first.get("type") == "json_invalid":
        ctx = first.get("ctx") or {}
        detail = ctx.get("error", "")
        return OpenAIError(
            f"the request body is not valid JSON ({detail}); send a JSON object with Content-Type: application/json",
            400, code="invalid_json",
        )
    loc = tuple(first.get("loc", ()))
    if loc == ("body",) and first.get("type") in ("missing", "model_attributes_type", "dict_type"):
        return OpenAIError("the request body must be a JSON object", 400, code="invalid_request_body")
    param = _param_of(loc)
    msg = first.get("msg", "invalid value")
    if first.get("type") == "too_short" and param == "messages":
        msg = "send at least one message"
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    if first.get("type") == "missing":
        text = f"'{param}' is a required field"
    else:
        text = f"invalid value for '{param}': {msg}"
        if "input" in first and not isinstance(first["input"], (dict, list)):
            text += f" (got {first['input']!r})"
    # several problems: name them all so one round trip fixes them
    others = [_param_of(tuple(e.get("loc", ()))) for e in errors[1:]]
    others = [o for o in dict.fromkeys(others) if o and o != param]
    if others and first.get("type") != "missing":
        text += f"; also check {', '.join(others[:4])}"
    return OpenAIError(text, 400, param=param, code="invalid_value" if first.get("type") != "missing" else "missing_required_parameter")


def install_error_handlers(app: FastAPI) -> None:
    """Every error the app answers with, in OpenAI's shape (never FastAPI's `detail`)."""

    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, exc: OpenAIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            err = OpenAIError(f"no route {request.method} {request.url.path}; see /v1/models, "
                              "/v1/chat/completions, /v1/completions", 404, code="unknown_route")
        elif exc.status_code == 405:
            err = OpenAIError(f"method {request.method} is not allowed on {request.url.path}", 405,
                              code="method_not_allowed")
        elif exc.status_code == 413:  # body_limit.BodyTooLarge, raised while the body streams in
            err = OpenAIError(str(exc.detail), 413, code="request_too_large")
        else:
            err = OpenAIError(str(exc.detail), exc.status_code)
        return error_response(err)

    @app.exception_handler(ClientGone)
    async def _client_gone(request: Request, exc: ClientGone) -> JSONResponse:
        # nobody is listening any more; 499 as nginx logs it
        return JSONResponse(error_body("client closed the request", "invalid_request_error"), status_code=499)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("internal error on %s %s", printable(request.method), printable(request.url.path))
        err = OpenAIError(f"internal server error ({type(exc).__name__}); the server log has the details",
                          500, code="internal_error")
        return error_response(err)
