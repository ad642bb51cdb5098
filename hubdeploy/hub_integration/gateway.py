"""The endpoint gateway: one stable URL per endpoint, `<service>/endpoints/{name}/v1/...`.

The deploy service proxies every endpoint's OpenAI routes, `/health` and `/metrics` to wherever
its server runs (`EndpointRecord.url`, a loopback port for the local backend, a node for Ray).
Why a proxy: the child's port changes on every restart and is reachable from this machine only;
the gateway URL survives restarts, scale-to-zero and key rotation.

- Access (`DeploymentSpec.access`), checked here in constant time before any body is read:
  `private` (the endpoint's own key), `protected` (any credential the service accepts),
  `public` (no key; adapter admin still needs a service credential). The child listens with an
  internal key that only the service knows (`Provisioner.get_api_key`): it never sees a user's key.
- Streaming: each upstream chunk is sent on at once (no buffering); a client that goes away
  closes the upstream request, so the engine aborts it and frees its KV blocks.
- Upstream status codes and bodies pass unchanged; a dead or missing upstream is 502/503 with an
  OpenAI-style error naming the endpoint's state; a scaled-to-zero endpoint is woken
  (`scale_to_zero.ScaleToZero`).

`GatewayMount` puts it in front of the service's routes and their 1 MiB body limit: the gateway has
its own limit (completion requests are larger than API calls) and its own error shape (OpenAI's).
"""
from __future__ import annotations

import asyncio
import contextvars
import math
import re
import time
from typing import TYPE_CHECKING, Any, Awaitable, Callable

import aiohttp
import anyio
import yarl
from starlette.requests import Request

from hubdeploy.hub_integration import auth
from hubdeploy.serving.server.body_limit import BodyLimit, BodyTooLarge
from hubdeploy.serving.server.errors import OpenAIError, error_response

if TYPE_CHECKING:
    from hubdeploy.hub_integration.scale_to_zero import ScaleToZero
    from hubdeploy.hub_integration.service import ServiceContext

GATEWAY_PREFIX = "/endpoints"
MAX_BODY_BYTES = 8 * 1024 * 1024  # the endpoint server's own default cap (request_limits)
SCALE_UP_HEADER = "x-scale-up-timeout"
# how long a running endpoint's record (address, access, key hash) is reused; changes made through
# the API reach the gateway at once (`forget`), the watchdog's within this time
RECORD_TTL_S = 0.5
MAX_SCALE_UP_WAIT_S = 600.0
# idle upstream connections are dropped before the endpoint's server (uvicorn, 5 s keep-alive) closes
# them, so a request is never sent on a connection the server is closing
UPSTREAM_KEEPALIVE_S = 3.0
_ROUTE = re.compile(r"^/endpoints/(?P<name>[^/]{1,64})/(?P<rest>health|metrics|v1(?:/.*)?)$")
_LORA_ADMIN = ("v1/load_lora_adapter", "v1/unload_lora_adapter")
# request headers not relayed (ASGI gives them lower-case, as bytes); aiohttp sets host and content-length
_HOP_BY_HOP = {b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te", b"trailer",
               b"transfer-encoding", b"upgrade", b"host", b"content-length", b"authorization",
               SCALE_UP_HEADER.encode()}
# content-length stays: the body is relayed raw (no decompression), byte for byte
_RESPONSE_DROP = {b"connection", b"keep-alive", b"transfer-encoding", b"upgrade", b"date", b"server"}
# headers aiohttp would add of its own: the engine gets only what the client sent
_NO_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")

ASGIApp = Callable[..., Awaitable[None]]

# the base URL of the request being answered: `EndpointOut.url` is built from it (or `public_url`)
request_base_url: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_base_url", default=None)


def gateway_url(name: str) -> str:
    """The OpenAI base URL users get for endpoint `name`: `<service>/endpoints/<name>/v1`, the
    service being its `public_url` or else the URL the current request came to."""
    base = (request_base_url.get() or "http://127.0.0.1:7860").rstrip("/")
    return f"{base}{GATEWAY_PREFIX}/{name}/v1"


class GatewayError(OpenAIError):
    """An OpenAI-style error the gateway answers with, plus headers (e.g. `Retry-After`)."""

    def __init__(self, message: str, status: int, code: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message, status, code=code, type=_UPSTREAM_TYPES.get(status))
        self.headers = headers or {}


_UPSTREAM_TYPES = {502: "server_error", 504: "server_error"}


def _error(message: str, status: int, code: str, headers: dict[str, str] | None = None) -> ASGIApp:
    resp = error_response(GatewayError(message, status, code))
    for k, v in (headers or {}).items():
        resp.headers[k] = v
    return resp


