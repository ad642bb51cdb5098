"""`/health` latency while the heaviest request the endpoint allows runs (issue 21).

The deploy service's watchdog fails an endpoint after 3 `/health` calls in a row that take
longer than 2 s (`provisioner/health.py`), so what matters is the tail of `/health` latency
while one request does the most CPU work the limits let it ask for. A real `hubdeploy serve`
of the tiny AWQ Mixtral runs with the default request limits (`request_limits.RequestLimits`);
one thread polls `/health` every 20 ms while, one at a time:

- `idle`: nothing else;
- `prompt_at_body_limit`: a text prompt as large as the body limit allows (8 MiB), which
  must be tokenized before the server can say it is too long (answer: 400);
- `logprobs_at_cap`: chat, n=16, `top_logprobs` 20 and the largest `max_tokens` the log-prob
  cap allows (16 x 780 x 21 = 262,080 entries), the whole answer formatted at once (answer: 200).

Prints p50 / p99 / max of `/health` per case and the request's own time. `--repeat K` runs
the cases K times in alternation (figures vary with the machine's load: report the spread).

    PYTHONPATH=. python benchmarks/health_under_load.py [--repeat 2] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time

from _common import use_source_tree

use_source_tree()

import httpx  # noqa: E402

from hubdeploy.serving.server.request_limits import RequestLimits  # noqa: E402
from tests.fixtures.serve import start_serve  # noqa: E402
from tests.fixtures.tiny import build_tiny_cached  # noqa: E402

KEY = "bench-key"
LIMITS = RequestLimits()
LOGPROB_TOKENS = LIMITS.max_logprob_entries // (16 * 21)


class Poller:
    def __init__(self, url: str, interval: float = 0.02) -> None:
        self.url, self.interval = url + "/health", interval
        self.lat: list[float] = []
        self.errors = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=10) as c:
            while not self._stop.is_set():
                t0 = time.perf_counter()
                try:
                    if c.get(self.url).status_code != 200:
                        self.errors += 1
                except httpx.HTTPError:
                    self.errors += 1
                self.lat.append(time.perf_counter() - t0)
                self._stop.wait(self.interval)

    def __enter__(self) -> "Poller":
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join(15)


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def run_case(server, name: str) -> dict:
    headers = {"Authorization": f"Bearer {KEY}"}
    with Poller(server.url) as p:
        t0 = time.perf_counter()
        if name == "idle":
            time.sleep(3.0)
            status = 0
        elif name == "prompt_at_body_limit":
            unit = "the quick brown fox jumps over a lazy dog; "
            prompt = unit * ((LIMITS.max_body_bytes - 200) // len(unit))
            r = httpx.post(server.base_url + "/completions", headers=headers, timeout=600,
                           json={"model": "tiny", "prompt": prompt, "max_tokens": 1})
            status = r.status_code
        else:
            r = httpx.post(server.base_url + "/chat/completions", headers=headers, timeout=600, json={
                "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "n": 16,
                "max_tokens": LOGPROB_TOKENS, "logprobs": True, "top_logprobs": 20, "ignore_eos": True, "seed": 1})
            status = r.status_code
        took = time.perf_counter() - t0
    lat = p.lat
    return {"case": name, "status": status, "request_s": round(took, 2), "probes": len(lat), "errors": p.errors,
            "p50_ms": round(statistics.median(lat) * 1e3, 1), "p99_ms": round(_pct(lat, 0.99) * 1e3, 1),
            "max_ms": round(max(lat) * 1e3, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    model = build_tiny_cached("mixtral", "awq")
    rows = []
    with start_serve(model, api_key=KEY, extra_args=["--max-model-len", str(LOGPROB_TOKENS + 64),
                                                     "--kv-cache-tokens", str(16 * (LOGPROB_TOKENS + 64))]) as server:
        for _ in range(args.repeat):
            for case in ("idle", "prompt_at_body_limit", "logprobs_at_cap"):
                row = run_case(server, case)
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(f"\n{'case':<22} {'status':>6} {'request s':>10} {'probes':>7} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for r in rows:
        print(f"{r['case']:<22} {r['status']:>6} {r['request_s']:>10} {r['probes']:>7} {r['p50_ms']:>8} "
              f"{r['p99_ms']:>8} {r['max_ms']:>8}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
