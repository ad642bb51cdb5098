"""Load generator for any OpenAI-compatible server (ours, vLLM, a transformers baseline).

It streams `/v1/completions` with `ignore_eos` (so output lengths are what we ask for) at a
fixed concurrency or with Poisson arrivals at a request rate, and reports TTFT, TPOT
(time per output token after the first), inter-token latency and end-to-end latency
percentiles, request and token throughput, and goodput (requests per second that met both
the TTFT and TPOT SLOs).

Workload. Databricks Dolly (the instruction dataset the published Friendli-vs-vLLM runs
used) cannot be downloaded here, so lengths are synthesized from a documented
distribution shaped like it: instruction + context lengths are log-normal with a median of
60 tokens (sigma 0.9: p10 ≈ 19, p90 ≈ 190), clipped to [4, 1024]; response lengths
log-normal with a median of 100 tokens (sigma 0.8: p10 ≈ 36, p90 ≈ 280), clipped to
[4, 512]. The clip bounds are parameters (`--max-input-len` / `--max-output-len`) so tiny
CPU runs stay short. Prompt text is built from an English word
list; with a tokenizer directory each prompt is cut to its exact token length, otherwise
the true lengths are read back from the server's `usage`.
"""
from __future__ import annotations

import asyncio
import json
import math
import os
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import httpx

WORDS = (
    "the of and to in is was for that on with as by at from his it an were are which this be or has had "
    "not but first one their also after new two its who they been have more other she into time over "
    "during between all most some made them can where when later only many while under then both may such "
    "use would being about these three city year world work since used before each known through up if "
    "several what write explain summarize list describe how why give example reason answer question story "
    "history science water river music film school team family people country government company system"
).split()

INPUT_MEDIAN, INPUT_SIGMA = 60.0, 0.9
OUTPUT_MEDIAN, OUTPUT_SIGMA = 100.0, 0.8


@dataclass
class BenchRequest:
    prompt: str
    prompt_len: int  # intended (exact when a tokenizer was given)
    output_len: int


@dataclass
class RequestResult:
    ok: bool
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float | None = None  # seconds
    e2e: float = 0.0
    itls: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


