"""The gateway's cost: `hubdeploy bench` on an endpoint's own URL and on its gateway URL, in one run.

`hubdeploy up` runs as its own process (the gateway's event loop, as users get it) with the demo
model on the CPU; one public endpoint. For each concurrency (1, 8, 32) the rounds alternate the
order (direct, gateway / gateway, direct) so both see the same machine load; the figures are the
per-round gateway − direct differences of TTFT p50 and the gateway/direct ratios of TPOT p50, as
median and min–max over the rounds. With each run, the CPU the service and the endpoint's
server process spent: the gateway's CPU per streamed token at that concurrency (service CPU
per token through the gateway less direct, same round), and the cores each used. Then the
service's CPU per event for one long stream, direct (its background work) and through the
gateway. Then the wake-up time: the endpoint is left to scale to zero, and one streamed request
with `X-Scale-Up-Timeout` is timed to its first token.

    python benchmarks/gateway_overhead.py [--rounds 3] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import use_source_tree

use_source_tree()

import httpx  # noqa: E402

ADMIN = "hdadm_gateway_bench"
PROMPTS = {1: 12, 8: 32, 32: 64}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_status(api: httpx.Client, name: str, want: str, timeout: float = 300.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        e = api.get(f"/api/endpoints/{name}").json()
        if e["status"] == want:
            return e
        if e["status"] == "failed" or time.monotonic() > deadline:
            raise RuntimeError(f"{name}: {e['status']} ({e.get('reason')})")
        time.sleep(0.1)


def bench(url: str, concurrency: int, key: str | None, out: Path, pids: dict[str, int]) -> dict[str, Any]:
    """One `hubdeploy bench` run (its own process); its JSON run, plus the CPU seconds each process
    in `pids` spent during it (`cpu_s`: the service; the endpoint, its server and engine processes)."""
    cmd = [sys.executable, "-m", "hubdeploy", "bench", url, "--concurrency", str(concurrency),
           "--num-prompts", str(PROMPTS[concurrency]), "--max-input-len", "128", "--max-output-len", "64",
           "--quiet", "--json", str(out), "--seed", "0"]
    if key:
        cmd += ["--api-key", key]
    before = {k: tree_cpu_s(pid) if k == "engine" else process_cpu_s(pid) for k, pid in pids.items()}
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(ROOT)})
    run = json.loads(out.read_text())["runs"][0]
    run["cpu_s"] = {k: (tree_cpu_s(pid) if k == "engine" else process_cpu_s(pid)) - before[k]
                    for k, pid in pids.items()}
    if run["failed"]:
        raise RuntimeError(f"{url}: {run['failed']} failed: {run['errors']}")
    return run


def first_token_s(url: str, model: str) -> float:
    body = {"model": model, "prompt": "Hello", "max_tokens": 4, "stream": True}
    t0 = time.perf_counter()
    with httpx.stream("POST", url + "/completions", json=body, headers={"X-Scale-Up-Timeout": "300"},
                      timeout=320) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                return time.perf_counter() - t0
    raise RuntimeError("no token came back")


def process_cpu_s(pid: int) -> float:
    """CPU seconds of one process (all its threads, not its children)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu_s(pid: int) -> float:
    """CPU seconds of a process and its live descendants (the endpoint's server and its engine process)."""
    total = 0.0
    try:
        total += process_cpu_s(pid)
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                total += tree_cpu_s(int(child))
    except (FileNotFoundError, ProcessLookupError):
        pass
    return total


def service_cpu_per_event_us(service_pid: int, url: str, key: str | None, model: str) -> float:
    """The service process's CPU per streamed event while one long completion streams through `url`."""
    body = {"model": model, "prompt": "Hello there", "max_tokens": 1500, "ignore_eos": True, "stream": True}
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    c0, events = process_cpu_s(service_pid), 0
    with httpx.stream("POST", url + "/completions", json=body, headers=headers, timeout=120) as r:
        for line in r.iter_lines():
            events += line.startswith("data: {")
    return (process_cpu_s(service_pid) - c0) / max(events, 1) * 1e6


