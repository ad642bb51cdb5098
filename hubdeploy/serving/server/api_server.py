"""The OpenAI-compatible HTTP front of the engine (FastAPI).

`build_app(engine, served_model_name, ...)` returns the app; the engine may be attached
later with `attach_engine(app, engine, ...)` so that `hubdeploy serve` can answer
`/health` with 503 while the model downloads and loads. Routes turn requests into token
ids and `SamplingParams`, run `n` sequences through `EngineClient.generate`, and answer in
OpenAI's shapes (JSON or SSE). Every client-caused failure is an `OpenAIError` (400/401/
404...), never a 500; a client that goes away mid-request has its sequences aborted so the
engine frees their KV blocks. The request log carries no prompt text, tokens or headers.

No single request may stall the event loop (and with it `/health`, which the deploy
service's watchdog polls): bodies are capped before they are read (`body_limit.BodyLimit`),
requests are capped in sequences, tokens and log-prob entries (`request_limits.RequestLimits`), and
the CPU-heavy parts of a request (chat template, tokenizing, formatting a whole answer
with its log-probs) run on a small thread pool (`_off_loop`).
"""
from __future__ import annotations

import asyncio
import functools
import hmac
import json
import logging
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable, TypeVar, Union

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from hubdeploy.serving.chat_template import ChatTemplateError, render_chat
from hubdeploy.serving.sampling_params import SamplingParams
from hubdeploy.serving.server.adapter_policy import AdapterRefused, allowed_source, check_adapter_name
from hubdeploy.serving.server.body_limit import BodyLimit
from hubdeploy.serving.server.errors import ClientGone, OpenAIError, error_response, install_error_handlers
from hubdeploy.serving.server.log_text import printable
from hubdeploy.serving.server.metrics import CONTENT_TYPE, ServerMetrics
from hubdeploy.serving.server.protocol import (
    ChatChoiceLogprobs,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamChoice,
    ChatResponseMessage,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamResponse,
    DeltaMessage,
    LoadLoRAAdapterRequest,
    ModelCard,
    ModelList,
    UnloadLoRAAdapterRequest,
    UsageInfo,
    now,
    random_id,
)
from hubdeploy.serving.server.request_limits import LimitExceeded, RequestLimits, cap_tokens, check_sequences

if TYPE_CHECKING:  # (the engine's modules import torch; the server's types need not)
    from hubdeploy.serving.engine_client import EngineClient
    from hubdeploy.serving.outputs import RequestOutput
    from hubdeploy.serving.stats import EngineStats

logger = logging.getLogger("hubdeploy.server")

T = TypeVar("T")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_LORA_ADMIN_PATHS = ("/v1/load_lora_adapter", "/v1/unload_lora_adapter")
_GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions")

# (name, path) -> awaitable; filled by the LoRA manager's integration
LoRALoadHook = Callable[[str, str], Awaitable[None]]
LoRAUnloadHook = Callable[[str], Awaitable[None]]


@dataclass
class ServerState:
    """Everything the routes need; one per app."""

    served_model_name: str
    api_key: str | None = None
    engine: EngineClient | None = None  # once loaded
    chat_template: str | None = None
    special_tokens: dict[str, Any] = field(default_factory=dict)
    max_model_len: int | None = None
    phase: str = "starting"
    phases: list[str] = field(default_factory=list)  # every phase so far, in order (`/health` lists them)
    failure: str | None = None
    # adapters served beside the base model: name -> source (path or repo id)
    adapters: dict[str, str] = field(default_factory=dict)
    lora_load: LoRALoadHook | None = None
    lora_unload: LoRAUnloadHook | None = None
    disable_lora_admin: bool = False
    # adapter admin needs `api_key` or this key, even on a public endpoint (none of both: closed)
    lora_admin_key: str | None = None
    lora_roots: list[Path] = field(default_factory=list)  # where run-time loads may read (adapter_policy)
    metrics: ServerMetrics | None = None
    limits: RequestLimits = field(default_factory=RequestLimits)
    # CPU-heavy request work (templates, tokenizing, whole answers): off the event loop
    cpu_pool: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=4, thread_name_prefix="request-cpu"))

    @property
    def ready(self) -> bool:
        return self.engine is not None and self.failure is None and self.engine.is_ready

    def engine_stats(self) -> EngineStats | None:
        return self.engine.stats() if self.engine is not None and self.ready else None


