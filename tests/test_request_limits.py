"""One request must not take an endpoint down (issue 21, point 1), against a real
`hubdeploy serve` child on loopback with small limits:

- while the heaviest requests run (a prompt body just under the limit, which takes seconds
  to tokenize; n=16 with 20 top log-probs per token), `/health` keeps answering well within
  the deploy service's watchdog timeout;
- bodies over the limit get 413 in OpenAI's shape before they are read (declared
  `Content-Length`) or as soon as they cross it (chunked);
- requests over the caps on prompts x n, tokens asked and log-prob entries get 400 naming
  the field, and the server keeps serving; a key with too many requests in flight gets 429.
"""
from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest

from tests.fixtures.serve import TEST_API_KEY, start_serve

pytestmark = pytest.mark.timeout(300)

MAX_BODY = 1_500_000
WATCHDOG_TIMEOUT_S = 2.0  # what the provisioner's health probe waits (provisioner/health.py)
USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def server(tiny_models):
    with start_serve(tiny_models("mixtral", "awq"), api_key=TEST_API_KEY, extra_args=[
            "--max-model-len", "256", "--kv-cache-tokens", "4096", "--max-request-bytes", str(MAX_BODY),
            "--max-sequences-per-request", "32", "--max-tokens-per-request", "2048",
            "--max-logprobs-per-request", "30000", "--max-concurrent-requests-per-key", "2"]) as s:
        yield s


class HealthProbe:
    """Polls `/health` from a thread (as the watchdog does) and keeps every latency."""

    def __init__(self, url: str, interval: float = 0.05) -> None:
        self.url, self.interval = url + "/health", interval
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=WATCHDOG_TIMEOUT_S) as c:
            while not self._stop.is_set():
                t0 = time.perf_counter()
                try:
                    ok = c.get(self.url).status_code == 200
                    if not ok:
                        self.failures.append("status")
                except httpx.HTTPError as e:
                    self.failures.append(type(e).__name__)
                self.latencies.append(time.perf_counter() - t0)
                self._stop.wait(self.interval)

    def __enter__(self) -> "HealthProbe":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def post(server, path: str, body: dict, timeout: float = 120) -> httpx.Response:
    return httpx.post(server.base_url + path, json=body, headers=server.headers, timeout=timeout)


def assert_400(r: httpx.Response, param: str) -> str:
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["code"] == "request_too_large" and err["type"] == "invalid_request_error"
    return err["message"]