def sample_lengths(n: int, seed: int = 0, max_input_len: int = 1024, max_output_len: int = 512,
                   min_len: int = 4) -> list[tuple[int, int]]:
    """(input, output) token lengths from the Dolly-shaped log-normal mix above."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        i = int(round(rng.lognormvariate(math.log(INPUT_MEDIAN), INPUT_SIGMA)))
        o = int(round(rng.lognormvariate(math.log(OUTPUT_MEDIAN), OUTPUT_SIGMA)))
        out.append((max(min_len, min(i, max_input_len)), max(min_len, min(o, max_output_len))))
    return out


def make_requests(n: int, seed: int = 0, tokenizer_dir: str | Path | None = None, max_input_len: int = 1024,
                  max_output_len: int = 512) -> list[BenchRequest]:
    """`n` prompts with their intended lengths; exact token lengths when a tokenizer is given."""
    rng = random.Random(seed + 1)
    encode: Callable[[str], list[int]] | None = None
    decode: Callable[[list[int]], str] | None = None
    if tokenizer_dir is not None:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
        encode = lambda s: tok.encode(s, add_special_tokens=False).ids  # noqa: E731
        decode = lambda ids: tok.decode(ids)  # noqa: E731
    reqs = []
    for k, (ilen, olen) in enumerate(sample_lengths(n, seed, max_input_len, max_output_len)):
        words = [rng.choice(WORDS) for _ in range(ilen * 2)]
        text = f"{k}: " + " ".join(words)
        if encode is not None and decode is not None:
            ids = encode(text)[:ilen]
            text = decode(ids)
        else:
            text = " ".join(text.split()[: max(1, int(ilen / 1.3))])  # ~1.3 tokens per English word
        reqs.append(BenchRequest(text, ilen, olen))
    return reqs


async def _one(client: httpx.AsyncClient, url: str, model: str, req: BenchRequest,
               headers: dict[str, str]) -> RequestResult:
    # skip_special_tokens=False (a vLLM extra, ignored elsewhere): with ignore_eos a random
    # model may emit special tokens, which would otherwise stream as empty text
    body = {"model": model, "prompt": req.prompt, "max_tokens": req.output_len, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
            "skip_special_tokens": False}
    res = RequestResult(ok=False)
    start = time.perf_counter()
    last = start
    chunks = 0
    try:
        async with client.stream("POST", url, json=body, headers=headers) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:200]}"
                res.e2e = time.perf_counter() - start
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:].strip()
                if data == "[DONE]":
                    break
                obj = json.loads(data)
                if "error" in obj:
                    res.error = obj["error"].get("message", "error in stream")
                    break
                if obj.get("usage"):
                    res.prompt_tokens = obj["usage"].get("prompt_tokens", 0)
                    res.output_tokens = obj["usage"].get("completion_tokens", 0)
                choice = (obj.get("choices") or [None])[0]
                # a token arrived: text, or an empty-text chunk that is not the closing one
                if choice is not None and (choice.get("text") or not choice.get("finish_reason")):
                    now = time.perf_counter()
                    if res.ttft is None:
                        res.ttft = now - start
                    else:
                        res.itls.append(now - last)
                    last = now
                    chunks += 1
        res.e2e = time.perf_counter() - start
        if res.output_tokens == 0:
            res.output_tokens = chunks  # server without usage in streams: one token per chunk
        if res.prompt_tokens == 0:
            res.prompt_tokens = req.prompt_len
        if res.ttft is None and res.output_tokens > 0 and res.error is None:
            res.ttft = res.e2e  # tokens came back, but only in the closing chunk
        res.ok = res.error is None and res.ttft is not None
        if res.ttft is None and res.error is None:
            res.error = "no token came back"
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        res.error = f"{type(e).__name__}: {e}"
        res.e2e = time.perf_counter() - start
    return res


def _pcts(values: list[float], scale: float = 1000.0) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    v = sorted(values)

    def q(p: float) -> float:
        k = (len(v) - 1) * p
        lo, hi = math.floor(k), math.ceil(k)
        return (v[lo] + (v[hi] - v[lo]) * (k - lo)) * scale

    return {"mean": statistics.fmean(v) * scale, "p50": q(0.5), "p90": q(0.9), "p99": q(0.99)}


def summarize(results: list[RequestResult], duration: float, ttft_slo: float, tpot_slo: float) -> dict[str, Any]:
    """Aggregate numbers of one run (latencies in ms, throughputs per second)."""
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    good = [r for r in ok if r.ttft is not None and r.ttft <= ttft_slo and (r.tpot is None or r.tpot <= tpot_slo)]
    errors = [r.error for r in results if not r.ok]
    return {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted(set(e for e in errors if e))[:5],
        "duration_s": duration,
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration if duration > 0 else 0.0,
        "output_token_throughput": out_tokens / duration if duration > 0 else 0.0,
        "total_token_throughput": (in_tokens + out_tokens) / duration if duration > 0 else 0.0,
        "goodput": len(good) / duration if duration > 0 else 0.0,
        "goodput_fraction": len(good) / len(results) if results else 0.0,
        "ttft_ms": _pcts([r.ttft for r in ok if r.ttft is not None]),
        "tpot_ms": _pcts([r.tpot for r in ok if r.tpot is not None]),
        "itl_ms": _pcts([x for r in ok for x in r.itls]),
        "e2e_ms": _pcts([r.e2e for r in ok]),
    }


async def run_load(base_url: str, model: str, requests: list[BenchRequest], *, concurrency: int | None = None,
                   request_rate: float = math.inf, api_key: str | None = None, seed: int = 0,
                   ttft_slo: float = 1.0, tpot_slo: float = 0.1, timeout: float = 600.0,
                   on_done: Callable[[RequestResult], None] | None = None) -> dict[str, Any]:
    """One run: send `requests`, `concurrency` at most in flight, arrivals Poisson at `request_rate`/s."""
    from hubdeploy.serving.heap import freeze_heap

    freeze_heap()  # no full garbage collection of the client's heap in the middle of a run
    url = base_url.rstrip("/") + "/completions"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    rng = random.Random(seed + 2)
    sem = asyncio.Semaphore(concurrency) if concurrency else None
    limits = httpx.Limits(max_connections=max(concurrency or len(requests), 1) + 4,
                          max_keepalive_connections=max(concurrency or len(requests), 1) + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout), limits=limits) as client:
        async def guarded(req: BenchRequest) -> RequestResult:
            if sem is None:
                r = await _one(client, url, model, req, headers)
            else:
                async with sem:
                    r = await _one(client, url, model, req, headers)
            if on_done:
                on_done(r)
            return r

        start = time.perf_counter()
        tasks = []
        for req in requests:
            tasks.append(asyncio.create_task(guarded(req)))
            if math.isfinite(request_rate) and request_rate > 0:
                await asyncio.sleep(rng.expovariate(request_rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    summary = summarize(list(results), duration, ttft_slo, tpot_slo)
    summary.update(concurrency=concurrency, request_rate=None if not math.isfinite(request_rate) else request_rate,
                   num_prompts=len(requests), ttft_slo_s=ttft_slo, tpot_slo_s=tpot_slo)
    return summary


def fetch_model(base_url: str, api_key: str | None = None) -> str:
    """The first model the server lists (its base model)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    r = httpx.get(base_url.rstrip("/") + "/models", headers=headers, timeout=30)
    r.raise_for_status()
    data = r.json().get("data") or []
    if not data:
        raise RuntimeError(f"{base_url}/models lists no model; pass --model")
    return data[0]["id"]


