"""`hubdeploy bench`: the workload distribution, the statistics, and a real run of the CLI
against a real `hubdeploy serve` child process (JSON that adds up, a PNG that opens)."""
from __future__ import annotations

import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time

import numpy as np
import pytest

from hubdeploy import bench
from tests.fixtures.serve import REPO_ROOT, TEST_API_KEY

pytestmark = pytest.mark.timeout(300)


def test_lengths_follow_the_documented_distribution() -> None:
    lengths = bench.sample_lengths(4000, seed=3)
    ins, outs = [i for i, _ in lengths], [o for _, o in lengths]
    assert statistics.median(ins) == pytest.approx(bench.INPUT_MEDIAN, rel=0.1)
    assert statistics.median(outs) == pytest.approx(bench.OUTPUT_MEDIAN, rel=0.1)
    assert min(ins) >= 4 and max(ins) <= 1024 and max(outs) <= 512
    assert bench.sample_lengths(5, seed=1) == bench.sample_lengths(5, seed=1)
    clipped = bench.sample_lengths(100, seed=1, max_input_len=16, max_output_len=8)
    assert all(4 <= i <= 16 and 4 <= o <= 8 for i, o in clipped)


def test_exact_prompt_lengths_with_tokenizer(tiny_models) -> None:
    from tokenizers import Tokenizer

    d = tiny_models("mixtral", "awq")
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    for r in bench.make_requests(10, seed=0, tokenizer_dir=d, max_input_len=40):
        assert abs(len(tok.encode(r.prompt, add_special_tokens=False).ids) - r.prompt_len) <= 1


def test_summary_statistics_against_numpy() -> None:
    rng = np.random.default_rng(0)
    results = []
    for _ in range(50):
        ttft = float(rng.uniform(0.01, 2.0))
        e2e = ttft + float(rng.uniform(0.1, 3.0))
        results.append(bench.RequestResult(ok=True, prompt_tokens=10, output_tokens=21, ttft=ttft, e2e=e2e))
    results.append(bench.RequestResult(ok=False, error="HTTP 500"))
    s = bench.summarize(results, duration=10.0, ttft_slo=1.0, tpot_slo=0.1)
    ttfts = np.array([r.ttft for r in results if r.ok])
    tpots = np.array([(r.e2e - r.ttft) / 20 for r in results if r.ok])
    for p in (50, 90, 99):
        assert s["ttft_ms"][f"p{p}"] == pytest.approx(np.percentile(ttfts, p) * 1e3, rel=1e-9)
        assert s["tpot_ms"][f"p{p}"] == pytest.approx(np.percentile(tpots, p) * 1e3, rel=1e-9)
    good = sum(1 for t, q in zip(ttfts, tpots) if t <= 1.0 and q <= 0.1)
    assert s["goodput"] == pytest.approx(good / 10.0)
    assert s["completed"] == 50 and s["failed"] == 1 and s["errors"] == ["HTTP 500"]
    assert s["output_token_throughput"] == pytest.approx(50 * 21 / 10.0)


def test_bench_cli_against_server(tiny_server, tmp_path) -> None:
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    cmd = [sys.executable, "-m", "hubdeploy", "bench", tiny_server.url, "--num-prompts", "6",
           "--concurrency", "1,3", "--api-key", TEST_API_KEY, "--json", str(out), "--plot", str(png),
           "--tokenizer", str(tiny_server.model_dir), "--max-input-len", "24", "--max-output-len", "6",
           "--quiet", "--ttft-slo", "30", "--tpot-slo", "5", "--server-pid", str(tiny_server.proc.pid)]
    p = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["model"] == "tiny"
    expected = [o for _, o in bench.sample_lengths(6, 0, 24, 6)]
    assert [r["concurrency"] for r in report["runs"]] == [1, 3]
    for run in report["runs"]:
        assert run["completed"] == 6 and run["failed"] == 0
        # ignore_eos: the server generated exactly the asked-for lengths
        assert run["total_output_tokens"] == sum(expected)
        assert 0 < run["ttft_ms"]["p50"] <= run["ttft_ms"]["p90"] <= run["ttft_ms"]["p99"] <= run["e2e_ms"]["p99"]
        assert run["tpot_ms"]["p50"] > 0
        assert run["output_token_throughput"] == pytest.approx(run["total_output_tokens"] / run["duration_s"])
        assert run["goodput"] == pytest.approx(run["request_throughput"])  # generous SLOs: every request is good
        # the server (front end + engine child) did the work: some CPU per token, less than all of the run
        assert 0 < run["server_cpu_s"] <= 2 * run["duration_s"] + 0.5
        assert run["server_cpu_ms_per_output_token"] == pytest.approx(1000 * run["server_cpu_s"] / sum(expected))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert "TTFT" in p.stdout and "TPOT" in p.stdout and "goodput" in p.stdout


def test_process_tree_cpu_counts_children() -> None:
    """A busy grandchild's CPU time counts toward the tree of its ancestor."""
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.4: pass\ntime.sleep(30)"
    parent = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                               f"subprocess.Popen([sys.executable, '-c', {burn!r}]); time.sleep(30)"],
                              start_new_session=True)  # its own process group: one killpg ends both
    try:
        deadline = time.monotonic() + 20
        total = 0.0
        while time.monotonic() < deadline and total < 0.4:
            time.sleep(0.1)
            total = bench.process_tree_cpu_seconds(parent.pid) or 0.0
        assert total >= 0.4  # the grandchild's 0.4 s of busy loop
        assert (bench.process_tree_cpu_seconds(os.getpid()) or 0.0) >= total  # ours includes it too
    finally:
        os.killpg(parent.pid, signal.SIGKILL)
        parent.wait()
    assert bench.process_tree_cpu_seconds(parent.pid) is None  # gone


def test_bench_poisson_rate(tiny_server) -> None:
    import asyncio

    reqs = bench.make_requests(4, seed=1, max_input_len=16, max_output_len=4)
    s = asyncio.run(bench.run_load(tiny_server.base_url, "tiny", reqs, request_rate=20.0, api_key=TEST_API_KEY))
    assert s["completed"] == 4 and s["request_rate"] == 20.0 and s["concurrency"] is None
    bad = asyncio.run(bench.run_load(tiny_server.base_url, "tiny", reqs[:1], api_key="wrong"))
    assert bad["failed"] == 1 and "401" in bad["errors"][0]
    assert math.isfinite(s["duration_s"])
