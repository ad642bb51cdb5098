"""The deploy service: REST API over the store and a provisioner (`build_service_app`).

Routes are those of DESIGN.md under `/api`, all behind `Authorization: Bearer <admin token>`.
The web page is mounted by `mount_page(app, blocks)` (the Gradio page from `space/` when the
command line passes one; a minimal HTML page otherwise) so this module never imports `space`.
"""
from __future__ import annotations

import os
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Literal

from fastapi import Depends, FastAPI, Header, HTTPException, Path as PathParam, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from pydantic import BaseModel, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from hubdeploy.hub_integration import auth
from hubdeploy.hub_integration.errors import InspectError
from hubdeploy.hub_integration.provisioner.base import Provisioner, Secrets
from hubdeploy.hub_integration.spec import (CreateEndpointRequest, DeploymentSpec, HubUnavailable, PatchEndpointRequest,
                                  SpecContext, SpecError, check_spec, classify_source, resolve_local_dir)
from hubdeploy.hub_integration.store import EndpointRecord, SlotUnavailable, Store

ADMIN_HASH_KEY = "admin_token_hash"
NamePath = PathParam(..., min_length=1, max_length=64, description="endpoint name")


class Progress(BaseModel):
    bytes_done: int
    bytes_total: int
    fraction: float | None = Field(None, description="bytes_done / bytes_total while downloading")


class StatusChange(BaseModel):
    status: str
    phase: str | None = None
    reason: str | None = None
    at: float


class EndpointOut(BaseModel):
    """An endpoint as the API shows it. `api_key` appears only in the create/rotate answers."""

    name: str
    spec: DeploymentSpec
    status: Literal["pending", "initializing", "running", "paused", "failed", "deleted"]
    phase: str | None = None
    progress: Progress
    url: str | None = Field(None, description="OpenAI base URL (http://host:port/v1) while running")
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
                 405: "method_not_allowed", 409: "conflict", 422: "invalid_request", 500: "internal_error",
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
        progress=Progress(bytes_done=rec.bytes_done, bytes_total=rec.bytes_total, fraction=frac),
        url=rec.url if rec.status == "running" else None, served_model_name=spec.served_model_name, reason=rec.reason, device=rec.device,
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


