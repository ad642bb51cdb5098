"""Offline engine step micro-benchmark: decode step time and tokens/s at batch 1, 8, 32.

Drives `LLMEngine` directly (no HTTP) on the CPU with the serving benchmark's tiny Mixtral
(benchmarks/out/serving_vs_peers/tiny-mixtral-hd64, built by benchmarks/serving_vs_peers.sh;
the test fixture's tiny Mixtral otherwise). For each batch size: B greedy requests with
`--prompt-len`-token prompts, prefill until every sequence decodes, then time `--steps`
decode steps. Two variants run in the same process so their numbers compare:

  reference  the engine before the CPU work: the kernels' plain-torch contracts
             (`paged_attention_ref`, `fused_moe_ref`), weights stored `[out, in]` (the rest of
             the step, norms, rotary, scheduler and runner, is the current code)
  optimized  what the engine runs on the CPU now (`paged_attention_torch` with the per-step
             plan and `DecodeKV`, `fused_moe_torch`, weights stored transposed for NN GEMMs:
             `serving.cpu_backend.cpu_gemm_layout`)

and the script checks that both produce the same greedy tokens. The machine this runs on
is shared: it reports the median and the minimum step time, and the step's thread CPU
time (less sensitive to other jobs than wall time; one intra-op thread by default).

    python benchmarks/engine_step.py                 # --batch 1,8,32 --steps 30 --threads 1
    python benchmarks/engine_step.py --variants optimized --batch 32
    python benchmarks/engine_step.py --variants optimized --dtype bfloat16 --prefill-rounds 5
"""
from __future__ import annotations

import argparse
import contextlib
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Iterator

import torch

ROOT = Path(__file__).resolve().parents[1]
# run as a script, benchmarks/ is sys.path[0] and its kernels.py would shadow the kernels package
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]
BENCH_MODEL = ROOT / "benchmarks/out/serving_vs_peers/tiny-mixtral-hd64"


def default_model() -> str:
    if (BENCH_MODEL / "model.safetensors").is_file():
        return str(BENCH_MODEL)
    from tests.fixtures.tiny import build_tiny_cached

    return str(build_tiny_cached("mixtral", "none"))


@contextlib.contextmanager
def variant(name: str, model: torch.nn.Module) -> Iterator[None]:
    """`reference`: the engine as it was before the CPU work (reference kernels, weights stored
    `[out, in]`); `optimized`: as it runs now."""
    from hubdeploy.kernels import attention, fused_moe
    from hubdeploy.serving.cpu_backend import cpu_gemm_layout
    from hubdeploy.serving.models import layers

    if name == "optimized":
        yield
        return
    if name != "reference":
        raise ValueError(f"unknown variant {name!r}; use reference or optimized")
    saved = layers.paged_attention, layers.fused_moe
    layers.paged_attention = attention.paged_attention_ref
    layers.fused_moe = fused_moe.fused_moe_ref
    for p in model.parameters():
        p.data = p.data.contiguous()
    try:
        yield
    finally:
        layers.paged_attention, layers.fused_moe = saved
        cpu_gemm_layout(model)


def run_batch(engine, batch: int, prompt_len: int, steps: int, warmup: int, seed: int) -> dict:
    """Prefill `batch` requests, then time `steps` decode steps; returns timings and the tokens."""
    from hubdeploy.serving.sampling_params import SamplingParams

    rng = random.Random(seed)
    vocab = engine.model_config.vocab_size
    params = SamplingParams(max_tokens=warmup + steps + 1, temperature=0.0, ignore_eos=True)
    ids = [f"b{batch}-{i}" for i in range(batch)]
    for rid in ids:
        engine.add_request(rid, [rng.randrange(3, vocab) for _ in range(prompt_len)], params)
    tokens: dict[str, list[int]] = {rid: [] for rid in ids}
    t0 = time.perf_counter()
    while any(not s.output_token_ids for s in engine.seqs.values()):  # prefill (maybe chunked)
        for out in engine.step():
            tokens[out.request_id] += out.delta_token_ids
    prefill_s = time.perf_counter() - t0
    times, cpu = [], []
    for i in range(warmup + steps):
        c = time.thread_time()
        t = time.perf_counter()
        outs = engine.step()
        dt = time.perf_counter() - t
        if i >= warmup:
            times.append(dt)
            cpu.append(time.thread_time() - c)
        for out in outs:
            tokens[out.request_id] += out.delta_token_ids
        if len(outs) != batch:
            raise RuntimeError(f"step {i} returned {len(outs)} outputs for a batch of {batch}")
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.delta_token_ids
    med = statistics.median(times)
    return {"batch": batch, "prefill_ms": prefill_s * 1e3, "step_ms_p50": med * 1e3, "step_ms_min": min(times) * 1e3,
            "cpu_ms_p50": statistics.median(cpu) * 1e3, "tok_s": batch / med, "tokens": [tokens[r] for r in ids]}