def spread(values: list[float], fmt: str = "{:.3f}") -> str:
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}–{fmt.format(max(values))})"


ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--wakes", type=int, default=3)
    ap.add_argument("--json", dest="json_out", default=None)
    args = ap.parse_args()
    from hubdeploy.hub_integration.store import Store

    work = Path(tempfile.mkdtemp(prefix="hubdeploy-gwbench-"))
    port = free_port()
    env = {**os.environ, "HUBDEPLOY_ADMIN_TOKEN": ADMIN, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    service = subprocess.Popen([sys.executable, "-m", "hubdeploy", "up", "--data-dir", str(work), "--port", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    api = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60)
    results: dict[str, Any] = {"rounds": args.rounds, "concurrency": {}}
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                defaults = api.get("/api/defaults").json()
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        r = api.post("/api/endpoints", json={"name": "bench", "model": defaults["model"], "access": "public"})
        r.raise_for_status()
        e = wait_status(api, "bench", "running")
        gateway = e["url"]
        rec = Store(work / "hubdeploy.db").get_endpoint("bench")
        direct, key = rec.url, (work / "secrets" / "bench.key").read_text().strip()
        print(f"direct {direct}  gateway {gateway}", flush=True)
        pids = {"service": service.pid, "engine": rec.pid}
        bench(gateway, 1, None, work / "warm.json", pids)  # warm both paths once
        for conc in (1, 8, 32):
            ttft_diff, tpot_ratio, rows, relay_us = [], [], [], []
            for i in range(args.rounds):
                order = [("direct", direct, key), ("gateway", gateway, None)]
                if i % 2:
                    order.reverse()
                got = {label: bench(url, conc, k, work / f"{label}.json", pids) for label, url, k in order}
                d, g = got["direct"], got["gateway"]
                # the service's CPU per streamed token through the gateway, less what it spends anyway
                relay_us.append((g["cpu_s"]["service"] / g["total_output_tokens"]
                                 - d["cpu_s"]["service"] / d["total_output_tokens"]) * 1e6)
                ttft_diff.append(g["ttft_ms"]["p50"] - d["ttft_ms"]["p50"])
                tpot_ratio.append(g["tpot_ms"]["p50"] / d["tpot_ms"]["p50"])
                rows.append({k: {"ttft_p50_ms": v["ttft_ms"]["p50"], "tpot_p50_ms": v["tpot_ms"]["p50"],
                                 "out_tok_s": v["output_token_throughput"], "duration_s": v["duration_s"],
                                 "tokens": v["total_output_tokens"], "cpu_s": v["cpu_s"]} for k, v in got.items()})
                print(f"c={conc:<2d} round {i + 1}: TTFT p50 direct {d['ttft_ms']['p50']:.1f} ms, gateway "
                      f"{g['ttft_ms']['p50']:.1f} ms; TPOT p50 direct {d['tpot_ms']['p50']:.2f} ms, gateway "
                      f"{g['tpot_ms']['p50']:.2f} ms", flush=True)
            results["concurrency"][conc] = {"ttft_p50_diff_ms": ttft_diff, "tpot_p50_ratio": tpot_ratio,
                                            "relay_cpu_us_per_token": relay_us, "rounds": rows}
            cores = [r["gateway"]["cpu_s"]["service"] / r["gateway"]["duration_s"] for r in rows]
            engine = [r["gateway"]["cpu_s"]["engine"] / r["gateway"]["duration_s"] for r in rows]
            print(f"c={conc:<2d} gateway − direct TTFT p50: {spread(ttft_diff, '{:+.2f}')} ms; "
                  f"gateway/direct TPOT p50: {spread(tpot_ratio)}; relay CPU per token {spread(relay_us, '{:.0f}')} µs; "
                  f"through the gateway the service used {spread(cores, '{:.2f}')} cores, the engine "
                  f"{spread(engine, '{:.2f}')} (its server and engine processes)", flush=True)
        # the service's own CPU per relayed event: direct (what it spends anyway: watchdog, reaper) vs gateway
        cpu: dict[str, list[float]] = {"direct": [], "gateway": []}
        for _ in range(args.rounds):
            cpu["direct"].append(service_cpu_per_event_us(service.pid, direct, key, e["served_model_name"]))
            cpu["gateway"].append(service_cpu_per_event_us(service.pid, gateway, None, e["served_model_name"]))
        results["service_cpu_us_per_event"] = cpu
        extra = [g - d for g, d in zip(cpu["gateway"], cpu["direct"])]
        print(f"service process CPU per streamed event: direct {spread(cpu['direct'], '{:.0f}')} µs, gateway "
              f"{spread(cpu['gateway'], '{:.0f}')} µs; the gateway's share {spread(extra, '{:.0f}')} µs", flush=True)
        # wake-up: scaled_to_zero → first token
        api.patch("/api/endpoints/bench", json={"scale_to_zero_after_s": 2}).raise_for_status()
        wakes = []
        for _ in range(args.wakes):
            wait_status(api, "bench", "scaled_to_zero")
            wakes.append(first_token_s(gateway, e["served_model_name"]))
            print(f"wake-up scaled_to_zero → first token: {wakes[-1]:.2f} s", flush=True)
        results["wake_s"] = wakes
        print(f"wake-up, median of {len(wakes)}: {spread(wakes, '{:.2f}')} s")
        api.delete("/api/endpoints/bench")
    finally:
        api.close()
        os.killpg(service.pid, signal.SIGTERM)
        service.wait(timeout=60)
        pid = Store(work / "hubdeploy.db").get_endpoint("bench")
        if pid is not None and pid.pid:
            try:
                os.killpg(pid.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
