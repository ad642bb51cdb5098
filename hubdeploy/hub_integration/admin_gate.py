"""`AdminGate`: the service's admin check, in front of everything under `/api`, before any
request body is read, and cheap for whoever keeps sending wrong tokens.

Without it the routes' dependency checked the token only after FastAPI had read and parsed
the body (a 200 MB unauthenticated POST was read whole before its 401), and every wrong
token cost a full scrypt on the service's CPU. Here: no token or a malformed one is refused
at once; a well-formed one is verified (scrypt, constant-time compare) on a worker thread;
a client that sent `max_failures` wrong tokens within `window_s` gets 429 with
`Retry-After` and no verification until the window has passed. A token verified before
(`known`, no hashing) always passes, so wrong tokens sent from the same address (a proxy, a
Space) cannot lock the operator out.
"""
from __future__ import annotations

import time
from collections import deque
from typing import Any, Callable

import anyio

ASGIApp = Callable[..., Any]
TOKEN_MAX_CHARS = 512


def bearer_from_scope(scope: dict[str, Any]) -> str | None:
    for k, v in scope.get("headers", []):
        if k.lower() == b"authorization":
            scheme, _, token = v.decode("latin-1").partition(" ")
            return (token.strip() or None) if scheme.lower() == "bearer" else None
    return None


def well_formed(token: str) -> bool:
    """Printable ASCII of sane length: what any admin or HF token looks like (no hashing needed to say no)."""
    return 0 < len(token) <= TOKEN_MAX_CHARS and token.isascii() and token.isprintable() and " " not in token


class AdminGate:
    """ASGI middleware: requests under `prefix` need a token `allowed(token)` accepts.

    `deny(status, retry_after)` builds the refusal in the app's error shape (401, or 429 with
    the seconds to wait). `allowed` may block (scrypt, a Hub call): it runs on a thread.
    """

    def __init__(self, app: ASGIApp, allowed: Callable[[str], bool], deny: Callable[[int, float | None], ASGIApp],
                 known: Callable[[str], bool] = lambda token: False, prefix: str = "/api", max_failures: int = 20,
                 window_s: float = 60.0) -> None:
        self.app, self.allowed, self.deny, self.prefix, self.known = app, allowed, deny, prefix, known
        self.max_failures, self.window_s = max_failures, window_s
        self._failures: dict[str, deque[float]] = {}

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not (path == self.prefix or path.startswith(self.prefix + "/")):
            await self.app(scope, receive, send)
            return
        client = (scope.get("client") or ("?", 0))[0]
        token = bearer_from_scope(scope)
        if token is not None and well_formed(token) and self.known(token):
            await self.app(scope, receive, send)
            return
        wait = self._blocked_for(client)
        if wait is not None:
            await self.deny(429, wait)(scope, receive, send)
            return
        if token is None or not well_formed(token):
            await self.deny(401, None)(scope, receive, send)
            return
        if not await anyio.to_thread.run_sync(self.allowed, token):
            self._failed(client)
            await self.deny(401, None)(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _recent(self, client: str) -> deque[float]:
        q = self._failures.setdefault(client, deque())
        horizon = time.monotonic() - self.window_s
        while q and q[0] < horizon:
            q.popleft()
        if not q:
            self._failures.pop(client, None)
        return q

    def _blocked_for(self, client: str) -> float | None:
        q = self._recent(client)
        if len(q) < self.max_failures:
            return None
        return max(0.0, q[0] + self.window_s - time.monotonic())

    def _failed(self, client: str) -> None:
        self._failures.setdefault(client, deque()).append(time.monotonic())
        if len(self._failures) > 10_000:  # many clients: forget the quietest rather than grow
            oldest = min(self._failures, key=lambda c: self._failures[c][-1])
            self._failures.pop(oldest, None)
