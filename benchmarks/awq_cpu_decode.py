"""Batch-1 decode on the CPU: an AWQ model against the same model in bf16 (issue 18).

    python -m benchmarks.awq_cpu_decode BF16_DIR AWQ_DIR [--rounds 3] [--tokens 64]

Three arms: the bf16 model, the AWQ model on our AVX2 int4 kernel, and the AWQ model on torch's
tinygemm kernel (`HUBDEPLOY_CPU_INT4=tinygemm`). Each round starts one process per arm (order
rotating between rounds: the machine is shared), which measures RSS with torch and the engine
imported (the runtime's own share), loads the model with our engine in bf16, measures RSS after load, generates
`--tokens` tokens greedily at batch 1 after a short warm-up generation, and reports the
decode time per output token (TPOT: (end - first token) / (tokens - 1)) and RSS after the run.
Prints per-round AWQ/bf16 ratios (median and spread); `--json` writes all figures.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(model: str, tokens: int, threads: int) -> dict:
    import torch

    from hubdeploy.serving.llm import LLM
    from hubdeploy.serving.sampling_params import SamplingParams

    torch.set_num_threads(threads)
    rss_runtime = _rss_mb()
    llm = LLM(model, device="cpu", dtype="bfloat16", max_model_len=1024, cpu_threads=threads)
    rss_load = _rss_mb()
    prompt = "The quick brown fox jumps over the lazy dog. " * 4
    llm.generate(prompt, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))  # warm-up
    eng = llm.engine
    eng.add_request("t", prompt, SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True))
    t_first = None
    while eng.has_unfinished():
        outs = eng.step()
        if t_first is None and any(o.token_ids for o in outs):
            t_first = time.perf_counter()
    t_end = time.perf_counter()
    return dict(tpot_ms=(t_end - t_first) * 1e3 / (tokens - 1), rss_runtime_mb=rss_runtime, rss_load_mb=rss_load,
                rss_run_mb=_rss_mb())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bf16")
    ap.add_argument("awq")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--child", default=None)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.tokens, a.threads)))
        return
    arms = {"bf16": (a.bf16, "auto"), "awq": (a.awq, "auto"), "awq-tinygemm": (a.awq, "tinygemm")}
    runs: dict[str, list[dict]] = {k: [] for k in arms}
    names = list(arms)
    for r in range(a.rounds):
        for name in names[r % 3:] + names[:r % 3]:
            model, kernel = arms[name]
            env = dict(os.environ, HUBDEPLOY_CPU_INT4=kernel)
            out = subprocess.run([sys.executable, "-m", "benchmarks.awq_cpu_decode", a.bf16, a.awq, "--child", model,
                                  "--tokens", str(a.tokens), "--threads", str(a.threads)],
                                 check=True, capture_output=True, text=True, env=env).stdout
            runs[name].append(json.loads(out.strip().splitlines()[-1]))
            print(f"round {r} {name}: " + ", ".join(f"{k} {v:.1f}" for k, v in runs[name][-1].items()), flush=True)
    for k in ("tpot_ms", "rss_runtime_mb", "rss_load_mb", "rss_run_mb"):
        print(f"{k}: " + ", ".join(f"{n} median {statistics.median(x[k] for x in runs[n]):.1f}" for n in names))
    speed = {}
    for n in ("awq", "awq-tinygemm"):
        speed[n] = [b["tpot_ms"] / q["tpot_ms"] for b, q in zip(runs["bf16"], runs[n])]
        print(f"{n} speed-up over bf16 (bf16 TPOT / its TPOT, per round): median {statistics.median(speed[n]):.2f}x, "
              f"spread {min(speed[n]):.2f}-{max(speed[n]):.2f}x")
    if a.json:
        a.json.write_text(json.dumps(dict(runs=runs, speedup=speed, threads=a.threads), indent=2))


if __name__ == "__main__":
    main()
