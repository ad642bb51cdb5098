"""`hubdeploy serve MODEL`: the OpenAI-compatible endpoint for one model (+ LoRA adapters).

The HTTP server starts first and answers `/health` with 503 while the model downloads and
loads, so a deploy service can poll it. The engine runs in its own process (the HTTP side's
per-token Python never takes turns with the engine's under one GIL); `--single-process`
runs it in a thread of this one instead. Phases go to stdout as
`phase: downloading|loading|warming_up|ready|failed` lines for people reading the log; the
deploy service reads them from `/health` (its `phases` list), which no request can write into.
fastapi/uvicorn are imported here, lazily: `serving` itself must import without them.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hubdeploy.serving.config import EngineArgs, add_engine_flags

if TYPE_CHECKING:
    from hubdeploy.serving.engine_client import EngineClient

log = logging.getLogger("hubdeploy.serve")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a model (Hub repo id or local dir) as an OpenAI-compatible endpoint",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL", help="Hub repo id (org/name) or a local directory in Hub layout")
    p.add_argument("--lora", action="append", default=[], metavar="NAME=REPO_OR_PATH",
                   help="serve a LoRA adapter under NAME (repeatable)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1 routes (default: $HUBDEPLOY_API_KEY)")
    p.add_argument("--served-model-name", default=None, help="the `model` name clients send (default: MODEL)")
    p.add_argument("--disable-lora-admin", action="store_true",
                   help="refuse /v1/load_lora_adapter and /v1/unload_lora_adapter")
    p.add_argument("--lora-admin-key", default=None,
                   help="a key that may also load/unload adapters (default: $HUBDEPLOY_LORA_ADMIN_KEY); adapter "
                        "admin always needs --api-key or this key, so a public endpoint without it has none")
    p.add_argument("--lora-root", action="append", default=[], metavar="DIR",
                   help="a directory run-time adapter loads may read from (repeatable; also "
                        "$HUBDEPLOY_LORA_ROOTS, ':'-separated); without any, only Hub ids load at run time")
    from hubdeploy.serving.server.request_limits import RequestLimits

    d = RequestLimits()
    p.add_argument("--max-request-bytes", type=int, default=d.max_body_bytes,
                   help="largest request body accepted; larger ones get 413 before they are read")
    p.add_argument("--max-sequences-per-request", type=int, default=d.max_sequences,
                   help="most prompts x n one request may ask for (400 above)")
    p.add_argument("--max-tokens-per-request", type=int, default=d.max_tokens,
                   help="most prompt + generated tokens, summed over its sequences, one request may ask for "
                        "(at least one full context)")
    p.add_argument("--max-logprobs-per-request", type=int, default=d.max_logprob_entries,
                   help="most log-prob entries (generated tokens x (1 + top log-probs)) one answer may carry")
    p.add_argument("--max-concurrent-requests-per-key", type=int, default=d.max_concurrent_per_key,
                   help="generation requests in flight at once per API key (per client address when public); "
                        "429 above")
    p.add_argument("--single-process", action="store_true",
                   help="run the engine in a thread of the server process (default: in its own process)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    add_engine_flags(p)  # one flag per EngineArgs knob
    p.set_defaults(func=run)


def parse_loras(items: list[str]) -> dict[str, str]:
    """`["a=org/x", "b=/p"]` -> `{"a": "org/x", "b": "/p"}`; SystemExit with the fix on a bad item."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, src = item.partition("=")
        if not sep or not name.strip() or not src.strip():
            raise SystemExit(f"--lora {item!r}: expected NAME=REPO_OR_PATH, e.g. --lora sql=org/sql-lora")
        if name in out:
            raise SystemExit(f"--lora: adapter name {name!r} given twice")
        out[name.strip()] = src.strip()
    return out


def phase(name: str, detail: str = "") -> None:
    """One machine-readable phase line on stdout (flushed at once)."""
    print(f"phase: {name}" + (f" {detail}" if detail else ""), flush=True)