def build_app(
    engine: EngineClient | None = None,
    served_model_name: str = "model",
    api_key: str | None = None,
    chat_template: str | None = None,
    special_tokens: dict[str, Any] | None = None,
    max_model_len: int | None = None,
    adapters: dict[str, str] | None = None,
    disable_lora_admin: bool = False,
    limits: RequestLimits | None = None,
    lora_admin_key: str | None = None,
    lora_roots: list[Path] | None = None,
) -> FastAPI:
    """The OpenAI-compatible app; pass `engine=None` and call `attach_engine` when loaded."""
    app = FastAPI(title="hubdeploy endpoint", docs_url=None, redoc_url=None, openapi_url=None)
    state = ServerState(served_model_name=served_model_name, api_key=api_key or None,
                        adapters=dict(adapters or {}), disable_lora_admin=disable_lora_admin,
                        limits=limits or RequestLimits(), lora_admin_key=lora_admin_key or None,
                        lora_roots=list(lora_roots or []))
    state.metrics = ServerMetrics(served_model_name, state.engine_stats)
    app.state.server = state
    install_error_handlers(app)
    _install_middleware(app, state)
    _install_routes(app, state)
    if engine is not None:
        attach_engine(app, engine, chat_template=chat_template, special_tokens=special_tokens,
                      max_model_len=max_model_len)
    return app


def attach_engine(app: FastAPI, engine: EngineClient, chat_template: str | None = None,
                  special_tokens: dict[str, Any] | None = None, max_model_len: int | None = None) -> None:
    """Start serving with a loaded engine (`/health` turns 200 once it reports ready)."""
    state: ServerState = app.state.server
    tok = engine.tokenizer
    if chat_template is None:
        chat_template = tok.chat_template
    if special_tokens is None:
        special_tokens = dict(tok.special_tokens)
    state.chat_template = chat_template
    state.special_tokens = {k: v for k, v in special_tokens.items() if v is not None}
    state.max_model_len = max_model_len or engine.max_model_len
    state.engine = engine
    _enter_phase(state, "ready")


def set_lora_hooks(app: FastAPI, load: LoRALoadHook | None, unload: LoRAUnloadHook | None,
                   adapters: dict[str, str] | None = None) -> None:
    """Let the LoRA manager serve `/v1/load_lora_adapter` and `/v1/unload_lora_adapter`.

    `load(name, path)` / `unload(name)` are awaited by the routes and raise `OpenAIError`
    (or `ValueError`, answered 400) on a bad adapter; `adapters` (name -> source) replaces
    the list `/v1/models` shows, e.g. with what the engine actually loaded.
    """
    state: ServerState = app.state.server
    state.lora_load, state.lora_unload = load, unload
    if adapters is not None:
        state.adapters = dict(adapters)


def set_phase(app: FastAPI, phase: str, failure: str | None = None) -> None:
    """Record the loading phase (shown by `/health` while not ready) or a failure."""
    state: ServerState = app.state.server
    _enter_phase(state, phase)
    if failure is not None:
        state.failure = failure


def _enter_phase(state: ServerState, phase: str) -> None:
    state.phase = phase
    if not state.phases or state.phases[-1] != phase:
        state.phases.append(phase)


# ------------------------------------------------------------------ middleware


def _install_middleware(app: FastAPI, state: ServerState) -> None:
    # the last added runs first: the key is checked (and the line logged) before any body is read
    app.add_middleware(BodyLimit, max_bytes=state.limits.max_body_bytes,
                       reject=lambda message: error_response(OpenAIError(message, 413, code="request_too_large")))
    app.add_middleware(_AuthAndLogMiddleware, state=state)


