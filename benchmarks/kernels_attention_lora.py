"""Kernel benchmarks: paged decode attention and multi-LoRA shrink/expand.

1. Decode attention at Mixtral-8x7B shapes (32 heads, 8 KV heads, head_dim 128, block 16),
   batch 1/8/64 x context 512/4096, fp16: our paged Triton kernel against torch SDPA on K/V
   already gathered into contiguous tensors (the gather not timed: a generous baseline), and
   the achieved K/V read bandwidth.
2. LoRA at hidden 4096 (rank 16, one projection 4096 -> 4096): shrink + expand time for
   0 / 1 / 4 / 16 distinct adapters in the batch against the base fp16 GEMM, for a decode
   batch (BGMV) and a prefill batch (SGMV segments). "0 adapters" runs the kernels with every
   token at slot -1 (the engine skips LoRA entirely then; this is the floor of launching).

    PYTHONPATH=. python benchmarks/kernels_attention_lora.py            # CUDA, full shapes
    PYTHONPATH=. python benchmarks/kernels_attention_lora.py --smoke    # tiny, CPU interpreter
    ... --json OUT.json                                                 # rows as JSON
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any, Callable

# benchmarks/kernels.py would shadow the `kernels` package: drop this folder from sys.path.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

if "--smoke" in sys.argv:  # Triton reads TRITON_INTERPRET when it is first imported
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["HUBDEPLOY_FORCE_TRITON"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from hubdeploy.kernels.attention_triton import paged_attention_triton  # noqa: E402
from hubdeploy.kernels.lora import lora_segments  # noqa: E402
from hubdeploy.kernels.lora_triton import lora_expand_triton, lora_shrink_triton  # noqa: E402


def bench(fn: Callable[[], Any], device: str, iters: int, warmup: int) -> float:
    """Median milliseconds of `fn` (CUDA events on the GPU, wall clock on the CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def attention_rows(device: str, smoke: bool) -> list[dict[str, Any]]:
    if smoke:
        heads, kv_heads, head_dim, block, dtype = 4, 2, 16, 4, torch.float32
        batches, contexts, iters, warmup = [1, 2], [8, 24], 1, 0
    else:
        heads, kv_heads, head_dim, block, dtype = 32, 8, 128, 16, torch.float16
        batches, contexts, iters, warmup = [1, 8, 64], [512, 4096], 50, 5
    rows = []
    g = torch.Generator(device=device).manual_seed(0)
    for bsz in batches:
        for ctx in contexts:
            nblk = (ctx + block - 1) // block
            num_blocks = bsz * nblk
            k_cache = torch.randn(num_blocks, block, kv_heads, head_dim, device=device, dtype=dtype, generator=g)
            v_cache = torch.randn_like(k_cache)
            tables = torch.randperm(num_blocks, device=device, generator=g).to(torch.int32).view(bsz, nblk)
            q = torch.randn(bsz, heads, head_dim, device=device, dtype=dtype, generator=g)
            cu = torch.arange(bsz + 1, device=device, dtype=torch.int32)
            lens = torch.full((bsz,), ctx, device=device, dtype=torch.int32)
            scale = head_dim ** -0.5

            def ours() -> torch.Tensor:
                return paged_attention_triton(q, k_cache, v_cache, cu, lens, tables, 1, ctx, scale)

            kk = k_cache[tables.long()].reshape(bsz, nblk * block, kv_heads, head_dim)[:, :ctx].transpose(1, 2)
            vv = v_cache[tables.long()].reshape(bsz, nblk * block, kv_heads, head_dim)[:, :ctx].transpose(1, 2)
            kk, vv = kk.contiguous(), vv.contiguous()
            qq = q[:, :, None, :]

            def sdpa() -> torch.Tensor:
                return F.scaled_dot_product_attention(qq, kk, vv, scale=scale, enable_gqa=True)

            err = (ours().float() - sdpa()[:, :, 0].float()).abs().max().item()
            t_ours = bench(ours, device, iters, warmup)
            t_sdpa = bench(sdpa, device, iters, warmup)
            kv_bytes = 2 * bsz * ctx * kv_heads * head_dim * k_cache.element_size()
            rows.append({
                "bench": "decode_attention", "batch": bsz, "context": ctx, "ours_ms": t_ours, "sdpa_ms": t_sdpa,
                "speedup": t_sdpa / t_ours, "kv_GBps": kv_bytes / (t_ours * 1e-3) / 1e9, "max_abs_err": err,
            })
            del k_cache, v_cache, kk, vv
    return rows


def lora_rows(device: str, smoke: bool) -> list[dict[str, Any]]:
    if smoke:
        hidden, rank, dtype, shapes, iters, warmup = 32, 4, torch.float32, [("decode", 4), ("prefill", 32)], 1, 0
        adapter_counts = [0, 1, 4]
    else:
        hidden, rank, dtype, iters, warmup = 4096, 16, torch.float16, 50, 5
        shapes, adapter_counts = [("decode", 16), ("decode", 64), ("prefill", 2048)], [0, 1, 4, 16]
    g = torch.Generator(device=device).manual_seed(1)
    slots_total = max(adapter_counts)
    lora_a = torch.randn(slots_total, rank, hidden, device=device, dtype=dtype, generator=g) * 0.01
    lora_b = torch.randn(slots_total, hidden, rank, device=device, dtype=dtype, generator=g) * 0.01
    scalings = torch.full((slots_total,), 2.0, device=device)
    weight = torch.randn(hidden, hidden, device=device, dtype=dtype, generator=g) * 0.01
    rows = []
    for kind, n in shapes:
        x = torch.randn(n, hidden, device=device, dtype=dtype, generator=g)
        out = torch.zeros(n, hidden, device=device, dtype=dtype)
        t_base = bench(lambda: x @ weight.T, device, iters, warmup)
        for count in adapter_counts:
            if count == 0:
                slots = torch.full((n,), -1, device=device, dtype=torch.int32)
            elif kind == "decode":  # requests interleaved: one token each
                slots = (torch.arange(n, device=device) % count).to(torch.int32)
            else:  # prefill: contiguous runs of tokens per request
                slots = (torch.arange(n, device=device) * count // n).to(torch.int32)
            seg = lora_segments(slots) if kind == "prefill" else None

            def lora() -> None:
                t = lora_shrink_triton(x, lora_a, slots, seg)
                lora_expand_triton(out, t, lora_b, slots, scalings, segments=seg)

            t_lora = bench(lora, device, iters, warmup)
            rows.append({"bench": "lora", "shape": kind, "tokens": n, "adapters": count, "rank": rank,
                         "hidden": hidden, "lora_ms": t_lora, "base_gemm_ms": t_base,
                         "lora_over_base": t_lora / t_base})
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    for bench_name in dict.fromkeys(r["bench"] for r in rows):
        sel = [r for r in rows if r["bench"] == bench_name]
        cols = [c for c in sel[0] if c != "bench"]
        print(f"\n== {bench_name}")
        print("  ".join(f"{c:>14}" for c in cols))
        for r in sel:
            print("  ".join(f"{r[c]:>14.4g}" if isinstance(r[c], float) else f"{r[c]!s:>14}" for c in cols))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU under Triton's interpreter")
    ap.add_argument("--json", metavar="OUT", help="write every row to this JSON file")
    args = ap.parse_args(argv)
    if args.smoke:
        device = "cpu"
    elif torch.cuda.is_available():
        device = "cuda"
    else:
        print("no CUDA GPU: run with --smoke for the CPU interpreter check", file=sys.stderr)
        return 2
    rows = attention_rows(device, args.smoke) + lora_rows(device, args.smoke)
    meta = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (Triton interpreter)",
            "smoke": args.smoke}
    print(f"device: {meta['device']}")
    print_table(rows)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"meta": meta, "rows": rows}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