class Gateway:
    """ASGI app answering `/endpoints/{name}/...` by proxying to the endpoint's server."""

    def __init__(self, svc: "ServiceContext", scaler: "ScaleToZero", *, max_body_bytes: int = MAX_BODY_BYTES,
                 connect_timeout_s: float = 5.0, read_timeout_s: float = 600.0) -> None:
        self.svc, self.scaler = svc, scaler
        self.max_body_bytes = max_body_bytes
        # sock_read: the longest silence between two upstream chunks (a long prefill, a slow answer)
        self.timeout = aiohttp.ClientTimeout(total=None, connect=connect_timeout_s, sock_connect=connect_timeout_s,
                                             sock_read=read_timeout_s)
        self._client: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._keys: dict[str, tuple[tuple[Any, ...], str | None]] = {}
        self._records: dict[str, tuple[float, Any]] = {}

    def client(self) -> aiohttp.ClientSession:
        """One pooled upstream client per event loop (uvicorn has one; a TestClient makes several).

        aiohttp, not httpx: its response parser is compiled (llhttp), where httpx parses each
        streamed chunk in Python (h11) under several async layers; the relay's CPU per SSE event
        is what the engine loses on a shared host (benchmarks/RESULTS.md, gateway overhead)."""
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            self._client = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=UPSTREAM_KEEPALIVE_S),
                timeout=self.timeout,
                auto_decompress=False, skip_auto_headers=_NO_AUTO_HEADERS, trust_env=False)
            self._loop = loop
        return self._client

    async def aclose(self) -> None:
        if self._client is not None and self._loop is asyncio.get_running_loop():
            await self._client.close()
        self._client = None

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        m = _ROUTE.match(scope.get("path", ""))
        if m is None:
            await _error("not a gateway route: use /endpoints/<name>/v1/..., /endpoints/<name>/health or "
                         "/endpoints/<name>/metrics", 404, "not_found")(scope, receive, send)
            return
        name, rest = m["name"], m["rest"]
        try:
            await self._answer(scope, receive, send, name, rest)
        except OpenAIError as e:
            await _error(e.message, e.status, e.code or "error", getattr(e, "headers", None))(scope, receive, send)
        except BodyTooLarge as e:
            await _error(str(e.detail), 413, "request_too_large")(scope, receive, send)

    # --- one request ----------------------------------------------------------------
    async def _answer(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any],
                      name: str, rest: str) -> None:
        request = Request(scope, receive)
        rec = await self._record(name)
        if rec is None or rec.status == "deleted":
            raise OpenAIError(f"no endpoint named {name!r} on this service", 404, code="endpoint_not_found")
        access = rec.spec.get("access", "private")
        if rest != "health" and (access != "public" or rest in _LORA_ADMIN):  # /health is open, as upstream
            authorization = request.headers.get("authorization")
            admin = rest in _LORA_ADMIN
            # an endpoint key verified before passes on the loop (a digest lookup, no scrypt, no thread hop)
            if admin or access != "private" or not auth.verified_before(auth.bearer_token(authorization),
                                                                        rec.api_key_hash):
                await anyio.to_thread.run_sync(self._check_access, name, access, rec.api_key_hash, authorization,
                                               admin)
        body = await request.body()  # under the gateway's BodyLimit
        wait_s = _scale_up_timeout(request.headers.get(SCALE_UP_HEADER))
        deadline = anyio.current_time() + (wait_s or 0.0)
        with self.scaler.in_use(name):
            while True:
                rec = await self.scaler.ready_record(name, None if wait_s is None else
                                                     max(0.0, deadline - anyio.current_time()), rec)
                if await self._forward(scope, receive, send, request, rec, rest, body):
                    return
                # nothing reached the server: it stopped, or died and the watchdog has not noticed yet
                self.forget(name)
                rec = await anyio.to_thread.run_sync(self.svc.store.get_endpoint, name)
                if rec is not None and rec.status != "running":
                    continue  # ready_record answers for the new state (503, a wake, a wait)
                if wait_s is None or anyio.current_time() >= deadline:
                    raise GatewayError(f"endpoint {name!r} is running but its server refuses connections (it may "
                                       "have just died); retry shortly", 502, "upstream_unreachable")
                rec = None  # a request that may wait tries again: a restart brings it back
                await anyio.sleep(0.2)

    def forget(self, name: str) -> None:
        """Drop the remembered record of `name` (the API changed its key, access or state)."""
        self._records.pop(name, None)

    async def _record(self, name: str) -> Any:
        """The endpoint's record; a running one is remembered for `RECORD_TTL_S` (a database read
        per request is most of the gateway's own time). Anything else is read each time."""
        now = time.monotonic()
        hit = self._records.get(name)
        if hit is not None and hit[0] > now:
            return hit[1]
        rec = await anyio.to_thread.run_sync(self.svc.store.get_endpoint, name)
        if rec is not None and rec.status == "running":
            self._records[name] = (now + RECORD_TTL_S, rec)
        else:
            self._records.pop(name, None)
        return rec

    def _internal_key(self, rec: Any) -> str | None:
        """The key the endpoint's server runs with; read again when its process changes."""
        ident = (rec.url, rec.pid)
        hit = self._keys.get(rec.name)
        if hit is None or hit[0] != ident:
            hit = (ident, self.svc.prov.get_api_key(rec.name))  # a small file: no thread hop
            self._keys[rec.name] = hit
        return hit[1]

    def _check_access(self, name: str, access: str, key_hash: str | None, authorization: str | None,
                      admin: bool) -> None:
        """401 unless the request carries what the endpoint's access mode asks for: `private` its
        own key (nothing else, for every route), `protected` a service credential, `public` nothing
        (adapter admin: a service credential)."""
        token = auth.bearer_token(authorization)
        if access == "private":
            ok = auth.verify_secret(token, key_hash)
            what = "the endpoint's API key (shown when it was created or its key rotated)"
        elif access == "protected" or admin:
            ok = self.svc.accepts(token)
            what = "a credential of the deploy service (its admin token)"
        else:
            return
        if ok:
            return
        if not authorization:
            raise _auth_error(f"missing API key: endpoint {name!r} needs 'Authorization: Bearer <key>' with {what}",
                              "missing_api_key")
        raise _auth_error(f"invalid API key: endpoint {name!r} ({access}) needs {what}", "invalid_api_key")

    async def _forward(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any],
                       request: Request, rec: Any, rest: str, body: bytes) -> bool:
        """Send the request upstream and relay the answer chunk by chunk; a client that goes away
        cancels the exchange, which closes the upstream connection (the engine aborts).
        False when the server refused the connection (nothing was sent to either side)."""
        key = self._internal_key(rec)
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"] if k not in _HOP_BY_HOP]
        if key:
            headers.append(("authorization", f"Bearer {key}"))
        root = rec.url.removesuffix("/").removesuffix("/v1")
        url = f"{root}/{rest}" + (f"?{scope['query_string'].decode('latin-1')}" if scope.get("query_string") else "")
        async with anyio.create_task_group() as tg:

            async def watch_disconnect() -> None:
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        tg.cancel_scope.cancel()
                        return

            tg.start_soon(watch_disconnect)
            try:
                reached = await self._exchange(scope, receive, send, request.method, url, headers, body, rec)
            finally:
                tg.cancel_scope.cancel()
        return reached

    async def _exchange(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any],
                        method: str, url: str, headers: list[tuple[str, str]], body: bytes, rec: Any) -> bool:
        try:
            # the URL as the client wrote it (encoded=True: no re-quoting of the path or query)
            upstream = await self.client().request(method, yarl.URL(url, encoded=True), headers=headers,
                                                   data=body or None, allow_redirects=False)
        except aiohttp.ClientConnectorError:
            return False
        except TimeoutError:
            await _error(f"endpoint {rec.name!r} did not answer in time (gateway timeout)", 504,
                         "upstream_timeout")(scope, receive, send)
            return True
        except aiohttp.ClientError as e:
            await _error(f"endpoint {rec.name!r} broke the connection before answering ({type(e).__name__}); "
                         "retry shortly", 502, "upstream_error")(scope, receive, send)
            return True
        complete = False
        try:
            relayed = [(k.lower(), v) for k, v in upstream.raw_headers if k.lower() not in _RESPONSE_DROP]
            await send({"type": "http.response.start", "status": upstream.status, "headers": relayed})
            try:
                async for chunk in upstream.content.iter_any():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                complete = True
            except (aiohttp.ClientError, TimeoutError):
                pass  # the upstream died mid-answer: end the response; the client sees a truncated stream
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            if complete:
                upstream.release()  # the connection goes back to the pool
            else:
                upstream.close()  # closing it is how the engine learns to abort the request
        return True