class _AuthAndLogMiddleware:
    """Bearer-key check on `/v1` routes and one log line per request (after its last byte).

    Adapter admin always needs a key (the endpoint's, or `lora_admin_key`), public endpoint
    or not; with neither set it is closed (403). Keys are checked before any body is read.
    Generation requests in flight are capped per key (per client address when public): 429.

    Plain ASGI rather than `BaseHTTPMiddleware`, so streamed responses and client disconnects
    pass straight through. The log line has no body, query string or headers: prompts and
    keys never reach the log.
    """

    def __init__(self, app: Any, state: ServerState) -> None:
        self.app, self.state = app, state
        self.in_flight: dict[str, int] = {}  # key (or client address) -> generation requests running

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = self.state
        path: str = scope.get("path", "")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        rid = headers.get("x-request-id", "")
        if not _REQUEST_ID.fullmatch(rid):  # the client's id is echoed and logged: plain tokens only
            rid = uuid.uuid4().hex[:16]
        t0 = time.perf_counter()
        status = {"code": 500}

        async def send_with_id(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", rid.encode("latin-1"))]
            await send(message)

        denied: OpenAIError | None = None
        if path in _LORA_ADMIN_PATHS:
            keys = [k for k in (state.api_key, state.lora_admin_key) if k]
            if not keys:
                denied = OpenAIError("adapter admin is closed on this endpoint: it has no key (start it with "
                                     "--api-key or --lora-admin-key), so anyone could load adapters", 403,
                                     code="lora_admin_disabled")
            else:
                denied = _key_error(headers.get("authorization", ""), keys)
        elif state.api_key and path.startswith("/v1"):
            denied = _key_error(headers.get("authorization", ""), [state.api_key])
        # in-flight generation requests per key (per client address on a public endpoint)
        holder = (headers.get("authorization", "") if state.api_key else (scope.get("client") or ("?",))[0]) \
            if path in _GENERATION_PATHS and denied is None else None
        if holder is not None:
            if self.in_flight.get(holder, 0) >= state.limits.max_concurrent_per_key:
                denied = OpenAIError(f"too many requests in flight for this key (at most "
                                     f"{state.limits.max_concurrent_per_key} at once); retry when one has finished",
                                     429, code="too_many_concurrent_requests")
                holder = None
            else:
                self.in_flight[holder] = self.in_flight.get(holder, 0) + 1
        try:
            if denied is not None:
                await error_response(denied)(scope, receive, send_with_id)
            else:
                await self.app(scope, receive, send_with_id)
        finally:
            if holder is not None:
                left = self.in_flight[holder] - 1
                if left:
                    self.in_flight[holder] = left
                else:
                    del self.in_flight[holder]
            if path not in ("/health", "/metrics"):
                logger.info("request %s %s %s -> %d in %.1f ms", rid, printable(str(scope.get("method"))),
                            printable(path), status["code"],
                            (time.perf_counter() - t0) * 1e3)
            if status["code"] >= 400 and path.startswith("/v1") and state.metrics is not None:
                state.metrics.observe_error(status["code"])


def _key_error(auth: str, keys: list[str]) -> OpenAIError | None:
    """None when the `Authorization` header carries one of `keys`, else the 401 to answer."""
    scheme, _, token = auth.partition(" ")
    if not auth:
        return OpenAIError("missing API key: send the header 'Authorization: Bearer <key>' (the key "
                           "printed when the endpoint was created)", 401, code="missing_api_key")
    given = token.strip().encode()
    matches = [hmac.compare_digest(given, k.encode()) for k in keys]  # every key compared: constant time
    if scheme.lower() != "bearer" or not any(matches):
        return OpenAIError("invalid API key: the bearer token does not match this endpoint's key", 401,
                           code="invalid_api_key")
    return None


# ------------------------------------------------------------------ routes


def _install_routes(app: FastAPI, state: ServerState) -> None:
    @app.get("/health")
    async def health() -> Response:
        """The one channel of phases and readiness the deploy service reads (`provisioner.health`):
        set only by the server itself, never by what a request carries."""
        phases = list(state.phases)
        if state.failure is not None:
            return JSONResponse({"status": "failed", "phase": state.phase, "phases": phases, "error": state.failure},
                                status_code=503)
        if not state.ready:
            return JSONResponse({"status": "loading", "phase": state.phase, "phases": phases}, status_code=503)
        return JSONResponse({"status": "ok", "phase": "ready", "phases": phases, "model": state.served_model_name})

    @app.get("/metrics")
    async def metrics() -> Response:
        assert state.metrics is not None
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> ModelList:
        cards = [ModelCard(id=state.served_model_name, root=state.served_model_name, max_model_len=state.max_model_len)]
        for name, source in state.adapters.items():
            cards.append(ModelCard(id=name, root=source, parent=state.served_model_name))
        return ModelList(data=cards)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        engine = _require_engine(state)
        lora = _resolve_model(state, body.model)
        if state.chat_template is None:
            raise OpenAIError(
                f"model '{state.served_model_name}' has no chat template (tokenizer_config.json has no "
                "'chat_template'), so chat messages cannot be turned into a prompt; use /v1/completions "
                "with a plain prompt instead", 400, param="messages", code="no_chat_template")
        _limit(check_sequences, state.limits, 1, body.n, "messages")
        prompt_ids = await _off_loop(state, _chat_prompt_ids, state.chat_template, state.special_tokens,
                                     engine.tokenizer, body)
        requested = body.requested_max_tokens()
        max_param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        max_tokens = _check_lengths(state, len(prompt_ids), requested, "messages", max_param)
        max_tokens = _limit(cap_tokens, state.limits, [len(prompt_ids)], body.n, max_tokens, requested is not None,
                            body.num_logprobs(), state.max_model_len, prompt_param="messages",
                            max_param=max_param, logprobs_param="top_logprobs")
        params = [_params(body, max_tokens, i) for i in range(body.n)]
        rid = random_id("chatcmpl")
        if body.stream:
            return _sse(_chat_stream(state, engine, body, rid, prompt_ids, params, lora))
        finals = await _unless_disconnected(request, _run_all(state, engine, rid, [prompt_ids] * body.n, params,
                                                              lora, body.model))
        return await _off_loop(state, _chat_answer, engine.tokenizer, body, rid, prompt_ids, params, finals)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        engine = _require_engine(state)
        lora = _resolve_model(state, body.model)
        if body.suffix:
            raise OpenAIError("'suffix' is not supported by this server", 400, param="suffix", code="unsupported")
        prompts = body.prompt_list()
        if not prompts:
            raise OpenAIError("'prompt' must not be empty", 400, param="prompt", code="invalid_value")
        _limit(check_sequences, state.limits, len(prompts), body.n, "prompt")
        prompt_ids_list = await _off_loop(state, _completion_prompt_ids, engine.tokenizer, prompts)
        # OpenAI's completions default is 16 tokens (chat defaults to the rest of the context)
        requested = body.requested_max_tokens()
        max_tokens = min(_check_lengths(state, len(ids), requested, "prompt", "max_tokens")
                         for ids in prompt_ids_list)
        if requested is None:
            max_tokens = min(max_tokens, 16)
        max_tokens = _limit(cap_tokens, state.limits, [len(ids) for ids in prompt_ids_list], body.n, max_tokens,
                            requested is not None, body.num_logprobs(), state.max_model_len,
                            prompt_param="prompt", max_param="max_tokens", logprobs_param="logprobs")
        # choice index = prompt index * n + i, as OpenAI numbers them
        all_ids = [ids for ids in prompt_ids_list for _ in range(body.n)]
        params = [_params(body, max_tokens, i) for _ in prompt_ids_list for i in range(body.n)]
        rid = random_id("cmpl")
        echo_texts = (await _off_loop(state, _echo_texts, engine.tokenizer, prompts, body.n) if body.echo
                      else [""] * len(all_ids))
        if body.stream:
            return _sse(_completion_stream(state, engine, body, rid, all_ids, params, lora, echo_texts))
        finals = await _unless_disconnected(request, _run_all(state, engine, rid, all_ids, params, lora, body.model))
        return await _off_loop(state, _completion_answer, engine.tokenizer, body, rid, prompt_ids_list, params,
                               finals, echo_texts)

    _install_lora_routes(app, state)


def _install_lora_routes(app: FastAPI, state: ServerState) -> None:
    """Adapter admin; answers 501 until the LoRA manager sets `state.lora_load/unload`."""

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadLoRAAdapterRequest) -> Response:
        load = _lora_admin_hook(state, "loading", state.lora_load,
                                "; start the server with --lora NAME=PATH instead")
        try:
            check_adapter_name(body.lora_name)
            source = allowed_source(body.lora_path, state.lora_roots)
        except AdapterRefused as e:
            raise OpenAIError(e.message, 400, param=e.param, code="invalid_adapter_source"
                              if e.param == "lora_path" else "invalid_value") from e
        if body.lora_name == state.served_model_name or body.lora_name in state.adapters:
            raise OpenAIError(f"an adapter or model named '{body.lora_name}' is already served", 400,
                              param="lora_name", code="adapter_exists")
        try:
            await load(body.lora_name, source)
        except ValueError as e:
            raise OpenAIError(f"cannot load adapter '{body.lora_name}' from {source}: {e}", 400,
                              param="lora_path", code="invalid_adapter") from e
        state.adapters[body.lora_name] = source
        return JSONResponse({"status": "ok", "lora_name": body.lora_name})

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadLoRAAdapterRequest) -> Response:
        unload = _lora_admin_hook(state, "unloading", state.lora_unload)
        try:
            check_adapter_name(body.lora_name)
        except AdapterRefused as e:
            raise OpenAIError(e.message, 400, param=e.param, code="invalid_value") from e
        if body.lora_name not in state.adapters:
            raise OpenAIError(f"no adapter named '{body.lora_name}' is loaded; see /v1/models", 404,
                              param="lora_name", code="model_not_found")
        await unload(body.lora_name)
        state.adapters.pop(body.lora_name, None)
        return JSONResponse({"status": "ok", "lora_name": body.lora_name})


