"""What an endpoint server says about itself, read from its `/health` JSON (every backend).

Phases and readiness come only from this structured answer, never from the server's log:
the log carries client-controlled text (request paths), so a request such as
`GET /x%0aphase:%20warming_up` could forge a log line, but nothing a request sends can
change what `/health` reports. `/health` lists every phase the server has passed through
(`phases`), so a poll that misses a short phase still records it, in order.

`Watchdog` judges a running server by its answers: dead after a few misses in a row (refused,
an error, not ready), but busy, not dead, while it accepts the connection and only answers
late, for up to `busy_grace` seconds (a loaded machine, a long request).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import httpx

SERVER_PHASES = ("downloading", "loading", "warming_up", "ready")
PROBE_TIMEOUT_S = 2.0  # the watchdog's patience with one `/health` call


@dataclass(frozen=True)
class ServerHealth:
    """One `/health` answer: `ready` (200, status ok), the phases so far, a load failure."""

    ready: bool
    phases: tuple[str, ...] = ()
    failure: str | None = None
    busy: bool = False  # connected, but no answer within the timeout: alive and slow


def parse_health(status_code: int, body: Any) -> ServerHealth:
    """The `/health` answer as the provisioners use it; unknown phase names are dropped."""
    if not isinstance(body, dict):
        return ServerHealth(ready=False)
    listed = body.get("phases")
    names = [*listed] if isinstance(listed, list) else []
    names.append(body.get("phase"))
    phases = tuple(p for p in SERVER_PHASES if p in names)
    ready = status_code == 200 and body.get("status") == "ok"
    failure = body.get("error") if body.get("status") == "failed" and isinstance(body.get("error"), str) else None
    return ServerHealth(ready=ready, phases=phases, failure=failure)


_client: httpx.Client | None = None


def _probe_client() -> httpx.Client:
    """One client for every probe (thread-safe): a new one per call builds an SSL context, which at
    two probes a second per endpoint took CPU from the engines (benchmarks/RESULTS.md, gateway)."""
    global _client
    if _client is None:
        _client = httpx.Client(timeout=PROBE_TIMEOUT_S)
    return _client


def probe_health(host: str, port: int, timeout: float = PROBE_TIMEOUT_S) -> ServerHealth | None:
    """`GET /health` on the endpoint server; None when it does not answer (not up, or hung)."""
    try:
        r = _probe_client().get(f"http://{host}:{port}/health", timeout=timeout)
    except (httpx.ReadTimeout, httpx.PoolTimeout):
        return ServerHealth(ready=False, busy=True)
    except httpx.HTTPError:
        return None
    try:
        body = r.json()
    except ValueError:
        body = None
    return parse_health(r.status_code, body)


def later_phases(current: str | None, phases: tuple[str, ...] | list[str]) -> list[str]:
    """The phases of `phases` after `current`, in server order: phases only move forward."""
    start = SERVER_PHASES.index(current) + 1 if current in SERVER_PHASES else 0
    return [p for p in SERVER_PHASES[start:] if p in phases]


class Watchdog:
    """Failure verdicts on a running server from its `/health` answers, one per probe.

    `failures` misses in a row (no connection, an error, not ready) fail it; answers that only
    come late (`ServerHealth.busy`) count as misses once they have lasted `busy_grace` seconds.
    """

    def __init__(self, failures: int = 3, busy_grace: float = 10.0) -> None:
        self.failures, self.busy_grace = failures, busy_grace
        self.misses = 0
        self.busy_since: float | None = None

    def observe(self, health: ServerHealth | None) -> str | None:
        """The reason to fail the server after this probe, or None."""
        if health is not None and health.ready:
            self.misses, self.busy_since = 0, None
            return None
        if health is not None and health.busy:
            now = time.monotonic()
            self.busy_since = now if self.busy_since is None else self.busy_since
            if now - self.busy_since < self.busy_grace:
                return None
        else:
            self.busy_since = None
        self.misses += 1
        if self.misses < self.failures:
            return None
        late = " (accepting connections but not answering for over " \
               f"{self.busy_grace:.0f} s)" if health is not None and health.busy else ""
        return f"/health failed {self.misses} times in a row{late}"