def build_service_app(data_dir: str | Path, hub_endpoint: str | None = None, admin_token: str | None = None, *,
                      allowed_model_roots: list[str | Path] | None = None, provisioner: Provisioner | None = None,
                      cpu_slots: int = 1, default_model: str | None = None,
                      default_adapters: dict[str, str] | None = None, check_plan: bool = True,
                      hf_users: list[str] | None = None, **provisioner_options: Any) -> FastAPI:
    """The deploy service for `data_dir` (store, logs, models). Reconciles endpoints before returning.

    `app.state.new_admin_token` is the admin token made at this start (None when it came from
    the argument/`HUBDEPLOY_ADMIN_TOKEN` or was made before): print it once.
    `hf_users` (or `HUBDEPLOY_HF_USERS`, comma-separated): Hugging Face users or organisations
    also let in with their own HF token, e.g. the OAuth token of a Space visitor.
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
        from hubdeploy.hub_integration.provisioner.local import LocalProvisioner

        provisioner = LocalProvisioner(store, data_dir, hub_endpoint=hub_endpoint, cpu_slots=cpu_slots,
                                       **provisioner_options)
    prov = provisioner

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        prov.close()

    app = FastAPI(title="hubdeploy deploy service", version="0.1.0", lifespan=lifespan, responses=_ERROR_RESPONSES,
                  description="Deploy Hugging Face Hub models to OpenAI-compatible endpoints.")
    app.state.store, app.state.provisioner, app.state.new_admin_token = store, prov, new_token
    app.state.data_dir, app.state.allowed_model_roots, app.state.hub_endpoint = data_dir, roots, hub_endpoint
    app.state.default_model, app.state.default_adapters = default_model, default_adapters or {}

    if hf_users is None:
        hf_users = [u for u in os.environ.get("HUBDEPLOY_HF_USERS", "").split(",") if u.strip()]
    hub_users = auth.HubUsers(hf_users, endpoint=hub_endpoint) if hf_users else None
    app.state.hub_users = hub_users

    def require_admin(authorization: str | None = Header(None)) -> None:
        token = auth.bearer_token(authorization)
        if not auth.verify_secret(token, store.get_meta(ADMIN_HASH_KEY)) and \
                not (hub_users is not None and hub_users.allows(token)):
            also = (f", or the Hugging Face token of a user in {sorted(hub_users.allowed)}" if hub_users else "")
            raise HTTPException(401, "missing or wrong admin token: send 'Authorization: Bearer <admin token>' "
                                     "(printed by `hubdeploy up` at first start, or HUBDEPLOY_ADMIN_TOKEN)" + also,
                                headers={"WWW-Authenticate": "Bearer"})

    # --- one error shape for every answer that is not a success (see error_response) ---
    @app.exception_handler(SpecError)
    async def _spec_error(_: Request, e: SpecError) -> JSONResponse:
        return error_response(422, _fields_message(e.detail()), code="invalid_spec", fields=e.detail())

    @app.exception_handler(HubUnavailable)
    async def _hub_down(_: Request, e: HubUnavailable) -> JSONResponse:
        return error_response(503, str(e), code="hub_unavailable")

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        fields = [{"loc": list(err.get("loc", ())), "msg": err.get("msg", ""), "type": err.get("type", "")}
                  for err in e.errors()]
        return error_response(422, _fields_message(fields), code="invalid_request", fields=fields)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        if isinstance(e.detail, list):  # field errors raised by a route (e.g. /api/inspect's model)
            return error_response(e.status_code, _fields_message(e.detail), fields=e.detail, headers=e.headers)
        return error_response(e.status_code, str(e.detail), headers=e.headers)

    @app.exception_handler(InspectError)
    async def _inspect_error(_: Request, e: InspectError) -> JSONResponse:
        return error_response(e.status, e.message, code=e.code, model=e.repo_id, revision=e.revision)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, e: Exception) -> JSONResponse:
        return error_response(500, f"internal error ({type(e).__name__}); the service log has the details",
                              code="internal_error")

    def ctx(token: str | None, name_taken: bool) -> SpecContext:
        return SpecContext(allowed_roots=roots, hub_endpoint=hub_endpoint, hf_token=token,
                           name_taken=store.exists if name_taken else None, check_plan=check_plan)

    def get_rec(name: str) -> EndpointRecord:
        rec = store.get_endpoint(name, with_history=True)
        if rec is None or rec.status == "deleted":
            raise HTTPException(404, f"no endpoint named {name!r}; GET /api/endpoints lists them")
        return rec

    api = [Depends(require_admin)]

    @app.get("/api/inspect", dependencies=api, tags=["hub"])
    def inspect_model(model: str = Query(..., min_length=1, max_length=512),
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
                model = str(resolve_local_dir(model, roots, "config.json", ("model",)))
            except SpecError as e:
                raise HTTPException(422, [{"loc": ["query", "model"], "msg": e.msg, "type": e.type}]) from None
        return inspect_payload(model, None if local else revision, token=x_hf_token, endpoint=hub_endpoint)

    @app.get("/api/defaults", dependencies=api, response_model=DefaultsOut, tags=["endpoints"])
    def defaults() -> DefaultsOut:
        return DefaultsOut(model=default_model, adapters=default_adapters or {}, allowed_model_roots=[str(r) for r in roots],
                           gpus=["cpu", *_gpu_names()])

    @app.post("/api/endpoints", dependencies=api, response_model=EndpointOut, status_code=201, tags=["endpoints"])
    def create_endpoint(body: CreateEndpointRequest) -> EndpointOut:
        """Validate, record and start an endpoint. A private endpoint's API key is in this answer only."""
        token = body.hf_token.get_secret_value() if body.hf_token else None
        spec = check_spec(body.spec(), ctx(token, name_taken=True))
        api_key = auth.generate_token() if spec.access == "private" else None
        try:
            store.create_endpoint(spec.name, spec.model_dump(), auth.hash_secret(api_key) if api_key else None)
        except KeyError:
            raise SpecError(("name",), f"an endpoint named {spec.name!r} already exists") from None
        try:
            prov.provision(spec, Secrets(hf_token=token, api_key=api_key))
        except SlotUnavailable as e:  # lost the race for the last device: nothing of it remains
            store.remove_endpoint(spec.name)
            raise HTTPException(409, f"cannot start {spec.name!r}: {e}") from None
        except BaseException:
            prov.set_api_key(spec.name, None)
            store.remove_endpoint(spec.name)
            raise
        return _out(get_rec(spec.name), api_key=api_key, history=True)

    @app.get("/api/endpoints", dependencies=api, response_model=EndpointList, tags=["endpoints"])
    def list_endpoints() -> EndpointList:
        return EndpointList(endpoints=[_out(r) for r in store.list_endpoints()])

    @app.get("/api/endpoints/{name}", dependencies=api, response_model=EndpointOut, tags=["endpoints"])
    def get_endpoint(name: str = NamePath) -> EndpointOut:
        return _out(get_rec(name), history=True)

    @app.patch("/api/endpoints/{name}", dependencies=api, response_model=EndpointOut, tags=["endpoints"])
    def patch_endpoint(body: PatchEndpointRequest, name: str = NamePath) -> EndpointOut:
        """Change options; a running endpoint restarts with them. Turning access private makes a key."""
        rec = get_rec(name)
        old = DeploymentSpec.model_validate(rec.spec)
        token = body.hf_token.get_secret_value() if body.hf_token else None
        try:
            new = body.apply(old)
        except ValidationError as e:  # the merged spec breaks a field rule: name that field
            raise RequestValidationError([{"loc": ("body", *err["loc"]), "msg": err["msg"], "type": err["type"]}
                                          for err in e.errors()]) from None
        new = check_spec(new, ctx(token, name_taken=False))
        api_key = None
        key_hash = rec.api_key_hash
        if new.access == "private" and (old.access != "private" or not key_hash):
            api_key = auth.generate_token()
            key_hash = auth.hash_secret(api_key)
        elif new.access == "public":
            key_hash = None
        store.update_endpoint(name, spec=new.model_dump(), api_key_hash=key_hash)
        if api_key is not None or new.access == "public":
            prov.set_api_key(name, api_key)
        if rec.desired == "running" and rec.status != "failed":
            prov.stop(name)
            _restart(name, new, token)
        return _out(get_rec(name), api_key=api_key, history=True)

    def _restart(name: str, spec: DeploymentSpec, token: str | None) -> None:
        key = prov.get_api_key(name)
        try:
            prov.provision(spec, Secrets(hf_token=token, api_key=key if spec.access == "private" else None))
        except SlotUnavailable as e:
            store.update_endpoint(name, status="paused", desired="paused", reason=str(e))
            raise HTTPException(409, f"cannot start {name!r}: {e}") from None

    @app.delete("/api/endpoints/{name}", dependencies=api, response_model=EndpointOut, tags=["endpoints"])
    def delete_endpoint(name: str = NamePath) -> EndpointOut:
        """Stop the process, free the device, remove logs and key; the status becomes `deleted`."""
        get_rec(name)
        prov.delete(name)
        rec = store.get_endpoint(name, with_history=True)
        assert rec is not None
        return _out(rec, history=True)

    @app.post("/api/endpoints/{name}/pause", dependencies=api, response_model=EndpointOut, tags=["endpoints"])
    def pause_endpoint(name: str = NamePath) -> EndpointOut:
        """Stop the process and free its device; the record, key and URL port are kept."""
        get_rec(name)
        prov.stop(name)
        return _out(get_rec(name), history=True)

    @app.post("/api/endpoints/{name}/resume", dependencies=api, response_model=EndpointOut, tags=["endpoints"])
    def resume_endpoint(name: str = NamePath,
                        x_hf_token: str | None = Header(None, include_in_schema=False)) -> EndpointOut:
        """Start a paused or failed endpoint again (same key, same port when it is still free)."""
        rec = get_rec(name)
        if rec.status in ("paused", "failed"):
            store.update_endpoint(name, restarts=0)
            _restart(name, DeploymentSpec.model_validate(rec.spec), x_hf_token)
        return _out(get_rec(name), history=True)

    @app.post("/api/endpoints/{name}/rotate_key", dependencies=api, response_model=EndpointOut, tags=["endpoints"])
    def rotate_key(name: str = NamePath) -> EndpointOut:
        """A new API key for a private endpoint (the old one stops working); running ones restart."""
        rec = get_rec(name)
        spec = DeploymentSpec.model_validate(rec.spec)
        if spec.access != "private":
            raise HTTPException(409, f"{name!r} is public and has no key; PATCH access to 'private' first")
        api_key = auth.generate_token()
        store.update_endpoint(name, api_key_hash=auth.hash_secret(api_key))
        prov.set_api_key(name, api_key)
        if rec.desired == "running" and rec.status != "failed":
            prov.stop(name)
            _restart(name, spec, None)
        return _out(get_rec(name), api_key=api_key, history=True)

    @app.get("/api/endpoints/{name}/logs", dependencies=api, response_model=LogsOut, tags=["endpoints"])
    def endpoint_logs(name: str = NamePath, tail: int = Query(200, ge=1, le=10_000)) -> LogsOut:
        get_rec(name)
        return LogsOut(name=name, lines=prov.logs(name, tail))

    prov.reconcile()
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


