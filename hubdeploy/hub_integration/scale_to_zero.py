"""Scale-to-zero: idle endpoints give their device back; the next request wakes them.

`DeploymentSpec.scale_to_zero_after_s` (0 = never): after that long with no request through the
gateway, the reaper stops the endpoint (device freed) and marks it `scaled_to_zero`. Unlike
`paused`, a request starts it again: without `X-Scale-Up-Timeout` it gets 503 + `Retry-After`
(`code: endpoint_scaled_to_zero`); with it, the gateway holds the request until the endpoint is
ready. Many requests arriving together start it once: the start runs under the endpoint's lock
and only from `scaled_to_zero`.

Activity is what the gateway sees (`in_use`); an endpoint with a request in flight is never reaped.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator

import anyio

from hubdeploy.hub_integration.gateway import GatewayError
from hubdeploy.hub_integration.provisioner.base import Provisioner
from hubdeploy.hub_integration.spec import DeploymentSpec
from hubdeploy.hub_integration.store import EndpointRecord, SlotUnavailable, Store

SCALED_TO_ZERO = "scaled_to_zero"
DEFAULT_RETRY_AFTER_S = 10
_POLL_S = 0.1

logger = logging.getLogger("hubdeploy.scale_to_zero")


class ScaleToZero:
    """The idle reaper (a thread) and the waker (called by the gateway).

    `start(name, spec)` starts a stopped endpoint the way the service does (its internal key;
    raises `SlotUnavailable` when no device is free).
    """

    def __init__(self, store: Store, prov: Provisioner, start: Callable[[str, DeploymentSpec], None], *,
                 interval_s: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.store, self.prov, self.start = store, prov, start
        self.interval_s, self.clock = interval_s, clock
        self._mu = threading.Lock()  # guards the counters below
        self._inflight: dict[str, int] = {}
        self._last: dict[str, float] = {}  # last request seen, per running endpoint
        self._stopping: set[str] = set()
        self._waking: dict[str, float] = {}  # name -> when the wake began
        self._wake_s: dict[str, float] = {}  # name -> how long its last wake took
        self._name_locks: dict[str, threading.Lock] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- activity (the gateway) -------------------------------------------------------
    @contextmanager
    def in_use(self, name: str) -> Iterator[None]:
        """Around each gateway request: the endpoint is busy (never reaped) and active now."""
        with self._mu:
            self._inflight[name] = self._inflight.get(name, 0) + 1
            self._last[name] = self.clock()
        try:
            yield
        finally:
            with self._mu:
                self._inflight[name] -= 1
                self._last[name] = self.clock()

    async def ready_record(self, name: str, wait_s: float | None, rec: EndpointRecord | None = None) -> EndpointRecord:
        """The endpoint's record once it is running; wakes a scaled-to-zero one.

        `wait_s` None: answer at once (503 + Retry-After while it starts); else wait up to
        `wait_s` seconds for it to become ready. `rec`: the record just read, if any.
        """
        deadline = self.clock() + (wait_s or 0.0)
        while True:
            if rec is None:
                rec = await anyio.to_thread.run_sync(self.store.get_endpoint, name)
            if rec is None or rec.status == "deleted":
                raise GatewayError(f"endpoint {name!r} was deleted", 404, "endpoint_not_found")
            if rec.status == "running" and rec.url and name not in self._stopping:
                return rec
            if rec.status == SCALED_TO_ZERO or name in self._stopping:
                await anyio.to_thread.run_sync(self.wake, name)
            elif rec.status == "paused":
                raise GatewayError(f"endpoint {name!r} is paused: resume it (POST /api/endpoints/{name}/resume "
                                   "or the page) to serve requests", 503, "endpoint_paused")
            elif rec.status == "failed" and not self._restarts(rec):
                first = (rec.reason or "").splitlines()[0] if rec.reason else "see its logs"
                raise GatewayError(f"endpoint {name!r} failed: {first}", 503, "endpoint_failed")
            if wait_s is None or self.clock() >= deadline:
                raise self._not_ready(name, rec.status, waited=wait_s is not None)
            rec = None
            await anyio.sleep(_POLL_S)

    def _restarts(self, rec: EndpointRecord) -> bool:
        """A failed endpoint the provisioner will restart by itself (`restart_on_failure`)."""
        return bool(rec.spec.get("restart_on_failure")) and rec.desired == "running"

    def _not_ready(self, name: str, status: str, waited: bool) -> GatewayError:
        retry = str(max(1, math.ceil(self._wake_s.get(name, DEFAULT_RETRY_AFTER_S))))
        how = ("it did not become ready within X-Scale-Up-Timeout" if waited else
               "retry after Retry-After seconds, or send 'X-Scale-Up-Timeout: <seconds>' to wait for it")
        if name in self._waking:
            return GatewayError(f"endpoint {name!r} was scaled to zero and is starting; {how}", 503,
                                "endpoint_scaled_to_zero", {"Retry-After": retry})
        return GatewayError(f"endpoint {name!r} is {status}, not ready yet; {how}", 503, f"endpoint_{status}",
                            {"Retry-After": retry})

    def wake(self, name: str) -> None:
        """Start a scaled-to-zero endpoint, once however many requests ask at the same time."""
        with self._name_lock(name):
            rec = self.store.get_endpoint(name)
            if rec is None or rec.status != SCALED_TO_ZERO:
                return
            with self._mu:
                self._waking[name] = self.clock()
                self._last[name] = self.clock()
            self.store.add_event(name, "wake", "a request arrived: starting again")
            try:
                self.start(name, DeploymentSpec.model_validate(rec.spec))
            except SlotUnavailable as e:
                with self._mu:
                    self._waking.pop(name, None)
                self.store.update_endpoint(name, status=SCALED_TO_ZERO, desired="paused", reason=str(e))
                raise GatewayError(f"endpoint {name!r} is scaled to zero and cannot start now: {e}", 503,
                                   "endpoint_scaled_to_zero", {"Retry-After": str(DEFAULT_RETRY_AFTER_S)}) from None

    # --- the reaper -------------------------------------------------------------------
    def begin(self) -> None:
        """Start the reaper thread (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="scale-to-zero", daemon=True)
            self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.reap_once()
            except Exception:  # noqa: BLE001 - a bad round must not end the reaper
                logger.exception("scale-to-zero round failed")

    def reap_once(self) -> list[str]:
        """One round: scale down every running endpoint idle past its `scale_to_zero_after_s`."""
        now = self.clock()
        done = []
        for rec in self.store.list_endpoints():
            if rec.status != "running":
                with self._mu:
                    if rec.name not in self._waking:
                        self._last.pop(rec.name, None)
                continue
            with self._mu:
                started = self._waking.pop(rec.name, None)
                if started is not None:
                    self._wake_s[rec.name] = now - started
                last = self._last.setdefault(rec.name, now)
            after = float(rec.spec.get("scale_to_zero_after_s") or 0)
            if after > 0 and now - last >= after and self.scale_down(rec.name, after):
                done.append(rec.name)
        return done

    def scale_down(self, name: str, after_s: float) -> bool:
        """Stop an idle endpoint and mark it `scaled_to_zero`; False when a request came meanwhile."""
        with self._name_lock(name):
            with self._mu:
                if self._inflight.get(name, 0) or self.clock() - self._last.get(name, 0.0) < after_s:
                    return False
                self._stopping.add(name)
            try:
                rec = self.store.get_endpoint(name)
                if rec is None or rec.status != "running":
                    return False
                self.prov.stop(name)
                self.store.update_endpoint(name, status=SCALED_TO_ZERO, desired="paused",
                                           reason=f"no request for {after_s:g} s; the next request wakes it")
                self.store.add_event(name, "scale_to_zero", f"idle for {after_s:g} s: stopped, device freed")
            finally:
                with self._mu:
                    self._stopping.discard(name)
                    self._last.pop(name, None)
            return True

    def _name_lock(self, name: str) -> threading.Lock:
        with self._mu:
            return self._name_locks.setdefault(name, threading.Lock())

