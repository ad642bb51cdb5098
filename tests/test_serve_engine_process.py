"""`hubdeploy serve` runs its engine in a child process (`--single-process`: a thread), and an
engine that dies while serving takes the endpoint down loudly instead of leaving it hung."""
from __future__ import annotations

import os
import signal
import time

import httpx
import pytest

from tests.fixtures.serve import start_serve

pytestmark = pytest.mark.timeout(240)

ARGS = ["--max-model-len", "256", "--kv-cache-tokens", "2048"]


def _children(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of the direct children of `pid`."""
    from hubdeploy.bench import process_table

    out = []
    for child, (parent, _) in process_table().items():
        if parent == pid:
            try:
                cmd = open(f"/proc/{child}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:  # exited meanwhile
                continue
            out.append((child, cmd))
    return out


def _engine_child(pid: int) -> int | None:
    return next((c for c, cmd in _children(pid) if "multiprocessing.spawn" in cmd), None)


def test_engine_child_death_fails_the_endpoint(tiny_models) -> None:
    with start_serve(tiny_models("mixtral", "awq"), extra_args=ARGS) as server:
        child = _engine_child(server.proc.pid)
        assert child is not None, _children(server.proc.pid)
        body = {"model": "tiny", "prompt": "Hello", "max_tokens": 200, "temperature": 0, "ignore_eos": True}
        r = httpx.post(server.base_url + "/completions", json={**body, "max_tokens": 4}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        with httpx.stream("POST", server.base_url + "/completions", json={**body, "stream": True}, timeout=60) as s:
            lines = s.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))  # streaming has begun
            os.kill(child, signal.SIGKILL)  # e.g. the kernel's OOM killer
            rest = []
            try:
                rest = [line for line in lines if line.startswith("data: ")]
            except httpx.HTTPError:  # the server may drop the connection as it exits
                pass
        # the stream stops short of its 200 tokens with an OpenAI-style error event (or, if the
        # server was faster to exit, a dropped connection), never a silent hang
        if rest:
            assert any('"code": "engine_dead"' in line and "engine process exited" in line for line in rest), rest[-3:]
            assert len(rest) < 150
        server.proc.wait(30)
        assert server.proc.returncode == 1
        out = server.stdout()
        assert "phase: failed" in out and "engine process exited" in out, out[-2000:]


def test_single_process_mode_serves(tiny_models) -> None:
    with start_serve(tiny_models("mixtral", "awq"), extra_args=[*ARGS, "--single-process"]) as server:
        assert _engine_child(server.proc.pid) is None
        r = httpx.post(server.base_url + "/completions", timeout=60,
                       json={"model": "tiny", "prompt": "Hello", "max_tokens": 3, "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
