"""`EngineProcess`: the `EngineClient` transport that runs the engine in a child process.

Why a process and not only a thread (`AsyncEngine`): the server's per-token work (HTTP
framing, SSE chunks, asyncio) is Python, and in one process it takes turns with the
engine's Python under the GIL. At 32 streams on a CPU that was ~3 ms of every ~9 ms step.
In its own process the engine steps while the front end streams, on another core (vLLM
splits its API server from its engine core for the same reason).

The wire is one `multiprocessing` pipe, pickled tuples, one message per step:

    front -> engine   ("add", rid, prompt_ids, params, lora) · ("abort", rid)
                      ("lora_load", call_id, name, source) · ("lora_unload", call_id, name)
                      ("shutdown",)
    engine -> front   ("ready", EngineInfo) · ("failed", reason)
                      ("step", [StepDelta, ...], EngineStats) · ("error", rid, kind, message)
                      ("reply", call_id, None | (kind, message))

Outputs cross the pipe as deltas (new tokens, new text, new logprobs): the front keeps each
stream's cumulative `RequestOutput` itself (`_DeltaStream`), so a step's message does not
grow with the length of the sequences. The request bookkeeping is `EngineFront`'s.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing as mp
import signal
import threading
from pathlib import Path
from typing import Any, Callable

from hubdeploy.serving.engine_client import (
    Command, EngineFront, EngineInfo, RequestStream, apply_command, call_soon, lora_manager, step_engine,
)
from hubdeploy.serving.outputs import EngineDeadError, RequestMetrics, RequestOutput
from hubdeploy.serving.sampling_params import SamplingParams

log = logging.getLogger(__name__)

# (request id, new token ids, new text, new logprobs | None, finish reason, finished,
#  full text when finished else None, metrics tuple when finished else None)
StepDelta = tuple[str, list[int], str, "list | None", "str | None", bool, "str | None", "tuple | None"]


# ============================================================== the engine side (child)


def _delta(out: RequestOutput) -> StepDelta:
    metrics = None
    if out.finished and out.metrics is not None:
        m = out.metrics
        metrics = (m.arrival_time, m.first_token_time, m.finished_time, m.num_prompt_tokens, m.num_cached_tokens,
                   m.num_preemptions)
    return (out.request_id, out.delta_token_ids, out.delta_text, out.delta_logprobs, out.finish_reason,
            out.finished, out.text if out.finished else None, metrics)


class _EngineLoop:
    """The child's loop: drain commands, step, send the step's deltas and stats."""

    IDLE_WAIT_S = 0.1

    def __init__(self, engine: Any, conn: Any) -> None:
        self.engine, self.conn = engine, conn
        self._send_lock = threading.Lock()  # LoRA loads reply from worker threads
        self._pending: list[StepDelta] = []  # abort outputs, sent with the next message

    def send(self, msg: tuple[Any, ...]) -> None:
        with self._send_lock:
            self.conn.send(msg)

    def fail(self, rid: str, e: BaseException) -> None:
        self.send(("error", rid, "ValueError" if isinstance(e, ValueError) else type(e).__name__, str(e)))

    def run(self) -> None:
        engine = self.engine
        while True:
            busy = engine.has_unfinished()
            try:
                if self.conn.poll(0 if busy else self.IDLE_WAIT_S):
                    while True:
                        if not self._handle(self.conn.recv()):
                            return
                        if not self.conn.poll(0):
                            break
            except (EOFError, OSError):  # the front end is gone: nothing left to serve
                return
            stepped = engine.has_unfinished()
            outputs = step_engine(engine, self.fail)
            if stepped or self._pending:
                deltas, self._pending = self._pending, []
                deltas += [_delta(o) for o in outputs]
                self.send(("step", deltas, engine.stats()))

    def _handle(self, msg: tuple[Any, ...]) -> bool:
        kind = msg[0]
        if kind in ("add", "abort"):
            out = apply_command(self.engine, msg, self.fail)
            if out is not None:
                self._pending.append(_delta(out))
        elif kind == "lora_load":
            threading.Thread(target=self._lora_call, args=(msg[1], "register", msg[2], msg[3]),
                             name="lora-load", daemon=True).start()  # reading may download: keep stepping
        elif kind == "lora_unload":
            self._lora_call(msg[1], "unregister", msg[2])
        elif kind == "shutdown":
            return False
        return True

    def _lora_call(self, call_id: int, method: str, *args: Any) -> None:
        """`LoRAManager.register|unregister(*args)`; the outcome goes back as ("reply", call_id, err)."""
        try:
            getattr(lora_manager(self.engine), method)(*args)
            err = None
        except KeyError as e:
            err = ("KeyError", e.args[0] if e.args else str(e))
        except ValueError as e:  # LoRAError is a ValueError
            err = ("LoRAError", str(e))
        except Exception as e:  # noqa: BLE001 - reported to the caller, the engine keeps serving
            log.exception("LoRA admin call failed")
            err = (type(e).__name__, str(e))
        self.send(("reply", call_id, err))


def _engine_main(conn: Any, args: Any, log_level: str) -> None:
    """The child process: load the engine, report, then serve the pipe until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the front end decides
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from hubdeploy.serving.engine import LLMEngine
    from hubdeploy.serving.heap import freeze_heap

    try:
        engine = LLMEngine(args)
    except BaseException as e:  # noqa: BLE001 - every load failure is reported to the front end
        log.exception("engine failed to load")
        conn.send(("failed", f"{type(e).__name__}: {e}"))
        return
    engine.delta_outputs_only = True  # only deltas cross the pipe: no O(length) copies per step
    freeze_heap()  # the loaded model and its imports stay out of every later collection
    conn.send(("ready", EngineInfo.of(engine)))
    _EngineLoop(engine, conn).run()