def run_prefill(engine, batch: int, prompt_len: int, rounds: int, seed: int) -> dict:
    """`rounds` times: `batch` fresh prompts (new random tokens, so new routing), one step that
    prefills them all; returns that step's thread CPU time (median, min) over the rounds after
    the first (the first also builds what a new process builds once)."""
    from hubdeploy.serving.sampling_params import SamplingParams

    rng = random.Random(seed)
    vocab = engine.model_config.vocab_size
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    cpu = []
    for r in range(rounds + 1):
        for i in range(batch):
            engine.add_request(f"p{r}-{i}", [rng.randrange(3, vocab) for _ in range(prompt_len)], params)
        c = time.thread_time()
        engine.step()
        if r:
            cpu.append(time.thread_time() - c)
        while engine.has_unfinished():
            engine.step()
    return {"batch": batch, "cpu_ms_p50": statistics.median(cpu) * 1e3, "cpu_ms_min": min(cpu) * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model directory (default: the serving benchmark's tiny Mixtral)")
    ap.add_argument("--batch", default="1,8,32", help="comma-separated decode batch sizes")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--steps", type=int, default=30, help="timed decode steps per batch size")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (the serving benchmark uses 1)")
    ap.add_argument("--variants", default="reference,optimized")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="model dtype (bf16/fp16 run through oneDNN, AMX where the CPU has it)")
    ap.add_argument("--prefill-rounds", type=int, default=0,
                    help="also time N prefill steps of max(batch) prompts each (thread CPU ms)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from hubdeploy.serving.engine import EngineArgs, LLMEngine

    model = args.model or default_model()
    batches = [int(b) for b in args.batch.split(",")]
    need = args.prompt_len + args.warmup + args.steps + 8
    max_len = max(512, need)
    engine = LLMEngine(EngineArgs(model=model, device="cpu", dtype=args.dtype, max_model_len=max_len,
                                  max_num_seqs=max(batches), max_loras=0,
                                  kv_cache_tokens=max(max(batches) * need + 256, max_len)))
    print(f"model {model}; {args.dtype}; {args.threads} thread(s); prompt {args.prompt_len} tokens; "
          f"{args.steps} timed decode steps")
    results: dict[str, list[dict]] = {}
    prefills: dict[str, dict] = {}
    for name in args.variants.split(","):
        with variant(name, engine.runner.model):
            results[name] = [run_batch(engine, b, args.prompt_len, args.steps, args.warmup, seed=b) for b in batches]
            if args.prefill_rounds:
                prefills[name] = run_prefill(engine, max(batches), args.prompt_len, args.prefill_rounds, seed=99)
    print("| variant | batch | prefill ms | decode step p50 ms | step min ms | step CPU p50 ms | decode tok/s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, rows in results.items():
        for r in rows:
            print(f"| {name} | {r['batch']} | {r['prefill_ms']:.1f} | {r['step_ms_p50']:.2f} | {r['step_ms_min']:.2f} "
                  f"| {r['cpu_ms_p50']:.2f} | {r['tok_s']:.0f} |")
    for name, r in prefills.items():
        print(f"{name}: prefill step of {r['batch']} x {args.prompt_len} tokens: CPU p50 {r['cpu_ms_p50']:.1f} ms, "
              f"min {r['cpu_ms_min']:.1f} ms ({args.prefill_rounds} rounds)")
    if "reference" in results and "optimized" in results:
        for ref, opt in zip(results["reference"], results["optimized"]):
            same = ref["tokens"] == opt["tokens"]
            print(f"batch {ref['batch']}: optimized/reference decode step {ref['step_ms_p50'] / opt['step_ms_p50']:.2f}x "
                  f"faster (wall p50), {ref['cpu_ms_p50'] / opt['cpu_ms_p50']:.2f}x less CPU; "
                  f"greedy tokens identical: {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
