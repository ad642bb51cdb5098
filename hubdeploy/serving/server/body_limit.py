"""`BodyLimit`: ASGI middleware that answers 413 as soon as a request body is known to be too
large (from `Content-Length`, or while the body streams in), instead of reading it whole.

Both apps (the endpoint and the deploy service) use it, each with its own error shape
(`reject`). The caps of a parsed completion request are in `request_limits`.
"""
from __future__ import annotations

from typing import Any, Callable

from starlette.exceptions import HTTPException

ASGIApp = Callable[..., Any]


class BodyTooLarge(HTTPException):
    """Raised from `receive` once the body passes the limit.

    An `HTTPException`, so that FastAPI lets it through its body parsing unchanged and the
    app's own HTTP-error handler answers 413 in the app's error shape.
    """

    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, too_large_message(max_bytes))


def too_large_message(max_bytes: int) -> str:
    return (f"the request body is larger than this server accepts ({max_bytes} bytes); send a smaller "
            "request (shorter prompts, fewer prompts per request)")


class BodyLimit:
    """ASGI middleware: at most `max_bytes` of request body per request, else 413.

    A declared `Content-Length` over the limit is refused before one byte of the body is
    read; a chunked (or lying) body is cut off at the chunk that crosses the limit. `reject`
    builds the app's 413 response from the message.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, reject: Callable[[str], ASGIApp]) -> None:
        self.app, self.max_bytes, self.reject = app, max_bytes, reject

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes
        for k, v in scope.get("headers", []):
            if k.lower() == b"content-length":
                try:
                    declared = int(v)
                except ValueError:
                    declared = None
                if declared is not None and declared > limit:
                    await self.reject(too_large_message(limit))(scope, receive, send)
                    return
        seen = {"bytes": 0, "started": False}

        async def limited_receive() -> dict[str, Any]:
            message = await receive()
            if message["type"] == "http.request":
                seen["bytes"] += len(message.get("body", b""))
                if seen["bytes"] > limit:
                    raise BodyTooLarge(limit)
            return message

        async def watched_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                seen["started"] = True
            await send(message)

        try:
            await self.app(scope, limited_receive, watched_send)
        except BodyTooLarge:  # an app that does not answer HTTPExceptions itself
            if seen["started"]:
                raise
            await self.reject(too_large_message(limit))(scope, receive, send)