def process_table() -> dict[int, tuple[int, int]]:
    """Every local process as pid -> (parent pid, user + system CPU ticks), from Linux `/proc`
    ({} where there is none)."""
    table: dict[int, tuple[int, int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return table
    for d in entries:
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                raw = f.read()
        except OSError:  # exited meanwhile
            continue
        fields = raw[raw.rfind(")") + 2:].split()  # after "pid (comm) "
        table[int(d)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
    return table


def process_tree_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a local process and all its descendants (Linux `/proc`).

    Why: on a shared machine wall-clock figures swing with other jobs, but the CPU a server
    spends per generated token does not, so it compares servers fairly (ours runs an
    engine child process, vLLM several). None where `/proc` is not there or `pid` is gone.
    """
    table = process_table()
    if pid not in table:
        return None
    tree, frontier = {pid}, [pid]
    while frontier:
        frontier = [c for c, (p, _) in table.items() if p in frontier and c not in tree]
        tree.update(frontier)
    return sum(table[p][1] for p in tree) / os.sysconf("SC_CLK_TCK")


def normalize_base_url(url: str) -> str:
    """Accept `http://host:port`, `.../v1` or `.../v1/`; return the `/v1` root."""
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


def plot(runs: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Latency percentiles and throughput against load (one point per run) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_conc = all(r.get("concurrency") for r in runs)
    xs = [r["concurrency"] if by_conc else (r.get("request_rate") or float("nan")) for r in runs]
    xlabel = "concurrency (requests in flight)" if by_conc else "request rate (req/s)"
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for key, ax, name in (("ttft_ms", axes[0], "TTFT"), ("tpot_ms", axes[1], "TPOT")):
        for p, style in (("p50", "o-"), ("p90", "s--"), ("p99", "^:")):
            ax.plot(xs, [r[key][p] if r[key][p] is not None else float("nan") for r in runs], style, label=p)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{name} (ms)")
        ax.set_title(f"{name} vs load")
        ax.grid(True, alpha=0.3)
        ax.legend()
    ax = axes[2]
    ax.plot(xs, [r["output_token_throughput"] for r in runs], "o-", label="output tok/s")
    ax.plot(xs, [r["goodput"] * 100 for r in runs], "s--", label="goodput ×100 (req/s)")
    ax.set_xlabel(xlabel)
    ax.set_title("throughput vs load")
    ax.grid(True, alpha=0.3)
    ax.legend()
    if len(xs) > 1 and all(x and x > 0 for x in xs if x == x):
        from matplotlib.ticker import FixedLocator, ScalarFormatter

        for a in axes:
            a.set_xscale("log", base=2)
            a.xaxis.set_major_locator(FixedLocator([x for x in xs if x == x]))
            a.xaxis.set_major_formatter(ScalarFormatter())
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def to_json(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2, default=lambda o: asdict(o) if hasattr(o, "__dataclass_fields__") else str(o))
