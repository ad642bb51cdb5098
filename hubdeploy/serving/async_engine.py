"""`AsyncEngine`: the `EngineClient` transport that runs the engine's step loop in a thread.

The HTTP side never blocks the loop and the loop never blocks the HTTP side: requests and
aborts go in through a thread-safe queue, outputs come back through `EngineFront._deliver`
(one `call_soon_threadsafe` per event loop and step). Closing a `generate` stream early
(client disconnect, cancellation) aborts the request, which frees its KV blocks.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading

from hubdeploy.serving.engine import EngineArgs, LLMEngine
from hubdeploy.serving.engine_client import Command, EngineFront, EngineInfo, apply_command, lora_manager, step_engine
from hubdeploy.serving.outputs import EngineDeadError

__all__ = ["AsyncEngine", "EngineDeadError"]

log = logging.getLogger(__name__)


class AsyncEngine(EngineFront):
    """Run `LLMEngine` in a background thread.

    Give `args` to load the model (in the thread when `load_in_background`, so `/health`
    can answer 503 until `is_ready`), or an already built `engine`.
    """

    IDLE_WAIT_S = 0.1

    def __init__(self, args: EngineArgs | None = None, *, engine: LLMEngine | None = None,
                 load_in_background: bool = False) -> None:
        if (args is None) == (engine is None):
            raise ValueError("give exactly one of args (to load a model) or engine")
        super().__init__()
        self._args = args
        self._engine: LLMEngine | None = engine
        self._inbox: queue.Queue[Command] = queue.Queue()
        if self._engine is None and not load_in_background:
            self._engine = LLMEngine(args)  # errors surface here, in the caller's thread
        self._thread = threading.Thread(target=self._run, name="llm-engine", daemon=True)
        self._thread.start()
        if not load_in_background:
            self._ready.wait()

    @property
    def engine(self) -> LLMEngine:
        if self._engine is None:
            raise EngineDeadError(f"the engine is not loaded: {self.load_error or 'still loading'}")
        return self._engine

    async def load_lora(self, name: str, source: str) -> None:
        """Register an adapter (LoRAError when it cannot be served); read in a worker thread,
        since it may download, so the event loop and the engine keep serving."""
        await asyncio.to_thread(lora_manager(self.engine).register, name, source)

    async def unload_lora(self, name: str) -> None:
        """Forget an adapter (KeyError if unknown, LoRAError while requests use it)."""
        lora_manager(self.engine).unregister(name)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the loop thread; in-flight streams end with EngineDeadError."""
        self._stopping = True
        self._inbox.put(("wake",))
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)
        self._mark_dead("the engine was shut down")

    # --- the transport -------------------------------------------------------------------
    def _submit(self, cmd: Command) -> None:
        self._inbox.put(cmd)

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
        self._loaded(EngineInfo.of(engine), engine.tokenizer)
        while not self._stopping:
            wait = not engine.has_unfinished()  # idle: block for the first command, then drain
            while True:
                try:
                    cmd = self._inbox.get(wait, self.IDLE_WAIT_S)
                except queue.Empty:
                    break
                wait = False
                if cmd[0] == "abort" or (cmd[0] == "add" and self._listening(cmd[1])):  # else: aborted before it came
                    out = apply_command(engine, cmd, self._fail)
                    if out is not None:
                        self._deliver([(cmd[1], out)])
            if self._stopping:
                break
            outputs = step_engine(engine, self._fail)
            # snapshot first: a client that has its last token also sees it counted in stats()
            self._stats = engine.stats()
            self._deliver((o.request_id, o) for o in outputs)
