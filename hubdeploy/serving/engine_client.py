"""`EngineClient`: what the server needs from an engine, and the one front that provides it.

The server and `hubdeploy serve` talk to the engine only through the `EngineClient`
protocol (as vLLM's API server does). `EngineFront` is its one implementation of the
request bookkeeping — per-request queues, `generate`, `abort`, readiness, stats, fanning a
step's outputs out to the callers' event loops — written once. Two transports subclass it
and differ only in how requests and outputs move: `AsyncEngine` (async_engine.py, the engine
in a thread, queues) and `EngineProcess` (engine_process.py, a child process, one pipe).
`apply_command` / `step_engine` are the engine side both transports run.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Iterable, Protocol

from hubdeploy.serving.config import ModelConfig
from hubdeploy.serving.outputs import EngineDeadError, RequestOutput, outputs_until_finished
from hubdeploy.serving.sampling_params import SamplingParams
from hubdeploy.serving.stats import EngineStats

if TYPE_CHECKING:
    from hubdeploy.serving.tokenizer import Tokenizer

log = logging.getLogger(__name__)

# ("add", request_id, prompt_ids, params, lora) | ("abort", request_id): what a front sends its engine
Command = tuple[Any, ...]
Fail = Callable[[str, BaseException], None]  # (request id, error): end that request's stream with it


class EngineClient(Protocol):
    """An engine as the server sees it, wherever the engine runs (thread or process)."""

    load_error: BaseException | None  # why loading failed (is_ready stays False)

    @property
    def is_ready(self) -> bool: ...
    def wait_ready(self, timeout: float | None = None) -> bool: ...
    @property
    def tokenizer(self) -> Tokenizer: ...
    @property
    def model_config(self) -> ModelConfig: ...
    @property
    def max_model_len(self) -> int: ...
    @property
    def lora_sources(self) -> dict[str, str] | None: ...
    def stats(self) -> EngineStats: ...
    def generate(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str,
                 lora: str | None = None) -> AsyncIterator[RequestOutput]: ...
    async def abort(self, request_id: str) -> None: ...
    async def load_lora(self, name: str, source: str) -> None: ...
    async def unload_lora(self, name: str) -> None: ...
    def shutdown(self, timeout: float = 10.0) -> None: ...


@dataclass(frozen=True)
class EngineInfo:
    """What the front needs from the loaded engine (once, when ready)."""

    model_dir: str
    model_config: ModelConfig
    max_model_len: int
    lora_sources: dict[str, str] | None  # None: the engine has no LoRA manager

    @classmethod
    def of(cls, engine: Any) -> EngineInfo:
        mgr = engine.lora_manager
        return cls(str(engine.model_dir), engine.model_config, engine.max_model_len,
                   dict(mgr.sources) if mgr is not None else None)


class RequestStream:
    """One request's consumer; a transport that sends deltas subclasses it to rebuild outputs."""

    __slots__ = ("loop", "queue")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop, self.queue = loop, asyncio.Queue()

    def output(self, payload: Any) -> RequestOutput:
        return payload