# ------------------------------------------------------------------ request work off the event loop


async def _off_loop(state: ServerState, fn: Callable[..., T], *args: Any) -> T:
    """Run `fn(*args)` on the request thread pool: the event loop keeps answering `/health`
    and streaming other requests meanwhile. Exceptions (e.g. `OpenAIError`) come through."""
    return await asyncio.get_running_loop().run_in_executor(state.cpu_pool, functools.partial(fn, *args))


def _chat_prompt_ids(template: str, special_tokens: dict[str, Any], tok: Any, body: ChatCompletionRequest) -> list[int]:
    """The rendered chat template of `body`'s messages, tokenized."""
    try:
        prompt = render_chat(template, body.template_messages(), add_generation_prompt=body.add_generation_prompt,
                             **{**special_tokens, **(body.chat_template_kwargs or {})})
    except ChatTemplateError as e:
        raise OpenAIError(f"the model's chat template rejected the conversation: {e}", 400,
                          param="messages", code="chat_template_error") from e
    return tok.encode(prompt, add_special_tokens=False)


def _completion_prompt_ids(tok: Any, prompts: list[Union[str, list[int]]]) -> list[list[int]]:
    """Each prompt as token ids (strings tokenized, id lists checked against the vocabulary)."""
    vocab = tok.vocab_size
    out: list[list[int]] = []
    for p in prompts:
        if isinstance(p, str):
            ids = tok.encode(p)
        else:
            ids = list(p)
            if vocab and any(t < 0 or t >= vocab for t in ids):
                raise OpenAIError(f"token ids in 'prompt' must be in [0, {vocab})", 400, param="prompt",
                                  code="invalid_value")
        if not ids:
            raise OpenAIError("'prompt' must contain at least one token", 400, param="prompt", code="invalid_value")
        out.append(ids)
    return out