def mount_page(app: FastAPI, blocks: Any | None = None) -> FastAPI:
    """Mount the web page at `/` (badge target `/deploy` keeps its query string).

    `blocks` is the Gradio page from `space/` (passed by the command line, which may import
    it); without one a minimal HTML page points at the API.
    """
    @app.get("/deploy", include_in_schema=False)
    def deploy(request: Request) -> RedirectResponse:
        q = request.url.query
        return RedirectResponse("/" + (f"?{q}" if q else ""), status_code=307)

    from fastapi.responses import Response as SvgResponse

    @app.get("/badge.svg", include_in_schema=False, response_class=SvgResponse)
    def badge():  # noqa: ANN202 - the Deploy badge image model cards link to (hub_integration.badge)
        from hubdeploy.hub_integration.badge import badge_svg

        return SvgResponse(badge_svg(), media_type="image/svg+xml", headers={"Cache-Control": "public, max-age=86400"})

    if blocks is not None:
        import gradio as gr

        # the page carries its own CSS/theme (Gradio 6 takes them here, not in Blocks)
        return gr.mount_gradio_app(app, blocks, path="/", **getattr(blocks, "mount_kwargs", {}))

    @app.get("/", include_in_schema=False, response_class=HTMLResponse)
    def index() -> str:
        return _MINIMAL_PAGE

    return app