def _auth_error(message: str, code: str) -> OpenAIError:
    return OpenAIError(message, 401, code=code)


def _scale_up_timeout(value: str | None) -> float | None:
    """Seconds from `X-Scale-Up-Timeout` (None: answer at once); bad values are a 400."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds < 0:
        raise OpenAIError(f"X-Scale-Up-Timeout must be a number of seconds ≥ 0, got {value[:32]!r}", 400,
                          code="invalid_scale_up_timeout")
    return min(seconds, MAX_SCALE_UP_WAIT_S)


class GatewayMount:
    """ASGI middleware: `/endpoints/...` goes to the gateway (with its own body limit), the rest
    to the service app; every request's base URL is made known to `gateway_url`."""

    def __init__(self, app: ASGIApp, gateway: Gateway, public_url: str | None = None) -> None:
        self.app, self.public_url = app, public_url
        self.gateway = BodyLimit(gateway, max_bytes=gateway.max_body_bytes,
                                 reject=lambda message: _error(message, 413, "request_too_large"))

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope.get("path", "").startswith(GATEWAY_PREFIX + "/"):
            await self.gateway(scope, receive, send)
            return
        token = request_base_url.set(self.public_url or str(Request(scope).base_url))
        try:
            await self.app(scope, receive, send)
        finally:
            request_base_url.reset(token)
