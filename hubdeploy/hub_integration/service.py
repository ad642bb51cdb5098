"""The deploy service: REST API over the store and a provisioner (`build_service_app`).

The routes (docs/deploy-service.md, "API") live under `/api`, all behind
`Authorization: Bearer <admin token>`, in one router per resource: `hub_router` (what a model is,
what the page pre-fills) and `endpoints_router`. They reach the store and provisioner through
the app's `ServiceContext`. The web page is mounted by `mount_page(app, blocks)` (the Gradio page
from `space/` when the command line passes one; a minimal HTML page otherwise) with the badge's
routes (`page_router`), so this module never imports `space`.
"""
from __future__ import annotations

import os
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, AsyncIterator, Callable, Literal

from fastapi import APIRouter, Depends, FastAPI, Header, HTTPException, Path as PathParam, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from pydantic import BaseModel, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from hubdeploy.hub_integration import auth
from hubdeploy.hub_integration.admin_gate import AdminGate
from hubdeploy.hub_integration.errors import InspectError
from hubdeploy.hub_integration.gateway import Gateway, GatewayMount, gateway_url
from hubdeploy.hub_integration.gateway_schema import gateway_router
from hubdeploy.hub_integration.provisioner.base import Provisioner, Secrets
from hubdeploy.hub_integration.scale_to_zero import ScaleToZero
from hubdeploy.hub_integration.spec import (CreateEndpointRequest, DeploymentSpec, HubUnavailable, PatchEndpointRequest,
                                  SpecContext, SpecError, check_spec, classify_source, resolve_local_dir)
from hubdeploy.hub_integration.store import EndpointRecord, SlotUnavailable, Store
from hubdeploy.serving.server.body_limit import BodyLimit

ADMIN_HASH_KEY = "admin_token_hash"
# spec fields the gateway, the reaper or the watchdog read from the store: changing them needs no restart
GATEWAY_ONLY_FIELDS = {"access", "tags", "restart_on_failure", "scale_to_zero_after_s"}
INTERNAL_KEY_PREFIX = "hdint_"  # the key the gateway sends to an endpoint's server (never a user's)
MAX_BODY_BYTES = 1024 * 1024  # specs and patches are a few KB; the page uploads nothing
NamePath = PathParam(..., min_length=1, max_length=64, description="endpoint name")


class Progress(BaseModel):
    bytes_done: int = Field(..., description="bytes downloaded, or written by the quantizer while `quantizing`")
    bytes_total: int
    fraction: float | None = Field(None, description="bytes_done / bytes_total while downloading or quantizing")
    layers_done: int = Field(0, description="decoder layers quantized so far (phase `quantizing`)")
    layers_total: int = 0


class StatusChange(BaseModel):
    status: str
    phase: str | None = None
    reason: str | None = None
    at: float


class EndpointOut(BaseModel):
    """An endpoint as the API shows it. `api_key` appears only in the create/rotate answers."""

    name: str
    spec: DeploymentSpec
    status: Literal["pending", "initializing", "running", "paused", "scaled_to_zero", "failed", "deleted"]
    phase: str | None = Field(None, description="while initializing: downloading, quantizing, loading, warming_up")
    progress: Progress
    url: str | None = Field(None, description="OpenAI base URL through the service's gateway "
                                              "(<service>/endpoints/<name>/v1) while running or scaled to zero")
    served_model_name: str = Field(..., description="the `model` clients send for the base model")
    reason: str | None = None
    device: str | None = None
    restarts: int = 0
    created_at: float
    updated_at: float
    history: list[StatusChange] | None = None
    api_key: str | None = Field(None, description="shown once: at create and rotate_key")


class ErrorInfo(BaseModel):
    """The one error shape of the service (every 4xx/5xx answer): `{"error": {...}, "detail": ...}`."""

    status: int = Field(..., description="the HTTP status, repeated")
    code: str = Field(..., description="machine-readable kind, e.g. invalid_spec, not_found, conflict")
    message: str = Field(..., description="what is wrong and what to do; names the field when one is to blame")
    fields: list[dict[str, Any]] = Field(default_factory=list,
                                         description="FastAPI-style [{loc, msg, type}] for 422s, else empty")