async def _warm_up(engine: EngineClient, prefill_tokens: int = 2048, batch: int = 32) -> None:
    """Requests through the whole path before the endpoint says ready, so the first clients do not
    pay for first-time work: one short request, then at once `prefill_tokens` of distinct prompts
    (a full-budget prefill step: the allocator's large blocks, the CPU thread pool) and `batch`
    short ones (a decode batch of that size). vLLM warms up with a full-budget dummy step too."""
    from hubdeploy.serving.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)

    async def one(rid: str, ids: list[int]) -> None:
        async for _ in engine.generate(ids, params, rid):
            pass

    hello = engine.tokenizer.encode("Hello") or [0]
    await one("warmup-0", hello)
    vocab = engine.model_config.vocab_size
    n = max(1, min(prefill_tokens, engine.max_model_len - params.max_tokens - 1))
    long = [[(31 * i + j) % vocab for j in range(n)] for i in range(-(-prefill_tokens // n))]  # distinct: no cache hits
    await asyncio.gather(*(one(f"warmup-long-{i}", ids) for i, ids in enumerate(long)),
                         *(one(f"warmup-{i}", hello) for i in range(1, batch + 1)))


def _start_engine(app: Any, args: argparse.Namespace, engine_args: EngineArgs, server: Any) -> EngineClient:
    """The engine in a child process (default) or a thread (the same `EngineClient` either way);
    stored on the app for shutdown."""
    if args.single_process:
        from hubdeploy.serving.async_engine import AsyncEngine

        app.state.engine = AsyncEngine(engine_args)
        return app.state.engine
    from hubdeploy.serving.engine_process import EngineProcess

    def on_exit(reason: str) -> None:  # the engine died while serving: fail loudly, let the supervisor restart
        from hubdeploy.serving.server.api_server import set_phase

        set_phase(app, "failed", failure=reason)
        phase("failed", reason)
        app.state.exit_code = 1
        server.should_exit = True

    engine = EngineProcess(engine_args, load_in_background=True, log_level=args.log_level, on_exit=on_exit)
    app.state.engine = engine  # set before waiting: a shutdown while loading stops the child too
    engine.wait_ready()
    if engine.load_error is not None:
        raise engine.load_error
    return engine


def _load(app: Any, args: argparse.Namespace, loras: dict[str, str], server: Any) -> None:
    """Background thread: download, load, warm up, then attach the engine to the app."""
    from hubdeploy.serving.hub import resolve_model_dir
    from hubdeploy.serving.server.api_server import attach_engine, set_phase

    try:
        set_phase(app, "downloading")
        phase("downloading", args.model)
        model_dir = resolve_model_dir(args.model, args.revision)  # HF_TOKEN for gated repos
        set_phase(app, "loading")
        phase("loading", str(model_dir))
        from hubdeploy.serving.chat_template import load_chat_template

        t0 = time.perf_counter()
        engine_args = EngineArgs.from_flags(args, model=str(model_dir), revision=None,
                                            token=os.environ.get("HF_TOKEN"), lora_modules=loras or None)
        engine = _start_engine(app, args, engine_args, server)
        lora_sources = engine.lora_sources
        if loras and lora_sources is None:
            raise RuntimeError(f"--lora was given ({', '.join(loras)}) but this engine build loaded no LoRA "
                               "manager, so adapter requests would silently run the base model; "
                               "serve without --lora or use a build with serving.lora")
        if lora_sources is not None:  # LoRA seam: the engine's manager serves the adapter admin routes
            from hubdeploy.serving.lora.server import lora_hooks
            from hubdeploy.serving.server.api_server import set_lora_hooks

            set_lora_hooks(app, *lora_hooks(engine), adapters=lora_sources)
        set_phase(app, "warming_up")
        phase("warming_up", f"loaded in {time.perf_counter() - t0:.1f}s")
        asyncio.run(_warm_up(engine))
        attach_engine(app, engine, chat_template=load_chat_template(model_dir),
                      special_tokens=dict(engine.tokenizer.special_tokens),
                      max_model_len=engine.max_model_len)
        from hubdeploy.serving.heap import freeze_heap

        freeze_heap()  # a full collection over this heap would stall every stream (serving.heap)
        phase("ready", f"http://{args.host}:{args.port}/v1 model={app.state.server.served_model_name}")
    except BaseException as e:  # noqa: BLE001 - every failure is reported, then the process exits
        log.exception("loading %s failed", args.model)
        from hubdeploy.serving.outputs import EngineDeadError

        # the engine process already named the failure ("ValueError: ..."): keep its words
        reason = str(e) if isinstance(e, EngineDeadError) else f"{type(e).__name__}: {e}"
        set_phase(app, "failed", failure=reason)
        phase("failed", reason.replace("\n", " "))
        server.should_exit = True
        app.state.exit_code = 1


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from hubdeploy.serving.server.adapter_policy import LORA_ROOTS_ENV, roots_from_env
        from hubdeploy.serving.server.api_server import build_app
        from hubdeploy.serving.server.request_limits import RequestLimits
    except ImportError as e:
        raise SystemExit(f"hubdeploy serve needs fastapi and uvicorn ({e}); pip install fastapi uvicorn") from e

    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    loras = parse_loras(args.lora)
    api_key = args.api_key or os.environ.get("HUBDEPLOY_API_KEY") or None
    name = args.served_model_name or args.model
    limits = RequestLimits(max_body_bytes=args.max_request_bytes, max_sequences=args.max_sequences_per_request,
                           max_tokens=args.max_tokens_per_request, max_logprob_entries=args.max_logprobs_per_request,
                           max_concurrent_per_key=args.max_concurrent_requests_per_key)
    lora_roots = [*map(Path, args.lora_root), *roots_from_env(os.environ.get(LORA_ROOTS_ENV))]
    app = build_app(None, served_model_name=name, api_key=api_key, adapters=loras,
                    disable_lora_admin=args.disable_lora_admin, limits=limits,
                    lora_admin_key=args.lora_admin_key or os.environ.get("HUBDEPLOY_LORA_ADMIN_KEY"),
                    lora_roots=lora_roots)
    app.state.exit_code = 0
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            access_log=False, timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    loader = threading.Thread(target=_load, args=(app, args, loras, server), name="model-loader", daemon=True)
    loader.start()
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C / SIGINT it handled: a clean stop
        pass
    finally:
        engine = getattr(app.state, "engine", None)
        if engine is not None:
            engine.shutdown()
    if app.state.exit_code == 0 and not server.started:
        return 1  # e.g. the port was taken; uvicorn has said why
    return int(app.state.exit_code)
