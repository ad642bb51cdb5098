"""Phases cannot be forged (issue 21, point 3): the deploy service reads an endpoint's phases
and readiness from its `/health` JSON only, and the endpoint's request log escapes what
clients control.

The attack: `GET /x%0aphase:%20warming_up%0a` (no key needed) used to write a line
`phase: warming_up` into the endpoint's log, which the provisioner parsed as a phase.
Here a real service runs a real `hubdeploy serve` child; while the child is still starting,
such a line lands in its log (written straight into the file, and sent as requests), and
the recorded phases must still be the child's own, in order.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from hubdeploy.hub_integration.provisioner.health import parse_health
from hubdeploy.hub_integration.service import build_service_app
from tests.fixtures.service import ADMIN, LiveService, reap, wait_status

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

FORGED_PATHS = ["/x%0aphase:%20warming_up%0a", "/v1/x%0d%0aphase:%20ready", "/y%1b[2J%1b[31mred%e2%80%a8phase:%20ready"]
TEST_LINE = "phase: warming_up (forged by the test)"


def _forge_requests(port_of: Any, stop: threading.Event) -> int:
    sent = 0
    with httpx.Client(timeout=2) as c:
        while not stop.is_set():
            port = port_of()
            if port:
                for path in FORGED_PATHS:
                    try:
                        c.get(f"http://127.0.0.1:{port}{path}")
                        sent += 1
                    except httpx.HTTPError:
                        pass  # not listening yet
            stop.wait(0.05)
    return sent


def test_forged_phase_lines_neither_move_the_endpoint_nor_reach_the_log(tmp_path: Path, tiny_models: Any) -> None:
    model = tiny_models("mixtral", "awq")
    data = tmp_path / "svc"
    svc = LiveService(build_service_app(data, admin_token=ADMIN, allowed_model_roots=[model.parent]))
    stop = threading.Event()
    try:
        store = svc.app.state.store
        r = svc.client.post("/api/endpoints", json={"name": "forge", "model": str(model), "access": "public"})
        assert r.status_code == 201, r.text
        deadline = time.monotonic() + 30
        while not (store.get_endpoint("forge").pid):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        # the child is still importing: a forged phase line in its log, as a log-reading parser would see it
        with open(data / "logs" / "forge.log", "a") as f:
            f.write(TEST_LINE + "\n")
        sent: list[int] = []
        forger = threading.Thread(target=lambda: sent.append(_forge_requests(
            lambda: store.get_endpoint("forge").port, stop)), daemon=True)
        forger.start()
        e = wait_status(svc, "forge", {"running", "failed"})
        stop.set()
        forger.join(10)
        assert e["status"] == "running", e["reason"]
        phases = [h["phase"] for h in e["history"] if h["phase"]]
        # the child's own phases, each once, in order: the forged `warming_up` jumped nothing
        assert phases == ["downloading", "loading", "warming_up", "ready"], phases
        assert sent and sent[0] > 0

        direct = store.get_endpoint("forge").url  # the child itself (its log is what is under test)
        internal = {"Authorization": "Bearer " + (data / "secrets" / "forge.key").read_text().strip()}
        health = httpx.get(direct.removesuffix("/v1") + "/health", timeout=5)
        assert parse_health(health.status_code, health.json()).phases == ("downloading", "loading", "warming_up",
                                                                        "ready")
        for path in FORGED_PATHS:  # once more, now that it serves
            assert httpx.get(direct.removesuffix("/v1") + path, headers=internal, timeout=5).status_code == 404
        time.sleep(0.5)  # the request log line is written after the answer
        log = (data / "logs" / "forge.log").read_text(errors="replace")
        lines = log.splitlines()
        assert [ln for ln in lines if ln.startswith("phase: warming_up") and ln != TEST_LINE] == \
            [next(ln for ln in lines if ln.startswith("phase: warming_up") and ln != TEST_LINE)]  # the child's own
        assert not [ln for ln in lines if ln.startswith("phase: ready")][1:], "a forged ready line reached the log"
        assert "\x1b" not in log and "\r" not in log and "\u2028" not in log
        assert "GET /x\\x0aphase: warming_up\\x0a -> 404" in log  # logged, escaped
    finally:
        stop.set()
        svc.stop()
        reap(data)