class ErrorOut(BaseModel):
    """Body of every error answer."""

    error: ErrorInfo
    detail: Any = Field(None, description="FastAPI-compatible mirror: the `fields` list for a 422, else the message")


_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    "4XX": {"model": ErrorOut, "description": "client error (the one error shape)"},
    "5XX": {"model": ErrorOut, "description": "server or Hub error (the one error shape)"}}

_STATUS_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
                 405: "method_not_allowed", 409: "conflict", 413: "request_too_large", 422: "invalid_request",
                 429: "too_many_failures", 500: "internal_error",
                 502: "hub_unreachable", 503: "hub_unavailable"}


def error_response(status: int, message: str, *, code: str | None = None, fields: list[dict[str, Any]] | None = None,
                   headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    """An error answer in the service's one shape.

    `error` is the contract (`status`, `code`, `message`, `fields`, plus context such as the
    inspected `model`/`revision`); `detail` mirrors FastAPI's own shape (the field list for a
    422, else the message) so FastAPI-aware clients keep working.
    """
    fields = [{"loc": list(f.get("loc", ())), "msg": str(f.get("msg", "")), "type": str(f.get("type", "value_error"))}
              for f in (fields or [])]
    err = ErrorInfo(status=status, code=code or _STATUS_CODES.get(status, "error"), message=message, fields=fields)
    body = {"error": {**err.model_dump(), **extra}, "detail": fields or message}
    return JSONResponse(body, status_code=status, headers=headers)


def _fields_message(fields: list[dict[str, Any]]) -> str:
    """'engine.max_model_len: must be ≤ ...' for the first field error (and how many more)."""
    if not fields:
        return "invalid request"
    first = fields[0]
    where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path", "header"))
    msg = f"{where}: {first.get('msg')}" if where else str(first.get("msg"))
    return msg + (f" (and {len(fields) - 1} more)" if len(fields) > 1 else "")


class EndpointList(BaseModel):
    endpoints: list[EndpointOut]


class LogsOut(BaseModel):
    name: str
    lines: list[str]


class DefaultsOut(BaseModel):
    """What the page pre-fills: the demo model (if any) and where local models may live."""

    model: str | None
    adapters: dict[str, str] = Field(default_factory=dict)
    allowed_model_roots: list[str]
    gpus: list[str]


def _out(rec: EndpointRecord, api_key: str | None = None, history: bool = False) -> EndpointOut:
    frac = rec.bytes_done / rec.bytes_total if rec.bytes_total else None
    spec = DeploymentSpec.model_validate(rec.spec)
    return EndpointOut(
        name=rec.name, spec=spec, status=rec.status, phase=rec.phase,
        progress=Progress(bytes_done=rec.bytes_done, bytes_total=rec.bytes_total, fraction=frac,
                          layers_done=rec.layers_done, layers_total=rec.layers_total),
        url=gateway_url(rec.name) if rec.status in ("running", "scaled_to_zero") else None, served_model_name=spec.served_model_name, reason=rec.reason, device=rec.device,
        restarts=rec.restarts, created_at=rec.created_at, updated_at=rec.updated_at,
        history=[StatusChange(**h) for h in rec.history] if history else None, api_key=api_key)


def ensure_admin_token(store: Store, admin_token: str | None) -> str | None:
    """Store the hash of the operator's token; make one if there is none. Returns a NEW token only."""
    if admin_token:
        current = store.get_meta(ADMIN_HASH_KEY)
        if not auth.verify_secret(admin_token, current):
            store.set_meta(ADMIN_HASH_KEY, auth.hash_secret(admin_token))
        return None
    if store.get_meta(ADMIN_HASH_KEY):
        return None
    token = auth.generate_token(auth.ADMIN_PREFIX)
    store.set_meta(ADMIN_HASH_KEY, auth.hash_secret(token))
    return token


@dataclass
class ServiceContext:
    """What the routes share (`app.state.service`): the store, the provisioner and the settings."""

    store: Store
    prov: Provisioner
    roots: list[Path]
    hub_endpoint: str | None
    check_plan: bool
    default_model: str | None
    default_adapters: dict[str, str]
    hub_users: auth.HubUsers | None
    on_change: list[Callable[[str], None]] = field(default_factory=list)  # e.g. the gateway forgets its copy

    def changed(self, name: str) -> None:
        """An endpoint's key, access or state was changed by the API: tell who keeps a copy."""
        for listener in self.on_change:
            listener(name)

    def check_spec(self, spec: DeploymentSpec, token: str | None, name_taken: bool) -> DeploymentSpec:
        """`spec.check_spec` against this host, and what the backend cannot do (422 naming the field)."""
        if spec.quantize and not self.prov.supports_quantize:
            raise SpecError(("quantize",), f"the {type(self.prov).__name__} backend does not quantize on deploy: "
                                           "run `hubdeploy quantize` and deploy its output directory, or use the "
                                           "local backend")
        return check_spec(spec, self.spec_context(token, name_taken))

    def spec_context(self, token: str | None, name_taken: bool) -> SpecContext:
        return SpecContext(allowed_roots=self.roots, hub_endpoint=self.hub_endpoint, hf_token=token,
                           name_taken=self.store.exists if name_taken else None, check_plan=self.check_plan)

    def get_rec(self, name: str) -> EndpointRecord:
        rec = self.store.get_endpoint(name, with_history=True)
        if rec is None or rec.status == "deleted":
            raise HTTPException(404, f"no endpoint named {name!r}; GET /api/endpoints lists them")
        return rec

    def accepts(self, token: str | None) -> bool:
        """A credential of the service: the admin token, or the HF token of a user `hf_users` lets in
        (blocking: scrypt, maybe a Hub call)."""
        return auth.verify_secret(token, self.store.get_meta(ADMIN_HASH_KEY)) or \
            (self.hub_users is not None and self.hub_users.allows(token))

    def start(self, name: str, spec: DeploymentSpec, token: str | None = None) -> None:
        """Provision `name` with a fresh internal key: the child's own key, known to the gateway only
        (users' keys stay at the gateway). Raises `SlotUnavailable` when no device is free."""
        self.prov.provision(spec, Secrets(hf_token=token, api_key=auth.generate_token(INTERNAL_KEY_PREFIX)))

    def restart(self, name: str, spec: DeploymentSpec, token: str | None) -> None:
        try:
            self.start(name, spec, token)
        except SlotUnavailable as e:
            self.store.update_endpoint(name, status="paused", desired="paused", reason=str(e))
            raise HTTPException(409, f"cannot start {name!r}: {e}") from None


def get_service(request: Request) -> ServiceContext:
    """The `ServiceContext` of the app serving this request (a FastAPI dependency)."""
    return request.app.state.service


def _unauthorized_message(svc: ServiceContext) -> str:
    also = (f", or the Hugging Face token of a user in {sorted(svc.hub_users.allowed)}" if svc.hub_users else "")
    return ("missing or wrong admin token: send 'Authorization: Bearer <admin token>' "
            "(printed by `hubdeploy up` at first start, or HUBDEPLOY_ADMIN_TOKEN)" + also)


def require_admin(request: Request, authorization: str | None = Header(None)) -> None:
    """Every `/api` route: the admin token, or the HF token of a user `hf_users` lets in.

    `AdminGate` has checked already, before the body was read; this keeps each route safe on
    its own (a verified token is remembered, so the second check costs a hash lookup).
    """
    svc = get_service(request)
    if not svc.accepts(auth.bearer_token(authorization)):
        raise HTTPException(401, _unauthorized_message(svc), headers={"WWW-Authenticate": "Bearer"})


Service = Annotated[ServiceContext, Depends(get_service)]


# --- one error shape for every answer that is not a success (see error_response) ---
async def _spec_error(_: Request, e: SpecError) -> JSONResponse:
    return error_response(422, _fields_message(e.detail()), code="invalid_spec", fields=e.detail())


async def _hub_down(_: Request, e: HubUnavailable) -> JSONResponse:
    return error_response(503, str(e), code="hub_unavailable")


async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
    fields = [{"loc": list(err.get("loc", ())), "msg": err.get("msg", ""), "type": err.get("type", "")}
              for err in e.errors()]
    return error_response(422, _fields_message(fields), code="invalid_request", fields=fields)


async def _http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
    if isinstance(e.detail, list):  # field errors raised by a route (e.g. /api/inspect's model)
        return error_response(e.status_code, _fields_message(e.detail), fields=e.detail, headers=e.headers)
    return error_response(e.status_code, str(e.detail), headers=e.headers)


async def _inspect_error(_: Request, e: InspectError) -> JSONResponse:
    return error_response(e.status, e.message, code=e.code, model=e.repo_id, revision=e.revision)


async def _unexpected(_: Request, e: Exception) -> JSONResponse:
    return error_response(500, f"internal error ({type(e).__name__}); the service log has the details",
                          code="internal_error")


ERROR_HANDLERS: dict[type[Exception], Any] = {
    SpecError: _spec_error, HubUnavailable: _hub_down, RequestValidationError: _invalid,
    StarletteHTTPException: _http_error, InspectError: _inspect_error, Exception: _unexpected}


# --- /api/inspect, /api/defaults: what a model is, what the page pre-fills ---
hub_router = APIRouter(prefix="/api", dependencies=[Depends(require_admin)])


@hub_router.get("/inspect", tags=["hub"])
def inspect_model(svc: Service, model: str = Query(..., min_length=1, max_length=512),
                  revision: str | None = Query(None, max_length=256),
                  x_hf_token: str | None = Header(None, include_in_schema=False)) -> Any:
    """What the model is and whether it can be served (the Hub integration's report)."""
    from hubdeploy.hub_integration.inspect_api import inspect_payload

    try:
        local = classify_source(model) == "path"
    except ValueError as e:
        raise HTTPException(422, [{"loc": ["query", "model"], "msg": str(e), "type": "value_error"}]) from None
    if local:
        try:
            model = str(resolve_local_dir(model, svc.roots, "config.json", ("model",)))
        except SpecError as e:
            raise HTTPException(422, [{"loc": ["query", "model"], "msg": e.msg, "type": e.type}]) from None
    return inspect_payload(model, None if local else revision, token=x_hf_token, endpoint=svc.hub_endpoint)


@hub_router.get("/defaults", response_model=DefaultsOut, tags=["endpoints"])
def defaults(svc: Service) -> DefaultsOut:
    return DefaultsOut(model=svc.default_model, adapters=svc.default_adapters,
                       allowed_model_roots=[str(r) for r in svc.roots], gpus=["cpu", *_gpu_names()])


# --- /api/endpoints: create, list, read, change, delete, pause, resume, rotate the key, logs ---
endpoints_router = APIRouter(prefix="/api/endpoints", tags=["endpoints"], dependencies=[Depends(require_admin)])


@endpoints_router.post("", response_model=EndpointOut, status_code=201)
def create_endpoint(body: CreateEndpointRequest, svc: Service) -> EndpointOut:
    """Validate, record and start an endpoint. A private endpoint's API key is in this answer only."""
    store, prov = svc.store, svc.prov
    token = body.hf_token.get_secret_value() if body.hf_token else None
    spec = svc.check_spec(body.spec(), token, name_taken=True)
    api_key = auth.generate_token() if spec.access == "private" else None
    try:
        store.create_endpoint(spec.name, spec.model_dump(), auth.hash_secret(api_key) if api_key else None)
    except KeyError:
        raise SpecError(("name",), f"an endpoint named {spec.name!r} already exists") from None
    try:
        svc.start(spec.name, spec, token)
    except SlotUnavailable as e:  # lost the race for the last device: nothing of it remains
        store.remove_endpoint(spec.name)
        raise HTTPException(409, f"cannot start {spec.name!r}: {e}") from None
    except BaseException:
        prov.set_api_key(spec.name, None)
        store.remove_endpoint(spec.name)
        raise
    return _out(svc.get_rec(spec.name), api_key=api_key, history=True)


@endpoints_router.get("", response_model=EndpointList)
def list_endpoints(svc: Service) -> EndpointList:
    return EndpointList(endpoints=[_out(r) for r in svc.store.list_endpoints()])


@endpoints_router.get("/{name}", response_model=EndpointOut)
def get_endpoint(svc: Service, name: str = NamePath) -> EndpointOut:
    return _out(svc.get_rec(name), history=True)


@endpoints_router.patch("/{name}", response_model=EndpointOut)
def patch_endpoint(body: PatchEndpointRequest, svc: Service, name: str = NamePath) -> EndpointOut:
    """Change options; a running endpoint restarts with them (not for access, tags, restart policy or
    scale-to-zero, which act at the gateway and the service). Turning access private makes a key."""
    store, prov = svc.store, svc.prov
    rec = svc.get_rec(name)
    old = DeploymentSpec.model_validate(rec.spec)
    token = body.hf_token.get_secret_value() if body.hf_token else None
    try:
        new = body.apply(old)
    except ValidationError as e:  # the merged spec breaks a field rule: name that field
        raise RequestValidationError([{"loc": ("body", *err["loc"]), "msg": err["msg"], "type": err["type"]}
                                      for err in e.errors()]) from None
    new = svc.check_spec(new, token, name_taken=False)
    api_key = None
    key_hash = rec.api_key_hash
    if new.access == "private" and (old.access != "private" or not key_hash):
        api_key = auth.generate_token()
        key_hash = auth.hash_secret(api_key)
    elif new.access != "private":
        key_hash = None
    store.update_endpoint(name, spec=new.model_dump(), api_key_hash=key_hash)
    svc.changed(name)
    serving = {"exclude": GATEWAY_ONLY_FIELDS}  # what the endpoint's server runs with
    if rec.desired == "running" and rec.status != "failed" and old.model_dump(**serving) != new.model_dump(**serving):
        prov.stop(name)
        svc.restart(name, new, token)
    return _out(svc.get_rec(name), api_key=api_key, history=True)


@endpoints_router.delete("/{name}", response_model=EndpointOut)
def delete_endpoint(svc: Service, name: str = NamePath) -> EndpointOut:
    """Stop the process, free the device, remove logs and key; the status becomes `deleted`."""
    svc.get_rec(name)
    svc.prov.delete(name)
    svc.changed(name)
    rec = svc.store.get_endpoint(name, with_history=True)
    assert rec is not None
    return _out(rec, history=True)


@endpoints_router.post("/{name}/pause", response_model=EndpointOut)
def pause_endpoint(svc: Service, name: str = NamePath) -> EndpointOut:
    """Stop the process and free its device; the record, key and URL port are kept."""
    svc.get_rec(name)
    svc.prov.stop(name)
    svc.changed(name)
    return _out(svc.get_rec(name), history=True)


@endpoints_router.post("/{name}/resume", response_model=EndpointOut)
def resume_endpoint(svc: Service, name: str = NamePath,
                    x_hf_token: str | None = Header(None, include_in_schema=False)) -> EndpointOut:
    """Start a paused, failed or scaled-to-zero endpoint again (same key, same gateway URL)."""
    rec = svc.get_rec(name)
    if rec.status in ("paused", "failed", "scaled_to_zero"):
        svc.store.update_endpoint(name, restarts=0)
        svc.restart(name, DeploymentSpec.model_validate(rec.spec), x_hf_token)
    return _out(svc.get_rec(name), history=True)


@endpoints_router.post("/{name}/rotate_key", response_model=EndpointOut)
def rotate_key(svc: Service, name: str = NamePath) -> EndpointOut:
    """A new API key for a private endpoint: the old one stops working at once, at the gateway
    (the endpoint keeps running: its server has its own internal key)."""
    rec = svc.get_rec(name)
    spec = DeploymentSpec.model_validate(rec.spec)
    if spec.access != "private":
        raise HTTPException(409, f"{name!r} is {spec.access} and has no key of its own; PATCH access to 'private' first")
    api_key = auth.generate_token()
    svc.store.update_endpoint(name, api_key_hash=auth.hash_secret(api_key))
    svc.changed(name)
    return _out(svc.get_rec(name), api_key=api_key, history=True)


@endpoints_router.get("/{name}/logs", response_model=LogsOut)
def endpoint_logs(svc: Service, name: str = NamePath, tail: int = Query(200, ge=1, le=10_000)) -> LogsOut:
    svc.get_rec(name)
    return LogsOut(name=name, lines=svc.prov.logs(name, tail))


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    yield
    app.state.scale_to_zero.close()
    await app.state.gateway.aclose()
    app.state.provisioner.close()


def build_service_app(data_dir: str | Path, hub_endpoint: str | None = None, admin_token: str | None = None, *,
                      allowed_model_roots: list[str | Path] | None = None, provisioner: Provisioner | None = None,
                      cpu_slots: int = 1, default_model: str | None = None,
                      default_adapters: dict[str, str] | None = None, check_plan: bool = True,
                      hf_users: list[str] | None = None, backend: str = "local",
                      max_body_bytes: int = MAX_BODY_BYTES, public_url: str | None = None,
                      scale_to_zero_interval_s: float = 1.0, **provisioner_options: Any) -> FastAPI:
    """The deploy service for `data_dir` (store, logs, models). Reconciles endpoints before returning.

    `app.state.new_admin_token` is the admin token made at this start (None when it came from
    the argument/`HUBDEPLOY_ADMIN_TOKEN` or was made before): print it once.
    `hf_users` (or `HUBDEPLOY_HF_USERS`, comma-separated): Hugging Face users or organisations
    also let in with their own HF token, e.g. the OAuth token of a Space visitor.
    `backend` names the provisioner (`local`, `ray`) built with `provisioner_options` unless
    `provisioner` is given. Request bodies over `max_body_bytes` get 413 before they are read.
    Endpoints answer at `<public_url>/endpoints/<name>/v1` (`gateway`; `public_url` or
    `HUBDEPLOY_PUBLIC_URL`, else the URL each API request came to).
    """
    data_dir = Path(data_dir).expanduser().resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    hub_endpoint = hub_endpoint or os.environ.get("HF_ENDPOINT") or None
    roots = [Path(r).expanduser().resolve() for r in (allowed_model_roots or [data_dir / "models"])]
    for r in roots:
        r.mkdir(parents=True, exist_ok=True)
    store = Store(data_dir / "hubdeploy.db")
    new_token = ensure_admin_token(store, admin_token or os.environ.get("HUBDEPLOY_ADMIN_TOKEN"))
    if provisioner is None:
        from hubdeploy.hub_integration.provisioner import make_provisioner

        if backend == "local":
            provisioner_options["cpu_slots"] = cpu_slots
        provisioner_options.setdefault("allowed_roots", roots)  # re-checked at every start; run-time adapters
        provisioner = make_provisioner(backend, store, data_dir, hub_endpoint=hub_endpoint, **provisioner_options)
    if hf_users is None:
        hf_users = [u for u in os.environ.get("HUBDEPLOY_HF_USERS", "").split(",") if u.strip()]
    hub_users = auth.HubUsers(hf_users, endpoint=hub_endpoint) if hf_users else None

    app = FastAPI(title="hubdeploy deploy service", version="0.1.0", lifespan=_lifespan, responses=_ERROR_RESPONSES,
                  description="Deploy Hugging Face Hub models to OpenAI-compatible endpoints.")
    app.state.service = ServiceContext(store, provisioner, roots, hub_endpoint, check_plan, default_model,
                                       default_adapters or {}, hub_users)
    app.state.store, app.state.provisioner, app.state.new_admin_token = store, provisioner, new_token
    app.state.data_dir, app.state.allowed_model_roots, app.state.hub_endpoint = data_dir, roots, hub_endpoint
    app.state.default_model, app.state.default_adapters = default_model, default_adapters or {}
    app.state.hub_users = hub_users
    for exc, handler in ERROR_HANDLERS.items():
        app.add_exception_handler(exc, handler)
    svc = app.state.service

    def deny(status: int, retry_after: float | None) -> JSONResponse:
        if status == 429:
            return error_response(429, f"too many wrong admin tokens from this address; retry in {retry_after:.0f} s",
                                  code="too_many_failures", headers={"Retry-After": str(int(retry_after or 0) + 1)})
        return error_response(401, _unauthorized_message(svc), headers={"WWW-Authenticate": "Bearer"})

    # the last added runs first: the token is checked before the body limit, and both before any body is read
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes,
                       reject=lambda message: error_response(413, message, code="request_too_large"))
    app.add_middleware(AdminGate, allowed=svc.accepts, deny=deny,
                       known=lambda token: auth.verified_before(token, store.get_meta(ADMIN_HASH_KEY)))
    app.include_router(hub_router)
    app.include_router(endpoints_router)
    app.include_router(gateway_router)  # documents `GatewayMount`'s paths (it answers them first)
    svc = app.state.service
    app.state.scale_to_zero = ScaleToZero(store, provisioner, svc.start, interval_s=scale_to_zero_interval_s)
    app.state.gateway = Gateway(svc, app.state.scale_to_zero)
    svc.on_change.append(app.state.gateway.forget)
    app.add_middleware(GatewayMount, gateway=app.state.gateway,
                       public_url=public_url or os.environ.get("HUBDEPLOY_PUBLIC_URL") or None)
    provisioner.reconcile()
    app.state.scale_to_zero.begin()
    return app