class EngineFront:
    """The request bookkeeping of an `EngineClient`; a transport implements `_submit` (send a
    `Command` to the engine), feeds `_deliver` / `_fail` / `_loaded` / `_mark_dead` from its
    engine side, and provides `load_lora`, `unload_lora` and `shutdown`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._streams: dict[str, RequestStream] = {}
        self._ready = threading.Event()
        self._stopping = False
        self._dead: str | None = None
        self.load_error: BaseException | None = None
        self.info: EngineInfo | None = None
        self._tokenizer: Any = None
        self._stats = EngineStats()

    def _submit(self, cmd: Command) -> None:
        raise NotImplementedError

    def _new_stream(self, loop: asyncio.AbstractEventLoop, prompt_ids: list[int], params: SamplingParams,
                    lora: str | None) -> RequestStream:
        return RequestStream(loop)

    # --- readiness and what the engine loaded ---------------------------------------------
    @property
    def is_ready(self) -> bool:
        return self._ready.is_set() and self.load_error is None and self._dead is None and not self._stopping

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until loaded (True) or failed/timed out (False)."""
        self._ready.wait(timeout)
        return self.is_ready

    def _info(self) -> EngineInfo:
        if self.info is None:
            raise EngineDeadError(f"the engine is not loaded: {self.load_error or 'still loading'}")
        return self.info

    @property
    def tokenizer(self) -> Tokenizer:
        self._info()
        return self._tokenizer

    @property
    def model_config(self) -> ModelConfig:
        return self._info().model_config

    @property
    def max_model_len(self) -> int:
        return self._info().max_model_len

    @property
    def lora_sources(self) -> dict[str, str] | None:
        """Adapters the engine started with (name -> source); None without a LoRA manager."""
        return self._info().lora_sources

    def stats(self) -> EngineStats:
        """The snapshot taken after the engine's latest step (safe from any thread)."""
        return self._stats

    # --- requests ------------------------------------------------------------------------
    async def generate(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str,
                       lora: str | None = None) -> AsyncIterator[RequestOutput]:
        """Stream this request's outputs; leaving the loop early aborts it."""
        if not self.is_ready:
            raise EngineDeadError(f"the engine is not ready: {self._dead or self.load_error or 'loading or shut down'}")
        ids = list(prompt_token_ids)
        stream = self._new_stream(asyncio.get_running_loop(), ids, params, lora)
        with self._lock:
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already in flight")
            self._streams[request_id] = stream
        finished = False  # else (client gone, cancelled, engine error) abort: harmless if already dropped
        try:
            self._submit(("add", request_id, ids, params, lora))
            async for item in outputs_until_finished(stream.queue):
                finished = item.finished
                yield item
        finally:
            with self._lock:
                self._streams.pop(request_id, None)
            if not finished and self._dead is None:
                try:
                    self._submit(("abort", request_id))
                except EngineDeadError:  # died meanwhile: nothing left to abort
                    pass

    async def abort(self, request_id: str) -> None:
        """Abort a request: its stream ends with finish_reason "abort" and its blocks are freed."""
        self._submit(("abort", request_id))

    # --- fed by the transport's engine side (any thread) ---------------------------------
    def _loaded(self, info: EngineInfo, tokenizer: Any) -> None:
        self._tokenizer, self.info = tokenizer, info
        self._ready.set()

    def _listening(self, request_id: str) -> bool:
        with self._lock:
            return request_id in self._streams

    def _deliver(self, items: Iterable[tuple[str, Any]]) -> None:
        """A step's (request id, output) pairs: one `call_soon_threadsafe` per event loop, not per output.

        Each thread-safe call writes the loop's self-pipe and wakes it; at batch 32 that was 32
        wake-ups per step, each taking the GIL from the engine side. Order per request is kept
        (the loop runs its callbacks in FIFO order).
        """
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput]]] = {}
        with self._lock:
            streams = self._streams
            for rid, payload in items:
                s = streams.get(rid)
                if s is not None:
                    by_loop.setdefault(s.loop, []).append((s.queue, s.output(payload)))
        for loop, batch in by_loop.items():
            call_soon(loop, _put_all, batch)

    def _fail(self, request_id: str, exc: BaseException) -> None:
        with self._lock:
            s = self._streams.get(request_id)
        if s is not None:
            call_soon(s.loop, s.queue.put_nowait, exc)

    def _mark_dead(self, reason: str) -> None:
        """The engine is gone for good: every in-flight stream ends with EngineDeadError."""
        if self._dead is not None:
            return
        self._dead = reason
        with self._lock:
            streams = list(self._streams.values())
        for s in streams:
            call_soon(s.loop, s.queue.put_nowait, EngineDeadError(reason))


def call_soon(loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any) -> None:
    """`loop.call_soon_threadsafe`, silent when that loop is closed (nobody listens any more)."""
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:
        pass


def _put_all(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for q, item in items:
        q.put_nowait(item)


# ============================================================== the engine side, for both transports


def apply_command(engine: Any, cmd: Command, fail: Fail) -> RequestOutput | None:
    """Apply an "add" (a bad request fails its own stream only) or an "abort" (its final output)."""
    if cmd[0] == "add":
        _, rid, ids, params, lora = cmd
        try:
            engine.add_request(rid, ids, params, lora_name=lora)
        except Exception as e:  # noqa: BLE001 - told to the caller, the engine keeps serving
            fail(rid, e)
        return None
    return engine.abort_request(cmd[1])


def step_engine(engine: Any, fail: Fail) -> list[RequestOutput]:
    """One step when there is work; a failed step fails its requests, not the engine."""
    if not engine.has_unfinished():
        return []
    try:
        return engine.step()
    except Exception as e:  # noqa: BLE001
        log.exception("engine step failed")
        for rid in list(engine.seqs):
            engine.abort_request(rid)
            fail(rid, RuntimeError(f"engine step failed: {e}"))
        return []


def lora_manager(engine: Any) -> Any:
    """The engine's `LoRAManager`; RuntimeError when it was started without one."""
    if engine.lora_manager is None:
        raise RuntimeError("this engine has no LoRA manager (started with max_loras=0)")
    return engine.lora_manager