def test_health_answers_while_a_prompt_body_near_the_limit_is_tokenized(server) -> None:
    prompt = "the quick brown fox jumps over a lazy dog; " * (MAX_BODY // 44 - 100)  # ~1.5 MB, ~400k tokens
    with HealthProbe(server.url) as probe:
        t0 = time.perf_counter()
        r = post(server, "/completions", {"model": "tiny", "prompt": prompt, "max_tokens": 1})
        took = time.perf_counter() - t0
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
    assert not probe.failures, probe.failures
    assert len(probe.latencies) >= 3
    # tokenizing took seconds; /health never waited for it
    print(f"tokenizing request {took:.2f} s, /health max {max(probe.latencies) * 1e3:.0f} ms")
    assert max(probe.latencies) < min(1.0, took / 2), (max(probe.latencies), took)


def test_health_answers_while_the_heaviest_logprobs_request_runs(server) -> None:
    body = {"model": "tiny", "messages": USER, "n": 16, "max_tokens": 80, "logprobs": True, "top_logprobs": 20,
            "ignore_eos": True, "temperature": 1.0, "seed": 1}
    with HealthProbe(server.url) as probe:
        r = post(server, "/chat/completions", body)
    assert r.status_code == 200, r.text
    print(f"/health max {max(probe.latencies) * 1e3:.0f} ms over {len(probe.latencies)} probes")
    choices = r.json()["choices"]
    assert len(choices) == 16
    assert all(len(c["logprobs"]["content"]) == 80 and len(c["logprobs"]["content"][0]["top_logprobs"]) == 20
               for c in choices)
    assert not probe.failures, probe.failures
    assert max(probe.latencies) < 1.0, max(probe.latencies)


def _raw_request(server, head: str, body_chunks: list[bytes] = (), read_timeout: float = 10.0) -> bytes:
    """Send a request by hand (headers, then what body we choose) and read what comes back."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=read_timeout) as s:
        s.sendall(head.encode())
        try:
            for chunk in body_chunks:
                s.sendall(chunk)
        except OSError:  # the server answered and closed while we were still sending: fine
            pass
        data = b""
        while b"\r\n\r\n" not in data or len(data) < 200:
            try:
                more = s.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not more:
                break
            data += more
        return data


def test_declared_body_over_the_limit_is_refused_before_it_is_read(server) -> None:
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TEST_API_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {100 * 1024 * 1024}\r\n\r\n")
    t0 = time.perf_counter()
    reply = _raw_request(server, head)  # no body sent at all: an answer proves nothing waited for it
    assert time.perf_counter() - t0 < 5
    status, _, rest = reply.partition(b"\r\n")
    assert b" 413 " in status, reply[:300]
    body = rest.split(b"\r\n\r\n", 1)[1]
    assert b'"code":"request_too_large"' in body and b'"type":"invalid_request_error"' in body


def test_chunked_body_over_the_limit_is_cut_off(server) -> None:
    def chunks():
        piece = b'{"model": "tiny", "prompt": "' + b"a" * (256 * 1024)
        yield piece
        for _ in range(400):  # 100 MB if the server kept reading
            yield b"a" * (256 * 1024)

    try:
        r = httpx.post(server.base_url + "/completions", content=chunks(), timeout=30,
                       headers={**server.headers, "Content-Type": "application/json"})
    except httpx.HTTPError as e:  # the server may close before the client is done sending
        pytest.fail(f"no 413 answer: {e!r}")
    assert r.status_code == 413, r.text
    assert r.json()["error"]["code"] == "request_too_large"


def test_caps_on_sequences_tokens_and_logprob_entries(server) -> None:
    msg = assert_400(post(server, "/completions", {"model": "tiny", "prompt": ["a", "b", "c"], "n": 16}), "n")
    assert "48 sequences" in msg and "32" in msg
    assert_400(post(server, "/completions", {"model": "tiny", "prompt": [[1, 2]] * 33}), "prompt")
    msg = assert_400(post(server, "/completions", {"model": "tiny", "prompt": "hi", "n": 16, "max_tokens": 250}),
                     "max_tokens")
    assert "at most" in msg
    msg = assert_400(post(server, "/chat/completions", {"model": "tiny", "messages": USER, "n": 16, "max_tokens": 200,
                                                        "logprobs": True, "top_logprobs": 20}),
                     "max_tokens")
    msg = assert_400(post(server, "/chat/completions", {"model": "tiny", "messages": USER, "n": 16, "max_tokens": 100,
                                                        "logprobs": True, "top_logprobs": 20}), "top_logprobs")
    assert "30000" in msg
    # no max_tokens: chat's default (the rest of the context) is lowered to fit the cap, not refused
    r = post(server, "/chat/completions", {"model": "tiny", "messages": USER, "n": 16, "ignore_eos": True})
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert usage["completion_tokens"] == 16 * ((2048 - 16 * usage["prompt_tokens"]) // 16)
    ok = post(server, "/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 2})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


def test_requests_in_flight_per_key_are_capped(server) -> None:
    # two requests whose bodies are still on their way hold both slots of this key
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TEST_API_KEY}\r\n"
            "Content-Type: application/json\r\nContent-Length: 200\r\n\r\n{\"model\": ")
    holders = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(2)]
    try:
        for s in holders:
            s.sendall(head.encode())
        time.sleep(0.5)
        with httpx.Client(timeout=60) as c:
            over = c.post(server.base_url + "/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 1},
                          headers=server.headers)
            assert over.status_code == 429, over.text
            err = over.json()["error"]
            assert err["type"] == "rate_limit_error" and err["code"] == "too_many_concurrent_requests"
            assert c.get(server.url + "/health").status_code == 200  # other routes are not counted
    finally:
        for s in holders:
            s.close()
    deadline = time.monotonic() + 10  # the clients left: their slots are free again
    while True:
        ok = httpx.post(server.base_url + "/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 1},
                        headers=server.headers, timeout=30)
        if ok.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert ok.status_code == 200, ok.text
