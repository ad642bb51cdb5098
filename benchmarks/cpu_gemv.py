"""CPU GEMV/GEMM with the weights streamed from memory, as a decode step meets them.

A decode step reads every weight once, and the model is far larger than the last-level cache, so
a kernel timed on one weight that stays cache-resident flatters it. Here each shape gets enough
distinct copies to exceed `--set-mb` (default 3x the L3 size) and each call takes the next one.
Per shape and row count: time per call and GB/s of weight bytes for our 16-bit kernel, the
oneDNN-blocked bf16 copy the engine used to keep, our int4 AWQ kernel, and `tensor.sum()` over
the same bf16 weights as the memory limit measured in the same run. Median over rounds, min-max
in brackets; one thread unless `--threads`.

    python benchmarks/cpu_gemv.py                       # Mixtral-like shapes of the realistic model
    python benchmarks/cpu_gemv.py --rows 1,4,8 --rounds 7
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Callable

import _common

_common.use_source_tree()

import torch  # noqa: E402

from hubdeploy.kernels import cpu_gemm  # noqa: E402
from hubdeploy.kernels.awq_cpu import Avx2Dense16Weight, avx2_kernels, to_avx2_int4  # noqa: E402

SHAPES = [(7168, 1024), (1024, 3584), (32000, 1024)]  # w13 of an expert, w2, the LM head (out x in)
GROUP = 128


def l3_bytes() -> int:
    """The last-level cache size from sysfs (48 MB if unreadable)."""
    best = 0
    for idx in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            size = (idx / "size").read_text().strip()
        except OSError:
            continue
        mult = {"K": 1 << 10, "M": 1 << 20}.get(size[-1], 1)
        best = max(best, int(size.rstrip("KM")) * mult)
    return best or 48 << 20


def time_round(fn: Callable[[int], object], copies: int) -> float:
    """Seconds per call, one pass over all `copies` weights (each arm has its own set)."""
    t0 = time.perf_counter()
    for j in range(copies):
        fn(j)
    return (time.perf_counter() - t0) / copies


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,4,8,16", help="rows of x (comma-separated)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--set-mb", type=int, default=0, help="bytes of bf16 weights per shape (default 3x L3)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    set_bytes = (args.set_mb << 20) or 3 * l3_bytes()
    have_ext = avx2_kernels() is not None
    print(f"threads {args.threads}, weight set per shape {set_bytes >> 20} MB (L3 {l3_bytes() >> 20} MB), "
          f"our kernels {'built' if have_ext else 'unavailable'}")
    print("| W (out x in) | rows | ours 16-bit | oneDNN blocked bf16 | ours int4 (AWQ g128) | sum() over bf16 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for n, k in SHAPES:
        copies = max(2, -(-set_bytes // (n * k * 2)))
        ws = [torch.randn(n, k, dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        blocked = [cpu_gemm.pack_weight(w) for w in ws]
        int4_bytes = n * k // 2 + 2 * 4 * n * (k // GROUP)
        int4 = [to_avx2_int4(torch.randint(0, 16, (n, k), dtype=torch.uint8), torch.randint(0, 16, (k // GROUP, n)),
                             torch.rand(k // GROUP, n, dtype=torch.float16) * 1e-3, GROUP)
                for _ in range(max(2, -(-set_bytes // int4_bytes)))] if have_ext else []
        for m in (int(r) for r in args.rows.split(",")):
            x = torch.randn(m, k, dtype=torch.bfloat16)
            # arm -> (call on weight j, weight bytes per call, copies)
            arms: dict[str, tuple[Callable[[int], object], int, int]] = {"sum": (lambda j: ws[j].sum(), n * k * 2, copies)}
            if have_ext:
                arms["ours16"] = (lambda j: Avx2Dense16Weight(ws[j]).mm(x), n * k * 2, copies)
                arms["int4"] = (lambda j: int4[j].mm(x), int4_bytes, len(int4))
            if blocked[0] is not None:
                arms["onednn"] = (lambda j: cpu_gemm.packed_linear(x, blocked[j]), n * k * 2, copies)
            times: dict[str, list[float]] = {a: [] for a in arms}
            for fn, _, c in arms.values():
                time_round(fn, c)  # warm-up (and oneDNN's primitive build)
            for _ in range(args.rounds):
                for a, (fn, _, c) in arms.items():  # arms alternate within each round
                    times[a].append(time_round(fn, c))

            def cell(a: str) -> str:
                if a not in times:
                    return "n/a"
                t = times[a]
                gbs = [arms[a][1] / s / 1e9 for s in t]
                return f"{statistics.median(t) * 1e6:,.0f} µs, {statistics.median(gbs):.1f} GB/s ({min(gbs):.1f}-{max(gbs):.1f})"

            print(f"| {n}x{k} | {m} | {cell('ours16')} | {cell('onednn')} | {cell('int4')} | {cell('sum')} |", flush=True)


if __name__ == "__main__":
    main()
