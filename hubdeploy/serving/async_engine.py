"""`AsyncEngine`: the engine's step loop in its own thread, talked to through queues.

The HTTP side never blocks the loop and the loop never blocks the HTTP side: requests and
aborts go in through a thread-safe queue, outputs come back to each request's asyncio
queue via `loop.call_soon_threadsafe`. Closing a `generate` stream early (client
disconnect, cancellation) aborts the request, which frees its KV blocks.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
from typing import Any, AsyncIterator

from hubdeploy.serving.engine import EngineArgs, LLMEngine
from hubdeploy.serving.outputs import EngineDeadError, RequestOutput, outputs_until_finished
from hubdeploy.serving.sampling_params import SamplingParams
from hubdeploy.serving.stats import EngineStats

log = logging.getLogger(__name__)


class AsyncEngine:
    """Run `LLMEngine` in a background thread.

    Give `args` to load the model (in the thread when `load_in_background`, so `/health`
    can answer 503 until `is_ready`), or an already built `engine`.
    """

    IDLE_WAIT_S = 0.1

    def __init__(self, args: EngineArgs | None = None, *, engine: LLMEngine | None = None,
                 load_in_background: bool = False) -> None:
        if (args is None) == (engine is None):
            raise ValueError("give exactly one of args (to load a model) or engine")
        self._args = args
        self._engine: LLMEngine | None = engine
        self.load_error: BaseException | None = None
        self._inbox: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._stats = EngineStats()
        if self._engine is None and not load_in_background:
            self._engine = LLMEngine(args)  # errors surface here, in the caller's thread
        self._thread = threading.Thread(target=self._run, name="llm-engine", daemon=True)
        self._thread.start()
        if not load_in_background:
            self._ready.wait()

    # --- properties ------------------------------------------------------------------
    @property
    def is_ready(self) -> bool:
        return self._ready.is_set() and self.load_error is None and not self._stop.is_set()

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until loaded (True) or failed/timed out (False)."""
        self._ready.wait(timeout)
        return self.is_ready

    @property
    def engine(self) -> LLMEngine:
        if self._engine is None:
            raise EngineDeadError(f"the engine is not loaded: {self.load_error or 'still loading'}")
        return self._engine

    @property
    def tokenizer(self):  # noqa: ANN201 - serving.tokenizer.Tokenizer
        return self.engine.tokenizer

    @property
    def model_config(self):  # noqa: ANN201 - serving.config.ModelConfig
        return self.engine.model_config

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def stats(self) -> EngineStats:
        """The snapshot taken after the engine's latest step (safe from any thread)."""
        return self._stats

    # --- requests --------------------------------------------------------------------
    async def generate(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str,
                       lora: str | None = None) -> AsyncIterator[RequestOutput]:
        """Stream this request's outputs; leaving the loop early aborts it."""
        if not self.is_ready:
            raise EngineDeadError(f"the engine is not ready: {self.load_error or 'loading or shut down'}")
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already in flight")
            self._streams[request_id] = (loop, q)
        self._inbox.put(("add", request_id, list(prompt_token_ids), params, lora))
        finished = False  # else (client gone, cancelled, engine error) abort: harmless if already dropped
        try:
            async for item in outputs_until_finished(q):
                finished = item.finished
                yield item
        finally:
            with self._lock:
                self._streams.pop(request_id, None)
            if not finished:
                self._inbox.put(("abort", request_id))

    async def abort(self, request_id: str) -> None:
        """Abort a request: its stream ends with finish_reason "abort" and its blocks are freed."""
        self._inbox.put(("abort", request_id))

    @property
    def lora_sources(self) -> dict[str, str] | None:
        """Adapters the engine serves (name -> source); None without a LoRA manager."""
        mgr = self.engine.lora_manager
        return dict(mgr.sources) if mgr is not None else None

    async def load_lora(self, name: str, source: str) -> None:
        """Register an adapter (LoRAError when it cannot be served); read in a worker thread,
        since it may download, so the event loop and the engine keep serving."""
        await asyncio.to_thread(self._lora_manager().register, name, source)

    async def unload_lora(self, name: str) -> None:
        """Forget an adapter (KeyError if unknown, LoRAError while requests use it)."""
        self._lora_manager().unregister(name)

    def _lora_manager(self) -> Any:
        mgr = self.engine.lora_manager
        if mgr is None:
            raise RuntimeError("this engine has no LoRA manager (started with max_loras=0)")
        return mgr

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the loop thread; in-flight streams end with EngineDeadError."""
        self._stop.set()
        self._inbox.put(("wake",))
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)
        self._fail_all(EngineDeadError("the engine was shut down"))

    # --- the loop thread -------------------------------------------------------------
    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        with self._lock:
            target = self._streams.get(request_id)
        if target is None:
            return
        loop, q = target
        try:
            loop.call_soon_threadsafe(q.put_nowait, item)
        except RuntimeError:  # the caller's event loop is closed: nobody listens any more
            pass

    def _deliver_step(self, outputs: list[RequestOutput]) -> None:
        """A step's outputs: one `call_soon_threadsafe` per event loop rather than one per output.

        Each thread-safe call writes the loop's self-pipe and wakes it; at batch 32 that was 32
        wake-ups per step, each taking the GIL from the engine thread. Order per request is kept
        (the loop runs its callbacks in FIFO order).
        """
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput]]] = {}
        with self._lock:
            streams = self._streams
            for out in outputs:
                target = streams.get(out.request_id)
                if target is not None:
                    by_loop.setdefault(target[0], []).append((target[1], out))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the caller's event loop is closed: nobody listens any more
                pass

    def _fail_all(self, exc: BaseException) -> None:
        with self._lock:
            ids = list(self._streams)
        for rid in ids:
            self._deliver(rid, exc)

    def _handle(self, cmd: tuple[Any, ...]) -> None:
        engine = self._engine
        assert engine is not None
        if cmd[0] == "add":
            _, rid, ids, params, lora = cmd
            with self._lock:
                listening = rid in self._streams
            if not listening:  # aborted before it arrived
                return
            try:
                engine.add_request(rid, ids, params, lora_name=lora)
            except Exception as e:  # bad request: tell the caller, keep serving
                self._deliver(rid, e)
        elif cmd[0] == "abort":
            out = engine.abort_request(cmd[1])
            if out is not None:
                self._deliver(cmd[1], out)

    def _run(self) -> None:
        if self._engine is None:
            try:
                self._engine = LLMEngine(self._args)  # type: ignore[arg-type]
            except BaseException as e:  # noqa: BLE001 - reported through load_error / is_ready
                log.exception("engine failed to load")
                self.load_error = e
                self._ready.set()
                return
        engine = self._engine
        self._stats = engine.stats()
        self._ready.set()
        while not self._stop.is_set():
            try:
                if engine.has_unfinished():
                    cmd = self._inbox.get_nowait()
                else:
                    cmd = self._inbox.get(timeout=self.IDLE_WAIT_S)
            except queue.Empty:
                cmd = None
            while cmd is not None:
                if cmd[0] != "wake":
                    self._handle(cmd)
                try:
                    cmd = self._inbox.get_nowait()
                except queue.Empty:
                    cmd = None
            if self._stop.is_set():
                break
            if engine.has_unfinished():
                try:
                    outputs = engine.step()
                except Exception as e:  # a failed step fails its requests, not the server
                    log.exception("engine step failed")
                    for rid in list(engine.seqs):
                        engine.abort_request(rid)
                        self._deliver(rid, RuntimeError(f"engine step failed: {e}"))
                    outputs = []
                # snapshot first: a client that has its last token also sees it counted in stats()
                self._stats = engine.stats()
                self._deliver_step(outputs)
            else:
                self._stats = engine.stats()


def _put_all(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for q, item in items:
        q.put_nowait(item)