def _echo_texts(tok: Any, prompts: list[Union[str, list[int]]], n: int) -> list[str]:
    return [p if isinstance(p, str) else tok.decode(p) for p in prompts for _ in range(n)]


def _chat_answer(tok: Any, body: ChatCompletionRequest, rid: str, prompt_ids: list[int],
                 params: list[SamplingParams], finals: list[RequestOutput]) -> JSONResponse:
    """The whole non-streamed chat answer, serialized (log-probs of every token included)."""
    choices = [_with_logprobs(ChatCompletionChoice(
        index=i, message=ChatResponseMessage(content=o.text), finish_reason=_finish(o)),
        _chat_logprobs_json(tok, o.logprobs) if params[i].logprobs is not None else None)
        for i, o in enumerate(finals)]
    completion = sum(len(o.token_ids) for o in finals)
    return _json_answer(ChatCompletionResponse(
        id=rid, model=body.model, choices=[],
        usage=UsageInfo(prompt_tokens=len(prompt_ids), completion_tokens=completion,
                        total_tokens=len(prompt_ids) + completion)), choices)


def _completion_answer(tok: Any, body: CompletionRequest, rid: str, prompt_ids_list: list[list[int]],
                       params: list[SamplingParams], finals: list[RequestOutput],
                       echo_texts: list[str]) -> JSONResponse:
    """The whole non-streamed completions answer, serialized."""
    choices = [_with_logprobs(CompletionChoice(index=i, text=echo_texts[i] + o.text, finish_reason=_finish(o)),
                              _completion_logprobs_json(tok, o.logprobs) if params[i].logprobs is not None else None)
               for i, o in enumerate(finals)]
    prompt_tokens = sum(len(ids) for ids in prompt_ids_list)
    completion = sum(len(o.token_ids) for o in finals)
    return _json_answer(CompletionResponse(
        id=rid, model=body.model, choices=[],
        usage=UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion,
                        total_tokens=prompt_tokens + completion)), choices)


def _render(obj: Any) -> str:
    """JSON exactly as `JSONResponse` renders it."""
    return json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def _with_logprobs(choice: Any, logprobs_json: str | None) -> str:
    """A choice (built with `logprobs=None`) as JSON, with its log-probs' JSON put in.

    The fields before `logprobs` are an index and JSON-escaped text: the first
    `"logprobs":null` is the key itself.
    """
    text = _render(choice.model_dump())
    if logprobs_json is None:
        return text
    return text.replace('"logprobs":null', f'"logprobs":{logprobs_json}', 1)


def _json_answer(head: Any, choices: list[str]) -> Response:
    """`head` (a response with `choices=[]`) with the choices' JSON put in.

    A whole answer with its log-probs as pydantic models is about a million objects: the
    collector's full passes over them, and one C/Rust dump of them all, each hold the GIL for
    hundreds of ms, stalling the event loop. Built as text, choice by choice and token by
    token, little is kept alive and no call runs long. The bytes are those of
    `JSONResponse(whole.model_dump())`.
    """
    text = _render(head.model_dump())
    # the fields before `choices` are an id, a type, a number and a JSON-escaped name
    return Response(text.replace('"choices":[]', f'"choices":[{",".join(choices)}]', 1).encode("utf-8"),
                    media_type="application/json")


