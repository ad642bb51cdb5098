"""`hubdeploy bench URL`: load-test an OpenAI-compatible endpoint (see `hubdeploy.bench`).

`--concurrency 1,8,32` (or `--request-rate 1,4,inf`) runs one measurement per value;
`--json` writes every run's numbers, `--plot` draws latency against load.
"""
from __future__ import annotations

import argparse
import asyncio
import math
from pathlib import Path


def _floats(text: str) -> list[float]:
    try:
        return [math.inf if v.strip().lower() in ("inf", "infinity") else float(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas (e.g. 1,4,inf): {text!r}") from e


def _ints(text: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas (e.g. 1,8,32): {text!r}") from e
    if any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError("concurrency values must be >= 1")
    return vals


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="load-test an OpenAI-compatible endpoint (TTFT, TPOT, throughput, goodput)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("url", metavar="URL", help="server root or its /v1 root, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="model name to request (default: the first in /v1/models)")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--request-rate", type=_floats, default=None,
                   help="Poisson arrival rate(s) in requests/s, comma-separated; inf = all at once")
    p.add_argument("--concurrency", type=_ints, default=None,
                   help="most requests in flight, comma-separated values for a sweep (default 8 when no rate)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--json", dest="json_out", default=None, metavar="OUT", help="write the results as JSON")
    p.add_argument("--plot", default=None, metavar="PNG", help="write latency-vs-load plot")
    p.add_argument("--tokenizer", default=None, metavar="DIR", help="directory with tokenizer.json: exact prompt lengths")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ttft-slo", type=float, default=1.0, help="TTFT target in seconds for goodput")
    p.add_argument("--tpot-slo", type=float, default=0.1, help="TPOT target in seconds for goodput")
    p.add_argument("--max-input-len", type=int, default=1024, help="clip sampled prompt lengths (tokens)")
    p.add_argument("--max-output-len", type=int, default=512, help="clip sampled output lengths (tokens)")
    p.add_argument("--label", default="", help="name of the system under test (in JSON and plot)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--server-pid", type=int, default=None, metavar="PID",
                   help="a local server's PID: also report its CPU time (process tree) per output token")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from hubdeploy import bench

    console = Console(stderr=True)
    base = bench.normalize_base_url(args.url)
    try:
        model = args.model or bench.fetch_model(base, args.api_key)
    except Exception as e:  # noqa: BLE001 - say what to check
        console.print(f"[red]cannot list models at {base}/models: {e}[/red]; is the server up? pass --model?")
        return 1
    requests = bench.make_requests(args.num_prompts, args.seed, args.tokenizer, args.max_input_len, args.max_output_len)
    if args.concurrency and args.request_rate:
        if len(args.concurrency) > 1 and len(args.request_rate) > 1:
            console.print("[red]sweep either --concurrency or --request-rate, not both[/red]")
            return 2
    loads: list[tuple[int | None, float]] = []
    if args.request_rate:
        cap = args.concurrency[0] if args.concurrency else None
        loads = [(cap, r) for r in args.request_rate]
    else:
        loads = [(c, math.inf) for c in (args.concurrency or [8])]

    runs = []
    for conc, rate in loads:
        desc = f"c={conc}" if conc else ""
        desc += (" " if desc else "") + (f"rate={rate:g}/s" if math.isfinite(rate) else "")
        with Progress(TextColumn(f"[bold]{desc or 'run'}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console, disable=args.quiet, transient=False) as progress:
            task = progress.add_task("requests", total=len(requests))
            cpu0 = bench.process_tree_cpu_seconds(args.server_pid) if args.server_pid else None
            summary = asyncio.run(bench.run_load(
                base, model, requests, concurrency=conc, request_rate=rate, api_key=args.api_key, seed=args.seed,
                ttft_slo=args.ttft_slo, tpot_slo=args.tpot_slo,
                on_done=lambda r: progress.advance(task)))
        cpu1 = bench.process_tree_cpu_seconds(args.server_pid) if args.server_pid else None
        if cpu0 is not None and cpu1 is not None:
            summary["server_cpu_s"] = cpu1 - cpu0
            toks = summary["total_output_tokens"]
            summary["server_cpu_ms_per_output_token"] = 1000 * (cpu1 - cpu0) / toks if toks else None
        runs.append(summary)
        if summary["failed"]:
            console.print(f"[yellow]{summary['failed']} request(s) failed: {summary['errors']}[/yellow]")

    table = Table(title=f"{args.label or base} — {model} — {args.num_prompts} prompts")
    cpu_col = any("server_cpu_ms_per_output_token" in r for r in runs)
    for col in ("load", "req/s", "out tok/s", "TTFT p50/p90/p99 ms", "TPOT p50/p90/p99 ms", "goodput req/s", "failed",
                *(["server CPU ms/token"] if cpu_col else [])):
        table.add_column(col)

    def f3(d: dict) -> str:
        return "/".join("-" if d[k] is None else f"{d[k]:.1f}" for k in ("p50", "p90", "p99"))

    for r in runs:
        load = f"c={r['concurrency']}" if r["concurrency"] else ""
        if r["request_rate"]:
            load += f" rate={r['request_rate']:g}"
        table.add_row(load, f"{r['request_throughput']:.2f}", f"{r['output_token_throughput']:.1f}",
                      f3(r["ttft_ms"]), f3(r["tpot_ms"]), f"{r['goodput']:.2f}", str(r["failed"]),
                      *([f"{r.get('server_cpu_ms_per_output_token') or float('nan'):.3f}"] if cpu_col else []))
    Console().print(table)

    report = {"url": base, "model": model, "label": args.label, "num_prompts": args.num_prompts, "seed": args.seed,
              "workload": {"input_median": bench.INPUT_MEDIAN, "input_sigma": bench.INPUT_SIGMA,
                           "output_median": bench.OUTPUT_MEDIAN, "output_sigma": bench.OUTPUT_SIGMA,
                           "max_input_len": args.max_input_len, "max_output_len": args.max_output_len,
                           "tokenizer": args.tokenizer},
              "runs": runs}
    if args.json_out:
        Path(args.json_out).write_text(bench.to_json(report))
    if args.plot:
        bench.plot(runs, args.plot, title=f"{args.label or base} — {model}")
    failed_all = all(r["completed"] == 0 for r in runs)
    if failed_all:
        console.print("[red]every request failed[/red]")
    return 1 if failed_all else 0