# ============================================================== the front end (this process)


class _DeltaStream(RequestStream):
    """One request's consumer and its cumulative output, rebuilt from deltas."""

    __slots__ = ("prompt_ids", "lora", "token_ids", "text", "logprobs")

    def __init__(self, loop: asyncio.AbstractEventLoop, prompt_ids: list[int], params: SamplingParams,
                 lora: str | None) -> None:
        super().__init__(loop)
        self.prompt_ids, self.lora = prompt_ids, lora
        self.token_ids: list[int] = []
        self.text = ""
        self.logprobs: list | None = [] if params.logprobs is not None else None

    def output(self, d: StepDelta) -> RequestOutput:
        rid, new_ids, new_text, new_lps, reason, finished, full_text, metrics = d
        self.token_ids += new_ids
        self.text = full_text if full_text is not None else self.text + new_text
        if self.logprobs is not None and new_lps:
            self.logprobs += new_lps
        return RequestOutput(
            request_id=rid, prompt_token_ids=self.prompt_ids, token_ids=list(self.token_ids), text=self.text,
            delta_text=new_text, delta_token_ids=list(new_ids),
            logprobs=list(self.logprobs) if self.logprobs is not None else None,
            finish_reason=reason, finished=finished, lora_name=self.lora,
            metrics=RequestMetrics(*metrics) if metrics is not None else None)