def _limit(check: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """A `request_limits` check whose `LimitExceeded` becomes the client's 400."""
    try:
        return check(*args, **kwargs)
    except LimitExceeded as e:
        raise OpenAIError(e.message, 400, param=e.param, code="request_too_large") from e


# ------------------------------------------------------------------ helpers


def _lora_admin_hook(state: ServerState, verb: str, hook: Callable[..., Awaitable[Any]] | None,
                     hint: str = "") -> Callable[..., Awaitable[Any]]:
    """The adapter-admin `hook` ready to call, or the OpenAI error saying why it cannot run:
    403 when admin is switched off, 501 when this build has no LoRA manager behind it."""
    if state.disable_lora_admin:
        raise OpenAIError(f"adapter {verb} is disabled on this endpoint (--disable-lora-admin)", 403,
                          code="lora_admin_disabled")
    if hook is None:
        raise OpenAIError(f"{verb} LoRA adapters at run time is not available in this server build{hint}", 501,
                          code="not_implemented")
    return hook


def _require_engine(state: ServerState) -> EngineClient:
    if state.failure is not None:
        raise OpenAIError(f"the model failed to load: {state.failure}", 503, code="engine_failed")
    if not state.ready:
        raise OpenAIError(f"the model is still loading (phase: {state.phase}); retry when GET /health answers 200",
                          503, code="model_loading")
    assert state.engine is not None  # ready
    return state.engine


def _resolve_model(state: ServerState, model: str) -> str | None:
    """The LoRA adapter a request's `model` selects (None: the base model); 404 if unknown."""
    if model == state.served_model_name:
        return None
    if model in state.adapters:
        return model
    served = [state.served_model_name, *state.adapters]
    raise OpenAIError(f"the model '{model}' does not exist on this endpoint; served: {', '.join(served)}",
                      404, param="model", code="model_not_found")


def _check_lengths(state: ServerState, prompt_len: int, max_tokens: int | None,
                   prompt_param: str, max_param: str) -> int:
    """The `max_tokens` to run with; 400 when the prompt or the request does not fit the context."""
    limit = state.max_model_len
    if limit is None:
        return max_tokens or 16
    if prompt_len >= limit:
        raise OpenAIError(
            f"the prompt is {prompt_len} tokens, but this model's context is {limit} tokens (prompt plus "
            f"at least one generated token); shorten the prompt", 400, param=prompt_param, code="context_length_exceeded")
    room = limit - prompt_len
    if max_tokens is None:
        return room
    if max_tokens > room:
        raise OpenAIError(
            f"'{max_param}' is {max_tokens}, but the prompt is {prompt_len} tokens and the context is {limit}, so "
            f"at most {room} tokens can be generated; lower '{max_param}' or shorten the prompt",
            400, param=max_param, code="context_length_exceeded")
    return max_tokens


def _params(body: Union[ChatCompletionRequest, CompletionRequest], max_tokens: int, index: int) -> SamplingParams:
    try:
        return body.to_sampling_params(max_tokens, index)
    except ValueError as e:
        raise OpenAIError(str(e), 400, param=str(e).split(" ", 1)[0], code="invalid_value") from e


def _finish(out: RequestOutput) -> str | None:
    reason = out.finish_reason
    return reason if reason in ("stop", "length", "abort", None) else str(reason)


class _Tracker:
    """Latency bookkeeping for one sequence (TTFT, inter-token gaps, end-to-end)."""

    def __init__(self, state: ServerState, model: str, start: float) -> None:
        self.state, self.model, self.start = state, model, start
        self.last: float | None = None

    def on_output(self, out: RequestOutput) -> None:
        m = self.state.metrics
        if m is None:
            return
        delta = out.delta_token_ids
        if self.last is None:
            if (delta or out.finished) and out.token_ids:
                t = time.perf_counter()
                m.observe_ttft(t - self.start)
                self.last = t
        elif delta:
            t = time.perf_counter()
            n = len(delta)
            m.observe_itl((t - self.last) / n, count=n)
            self.last = t

    def on_finished(self, out: RequestOutput) -> None:
        if self.state.metrics is not None:
            self.state.metrics.observe_finished(time.perf_counter() - self.start, len(out.prompt_token_ids),
                                                len(out.token_ids), _finish(out))


async def _run_all(state: ServerState, engine: EngineClient, rid: str, prompts: list[list[int]],
                   params: list[SamplingParams], lora: str | None, model: str) -> list[RequestOutput]:
    """Run every sequence to completion; abort the rest if one fails or the client leaves."""
    start = time.perf_counter()
    ids = [f"{rid}-{i}" for i in range(len(prompts))]
    done: set[str] = set()

    async def one(i: int) -> RequestOutput:
        tracker = _Tracker(state, model, start)
        final = None
        async for out in engine.generate(prompts[i], params[i], ids[i], lora):
            tracker.on_output(out)
            final = out
        done.add(ids[i])
        if final is None:
            raise OpenAIError("the engine returned no output for the request", 500, code="engine_error")
        tracker.on_finished(final)
        return final

    tasks = [asyncio.ensure_future(one(i)) for i in range(len(prompts))]
    try:
        return list(await asyncio.gather(*tasks))
    except OpenAIError:
        raise
    except Exception as e:
        raise _engine_error(e) from e
    finally:
        _cancel_and_abort(engine, tasks, ids, done)


def _cancel_and_abort(engine: EngineClient, tasks: list[asyncio.Task], ids: list[str], done: set[str]) -> None:
    """Leaving a request early (error, disconnect, client gone): stop its tasks, free its KV blocks."""
    for t in tasks:
        t.cancel()
    for r in ids:
        if r not in done:
            _abort(engine, r)


async def _unless_disconnected(request: Request, work: Awaitable[Any], poll_s: float = 0.1) -> Any:
    """Await `work`, cancelling it (which aborts its sequences) if the client goes away first."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(poll_s)

    watcher = asyncio.ensure_future(watch())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        logger.info("client went away; request aborted")
        raise ClientGone()
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()


def _engine_error(e: BaseException) -> OpenAIError:
    """What the engine raised for one request, as the client should see it."""
    if isinstance(e, OpenAIError):
        return e
    if type(e).__name__ == "EngineDeadError":
        return OpenAIError(f"the engine is not running: {e}", 503, code="engine_dead")
    if isinstance(e, ValueError):  # the engine refused the request (e.g. it can never fit the KV cache)
        return OpenAIError(f"the engine refused the request: {e}", 400, code="invalid_request")
    logger.error("request failed in the engine: %s: %s", type(e).__name__, e)
    return OpenAIError(f"generation failed ({type(e).__name__}); the server log has the details", 500,
                       code="engine_error")


def _abort(engine: EngineClient, request_id: str) -> None:
    try:
        asyncio.ensure_future(engine.abort(request_id))
    except Exception:  # aborting an already finished request is not an error
        logger.debug("abort of %s failed", request_id, exc_info=True)


async def _merged(state: ServerState, engine: EngineClient, rid: str, prompts: list[list[int]],
                  params: list[SamplingParams], lora: str | None,
                  model: str) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(choice index, RequestOutput) from all sequences as they come; aborts leftovers on exit."""
    start = time.perf_counter()
    ids = [f"{rid}-{i}" for i in range(len(prompts))]
    if len(prompts) == 1:  # the common n=1 case: read the engine's stream directly, no queue/task hop
        tracker = _Tracker(state, model, start)
        final = None
        try:
            async for out in engine.generate(prompts[0], params[0], ids[0], lora):
                tracker.on_output(out)
                final = out
                yield 0, out
            ids.clear()  # finished: nothing to abort
            if final is not None:
                tracker.on_finished(final)
        finally:
            for r in ids:
                _abort(engine, r)
        return
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
    done: set[str] = set()
    _END = object()

    async def pump(i: int) -> None:
        tracker = _Tracker(state, model, start)
        try:
            final = None
            async for out in engine.generate(prompts[i], params[i], ids[i], lora):
                tracker.on_output(out)
                final = out
                await queue.put((i, out))
            done.add(ids[i])
            if final is not None:
                tracker.on_finished(final)
        except BaseException as e:  # surfaced to the consumer
            await queue.put((i, e))
            raise
        finally:
            await queue.put((i, _END))

    tasks = [asyncio.ensure_future(pump(i)) for i in range(len(prompts))]
    remaining = len(tasks)
    try:
        while remaining:
            i, item = await queue.get()
            if item is _END:
                remaining -= 1
                continue
            if isinstance(item, BaseException):
                raise item
            yield i, item
    finally:
        _cancel_and_abort(engine, tasks, ids, done)


def _sse(gen: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(gen, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _data(obj: Any) -> str:
    payload = obj.model_dump_json(exclude_none=True) if hasattr(obj, "model_dump_json") else json.dumps(obj)
    return f"data: {payload}\n\n"


def _dumps(obj: Any) -> str:
    """Compact JSON with raw UTF-8: byte-identical to pydantic's `model_dump_json` for dicts
    of str and int (pydantic-core escapes strings the same way)."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


class _Chunks:
    """The SSE events of one stream. The constant head (`id`, `object`, `created`, `model`) is
    encoded once; plain choices (no logprobs) are small dicts through `json.dumps`, which
    costs a fraction of building and dumping the pydantic models per token. Chunks with
    logprobs or usage still go through the models (`full`)."""

    def __init__(self, model_cls: Any, rid: str, created: int, model: str) -> None:
        self._cls, self._rid, self._created, self._model = model_cls, rid, created, model
        head = _dumps({"id": rid, "object": model_cls.model_fields["object"].default, "created": created,
                       "model": model})
        self._head = f"data: {head[:-1]},\"choices\":["

    def choice(self, choice: dict[str, Any]) -> str:
        """One chunk holding one choice; keys in the model's field order, no None values."""
        return f"{self._head}{_dumps(choice)}]}}\n\n"

    def full(self, choices: list[Any], usage: UsageInfo | None = None) -> str:
        return _data(self._cls(id=self._rid, created=self._created, model=self._model, choices=choices, usage=usage))


def _stream_error(e: Exception) -> str:
    """An error that happens after the 200 went out travels as one SSE event (as vLLM does)."""
    return f"data: {json.dumps(_engine_error(e).body())}\n\n"


async def _chat_stream(state: ServerState, engine: EngineClient, body: ChatCompletionRequest, rid: str,
                       prompt_ids: list[int], params: list[SamplingParams], lora: str | None) -> AsyncIterator[str]:
    n = len(params)
    tok = engine.tokenizer
    chunks = _Chunks(ChatCompletionChunk, rid, now(), body.model)

    for i in range(n):
        yield chunks.choice({"index": i, "delta": {"role": "assistant", "content": ""}})
    completion = [0] * n
    try:
        async for i, out in _merged(state, engine, rid, [prompt_ids] * n, params, lora, body.model):
            completion[i] = len(out.token_ids)
            delta = out.delta_text or ""
            events = ""
            if params[i].logprobs is not None and out.delta_token_ids and out.logprobs:
                lp = _chat_logprobs(tok, list(out.logprobs)[-len(out.delta_token_ids):])
                events = chunks.full([ChatCompletionStreamChoice(index=i, delta=DeltaMessage(content=delta), logprobs=lp)])
            elif delta:
                events = chunks.choice({"index": i, "delta": {"content": delta}})
            if out.finished:  # the last text and the finish event leave in one write (same bytes)
                reason = _finish(out)
                events += chunks.choice({"index": i, "delta": {}} if reason is None else
                                        {"index": i, "delta": {}, "finish_reason": reason})
            if events:
                yield events
    except asyncio.CancelledError:
        raise
    except Exception as e:
        yield _stream_error(e)
    if body.include_usage:
        total = sum(completion)
        yield chunks.full([], UsageInfo(prompt_tokens=len(prompt_ids), completion_tokens=total,
                                        total_tokens=len(prompt_ids) + total))
    yield "data: [DONE]\n\n"


async def _completion_stream(state: ServerState, engine: EngineClient, body: CompletionRequest, rid: str,
                             prompts: list[list[int]], params: list[SamplingParams], lora: str | None,
                             echo_texts: list[str]) -> AsyncIterator[str]:
    tok = engine.tokenizer
    completion = [0] * len(prompts)
    echoed = [False] * len(prompts)
    chunks = _Chunks(CompletionStreamResponse, rid, now(), body.model)

    try:
        async for i, out in _merged(state, engine, rid, prompts, params, lora, body.model):
            completion[i] = len(out.token_ids)
            text = out.delta_text or ""
            if not echoed[i]:
                text, echoed[i] = echo_texts[i] + text, True
            reason = _finish(out) if out.finished else None
            if params[i].logprobs is not None and out.delta_token_ids and out.logprobs:
                lp = _completion_logprobs(tok, list(out.logprobs)[-len(out.delta_token_ids):])
                yield chunks.full([CompletionChoice(index=i, text=text, logprobs=lp, finish_reason=reason)])
            elif text or out.finished:
                yield chunks.choice({"index": i, "text": text} if reason is None else
                                    {"index": i, "text": text, "finish_reason": reason})
    except asyncio.CancelledError:
        raise
    except Exception as e:
        yield _stream_error(e)
    if body.include_usage:
        p = _unique_prompt_tokens(prompts, body.n)
        total = sum(completion)
        yield chunks.full([], UsageInfo(prompt_tokens=p, completion_tokens=total, total_tokens=p + total))
    yield "data: [DONE]\n\n"


def _unique_prompt_tokens(prompts: list[list[int]], n: int) -> int:
    """Prompt tokens counted once per prompt (not once per each of its n choices)."""
    return sum(len(prompts[j]) for j in range(0, len(prompts), n))


# ------------------------------------------------------------------ logprobs


def _lp_fields(lp: Any) -> tuple[int, float, list[tuple[int, float]]]:
    """(token id, logprob, [(alt id, alt logprob)...]) from the engine's `TokenLogprob` or a dict."""
    if isinstance(lp, dict):
        return int(lp["token_id"]), float(lp["logprob"]), [tuple(x) for x in lp.get("top", [])]  # type: ignore[misc]
    return int(lp.token_id), float(lp.logprob), [(int(a), float(b)) for a, b in (lp.top or [])]


def _tok_str(tok: Any, token_id: int) -> str:
    return tok.decode([token_id], skip_special_tokens=False)


def _chat_token_entry(tok: Any, lp: Any) -> dict[str, Any]:
    """One token of chat log-probs (`ChatTokenLogprob`'s fields, in its order)."""
    tid, value, top = _lp_fields(lp)
    s = _tok_str(tok, tid)
    alts = []
    for a, b in top:
        alt = _tok_str(tok, a)
        alts.append({"token": alt, "logprob": b, "bytes": list(alt.encode())})
    return {"token": s, "logprob": value, "bytes": list(s.encode()), "top_logprobs": alts}


def _chat_logprobs(tok: Any, logprobs: Any) -> ChatChoiceLogprobs | None:
    """Log-probs of a few streamed tokens, as the chunk's model."""
    if logprobs is None:
        return None
    return ChatChoiceLogprobs(content=[ChatTokenLogprob(**_chat_token_entry(tok, lp)) for lp in logprobs])


def _chat_logprobs_json(tok: Any, logprobs: Any) -> str | None:
    """Log-probs of a whole answer as JSON text, token by token (see `_json_answer` for why)."""
    if logprobs is None:
        return None
    return '{"content":[' + ",".join(_render(_chat_token_entry(tok, lp)) for lp in logprobs) + "]}"


def _completion_columns(tok: Any, logprobs: Any) -> dict[str, list[Any]]:
    """The legacy completions log-probs (`CompletionLogprobs`'s fields, in its order)."""
    cols: dict[str, list[Any]] = {"text_offset": [], "token_logprobs": [], "tokens": [], "top_logprobs": []}
    offset = 0
    for lp in logprobs:
        tid, value, top = _lp_fields(lp)
        s = _tok_str(tok, tid)
        cols["tokens"].append(s)
        cols["token_logprobs"].append(value)
        cols["text_offset"].append(offset)
        offset += len(s)
        cols["top_logprobs"].append({_tok_str(tok, a): b for a, b in top} or None)
    return cols


def _completion_logprobs(tok: Any, logprobs: Any) -> CompletionLogprobs | None:
    return None if logprobs is None else CompletionLogprobs(**_completion_columns(tok, logprobs))


def _completion_logprobs_json(tok: Any, logprobs: Any) -> str | None:
    return None if logprobs is None else _render(_completion_columns(tok, logprobs))