def _gpu_names() -> list[str]:
    from hubdeploy.hub_integration.gpus import catalog

    return [g.name for g in catalog()]


_MINIMAL_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>hubdeploy</title></head>
<body style="font-family:sans-serif;max-width:52em;margin:2em auto">
<h1>hubdeploy</h1><p>Deploy Hugging Face Hub models to OpenAI-compatible endpoints.</p>
<p>The full page is not installed in this build; use the REST API
(<a href="/docs">/docs</a>, <a href="/openapi.json">/openapi.json</a>) with
<code>Authorization: Bearer &lt;admin token&gt;</code>.</p>
<p>Model asked for: <code id="m"></code></p>
<script>document.getElementById('m').textContent=new URLSearchParams(location.search).get('model')||'(none)'</script>
</body></html>"""

# --- the page's own routes: the badge's target and image (the page itself is mounted by mount_page) ---
page_router = APIRouter(include_in_schema=False)


@page_router.get("/deploy")
def deploy(request: Request) -> RedirectResponse:
    q = request.url.query
    return RedirectResponse("/" + (f"?{q}" if q else ""), status_code=307)


@page_router.get("/badge.svg", response_class=Response)
def badge():  # noqa: ANN201 - the Deploy badge image model cards link to (hub_integration.badge)
    from hubdeploy.hub_integration.badge import badge_svg

    return Response(badge_svg(), media_type="image/svg+xml", headers={"Cache-Control": "public, max-age=86400"})


minimal_page_router = APIRouter(include_in_schema=False)


@minimal_page_router.get("/", response_class=HTMLResponse)
def index() -> str:
    return _MINIMAL_PAGE


def mount_page(app: FastAPI, blocks: Any | None = None) -> FastAPI:
    """Mount the web page at `/` (badge target `/deploy` keeps its query string).

    `blocks` is the Gradio page from `space/` (passed by the command line, which may import
    it); without one a minimal HTML page points at the API.
    """
    app.include_router(page_router)
    if blocks is not None:
        import gradio as gr

        # the page carries its own CSS/theme (Gradio 6 takes them here, not in Blocks)
        return gr.mount_gradio_app(app, blocks, path="/", **getattr(blocks, "mount_kwargs", {}))
    app.include_router(minimal_page_router)
    return app