class EngineProcess(EngineFront):
    """An `EngineClient` over an engine in a child process (see the module docstring).

    The child loads `args` (a spawn, not a fork: CUDA and torch's threads do not survive a
    fork); `wait_ready` blocks until it reports. `on_exit(reason)` is called once if the
    child dies after it was ready (e.g. killed for memory), so a server can stop.
    """

    def __init__(self, args: Any, *, load_in_background: bool = False, log_level: str = "INFO",
                 on_exit: Callable[[str], None] | None = None) -> None:
        super().__init__()
        ctx = mp.get_context("spawn")
        self._conn, child_conn = ctx.Pipe(duplex=True)
        self._proc = ctx.Process(target=_engine_main, args=(child_conn, args, log_level), name="hubdeploy-engine",
                                 daemon=True)
        self._proc.start()
        child_conn.close()  # our copy: EOF on recv once the child is gone
        self._on_exit = on_exit
        self._send_lock = threading.Lock()
        self._calls: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}
        self._call_ids = itertools.count()
        self._reader = threading.Thread(target=self._read_loop, name="engine-pipe", daemon=True)
        self._reader.start()
        if not load_in_background:
            self._ready.wait()
            if self.load_error is not None:
                raise self.load_error

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    async def load_lora(self, name: str, source: str) -> None:
        """Register an adapter in the engine (LoRAError when it cannot be served)."""
        await self._call("lora_load", name, source)

    async def unload_lora(self, name: str) -> None:
        """Forget an adapter (KeyError if unknown, LoRAError while requests use it)."""
        await self._call("lora_unload", name)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the child; in-flight streams end with EngineDeadError."""
        self._stopping = True
        try:
            self._submit(("shutdown",))
        except EngineDeadError:
            pass
        self._proc.join(timeout)
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(5)
        self._mark_dead("the engine was shut down")
        self._conn.close()

    # --- the pipe ----------------------------------------------------------------------
    def _submit(self, msg: Command) -> None:
        try:
            with self._send_lock:
                self._conn.send(msg)
        except (OSError, ValueError, BrokenPipeError) as e:
            raise EngineDeadError(f"the engine process is gone: {self._dead or e}") from e

    def _new_stream(self, loop: asyncio.AbstractEventLoop, prompt_ids: list[int], params: SamplingParams,
                    lora: str | None) -> RequestStream:
        return _DeltaStream(loop, prompt_ids, params, lora)

    async def _call(self, kind: str, *args: Any) -> None:
        if not self.is_ready:
            raise EngineDeadError(f"the engine is not ready: {self._dead or self.load_error or 'loading'}")
        call_id = next(self._call_ids)
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        with self._lock:
            self._calls[call_id] = (loop, fut)
        self._submit((kind, call_id, *args))
        err = await fut
        if err is None:
            return
        etype, message = err
        if etype == "EngineDeadError":
            raise EngineDeadError(message)
        if etype == "KeyError":
            raise KeyError(message)
        if etype == "LoRAError":
            from hubdeploy.serving.lora.adapter import LoRAError

            raise LoRAError(message)
        raise RuntimeError(f"{etype}: {message}")

    def _read_loop(self) -> None:
        """Reader thread: one message per engine step, handed to each event loop in one call."""
        while True:
            try:
                msg = self._conn.recv()
            except (EOFError, OSError):
                break
            kind = msg[0]
            if kind == "step":
                self._stats = msg[2]  # first: a client that has its last token also sees it counted
                self._deliver((d[0], d) for d in msg[1])
            elif kind == "error":
                _, rid, etype, message = msg
                self._fail(rid, ValueError(message) if etype == "ValueError" else RuntimeError(message))
            elif kind == "reply":
                with self._lock:
                    loop, fut = self._calls.pop(msg[1], (None, None))
                if loop is not None:
                    call_soon(loop, _resolve, fut, msg[2])
            elif kind == "ready":
                self._on_ready(msg[1])
            elif kind == "failed":
                self.load_error = EngineDeadError(msg[1])
                self._ready.set()
        self._proc.join(1)
        code = self._proc.exitcode
        reason = "the engine was shut down" if self._stopping else \
            f"the engine process exited (exit code {code}); the server log has its last words"
        first_death = self._dead is None
        if not self._ready.is_set():  # died while loading, before it could say why
            self.load_error = EngineDeadError(reason)
            self._ready.set()
        self._mark_dead(reason)
        if first_death and not self._stopping and self.load_error is None and self._on_exit is not None:
            self._on_exit(reason)

    def _on_ready(self, info: EngineInfo) -> None:
        from hubdeploy.serving.tokenizer import load_tokenizer

        tokenizer = None
        try:
            tokenizer = load_tokenizer(Path(info.model_dir))
        except Exception as e:  # noqa: BLE001 - the engine loaded it; we could not: not servable
            self.load_error = EngineDeadError(f"the front end could not load the tokenizer: {e}")
        self._loaded(info, tokenizer)

    def _mark_dead(self, reason: str) -> None:
        with self._lock:
            calls = list(self._calls.values())
            self._calls.clear()
        for loop, fut in calls:
            call_soon(loop, _resolve, fut, ("EngineDeadError", reason))
        super()._mark_dead(reason)


def _resolve(fut: asyncio.Future, value: Any) -> None:
    if not fut.done():
        fut.set_result(value)
