"""Tune the W4A16 decode kernels' launch configs on this GPU; write `hubdeploy/kernels/configs/<GPU>.json`.

Sweeps, per shape and M, the configs of
- `moe_direct`: the fused-MoE decode path (`fused_moe.direct_gemm`), w13 and w2 GEMMs of one layer;
- `awq`: the dense AWQ linear (`awq.awq_linear_triton`), the attention projections;
and keeps the fastest config whose output matches the default config's. Times are GPU times of a
CUDA graph of 16 calls that rotate over inputs and weights larger than the L2 cache (as decode
streams weights from HBM), median of 5 replays. The table is merged into the committed file, which
the launchers read at run time (`kernels/tuned.py`; nearest M; the rules stay the fallback).

    PYTHONPATH=. python benchmarks/tune_kernels.py                      # Mixtral-8x7B shapes
    PYTHONPATH=. python benchmarks/tune_kernels.py --shapes mixtral,qwen3 --deadline-s 120 --out x.json
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # for _common, also when loaded by path
from _common import use_source_tree  # noqa: E402

use_source_tree()
if "--smoke" in sys.argv:  # before triton's first import (kernels are built lazily)
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["HUBDEPLOY_FORCE_TRITON"] = "1"

import torch  # noqa: E402

from hubdeploy.kernels.awq import AWQPacked, awq_config  # noqa: E402
from hubdeploy.kernels.awq_triton import awq_linear_triton  # noqa: E402
from hubdeploy.kernels.fused_moe import moe_direct_config  # noqa: E402
from hubdeploy.kernels.fused_moe_triton import direct_gemm  # noqa: E402
from hubdeploy.kernels.tuned import CONFIG_DIR, device_file_name  # noqa: E402

# (name, hidden, moe intermediate, experts, top_k, group, attention (q+2kv, q) widths)
SHAPES = {
    "mixtral": dict(H=4096, I=14336, E=8, k=2, g=128, qkv=6144, q=4096),
    "qwen3": dict(H=2048, I=768, E=128, k=8, g=128, qkv=5120, q=4096),
    "tiny": dict(H=64, I=32, E=4, k=2, g=32, qkv=96, q=64),  # --smoke: the interpreter on the CPU
}
L2_ROTATE_BYTES = 256 << 20  # weights rotated per graph: several times the H100/H200 L2 (50/60 MB)


def random_packed(out_f: int, in_f: int, g: int, dev: torch.device, experts: int | None = None) -> AWQPacked:
    lead = (experts,) if experts else ()
    qw = torch.randint(-2**31, 2**31 - 1, (*lead, out_f, in_f // 8), dtype=torch.int32, device=dev)
    qz = torch.randint(-2**31, 2**31 - 1, (*lead, in_f // g, out_f // 8), dtype=torch.int32, device=dev)
    s = (torch.rand(*lead, in_f // g, out_f, device=dev) * 2e-3 + 1e-4).to(torch.float16)
    return AWQPacked(qw, qz, s, in_f, out_f, g)


def graph_time_ms(calls: list[Callable[[], Any]], replays: int = 5) -> float:
    """GPU milliseconds per call: one CUDA graph of `calls`, median of `replays` replays
    (on the CPU, for --smoke: wall time of the calls under the interpreter)."""
    if not torch.cuda.is_available():
        t = time.perf_counter()
        for fn in calls[:2]:
            fn()
        return (time.perf_counter() - t) * 1000 / 2
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for fn in calls[:2]:  # compile + warm outside the capture
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for fn in calls:
            fn()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / len(calls))
    del g
    return statistics.median(times)


def candidates(kind: str, M: int, group: int) -> list[dict[str, int]]:
    """The configs swept: tile width, rows (GEMV or 16-row dot), pipelining depth, split-K, warps."""
    bms = ([1, 16] if M == 1 else [16]) if kind == "moe_direct" else ([1 << (M - 1).bit_length()] if M <= 4 else [16])
    if kind == "awq" and M == 1:
        bms = [1, 16]
    out = []
    tiles = [(32, 4), (64, 4), (128, 4), (128, 8)]  # (BLOCK_N, num_warps): each pair is a compile
    # LOOP_STAGES 3 (a pipelined K loop) never won on the H200 (2026-12-04): one stage only, half the compiles
    for bm, (bn, warps), ls, split in itertools.product(bms, tiles, [1], [1, 2, 4, 8, 16, 0]):
        out.append(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=min(group, 128), SPLIT_K=split, num_warps=warps,
                        num_stages=1, LOOP_STAGES=ls))
    return out


def tune_moe(shape: dict[str, int], M: int, dev: torch.device, deadline: float) -> dict[str, dict[str, Any]]:
    """Best `moe_direct` config for w13 and w2 at M tokens."""
    H, I, E, k, g = shape["H"], shape["I"], shape["E"], shape["k"], shape["g"]
    w13 = random_packed(2 * I, H, g, dev, E)
    w2 = random_packed(H, I, g, dev, E)
    per_expert = (w13.qweight[0].numel() + w2.qweight[0].numel()) * 4
    # routings that touch disjoint expert sets in turn, so the weights rotate through HBM
    n_rot = max(1, min(E // min(E, M * k), -(-L2_ROTATE_BYTES // (per_expert * min(E, M * k)))))
    gen = torch.Generator(device=dev).manual_seed(M)
    routings = []
    for r in range(n_rot):
        base = (r * min(E, M * k)) % E
        logits = torch.randn(M, E, device=dev, generator=gen)
        pick = [(base + i) % E for i in range(min(E, M * k))]
        logits[:, pick] += 50.0
        ids = logits.topk(k, dim=-1).indices.to(torch.int32)
        routings.append((ids, torch.full((M * k,), 1.0 / k, device=dev)))
    x = torch.randn(M, H, device=dev, dtype=torch.float16)
    act = torch.randn(M * k, I, device=dev, dtype=torch.float16)
    out: dict[str, dict[str, Any]] = {}
    for name, w, N, K, a, per_slot in (("w13", w13, 2 * I, H, x, False), ("w2", w2, H, I, act, True)):
        key = f"E={E},N={N},K={K},G={g}"
        default = moe_direct_config(M, E, N, K, g, dev)

        def run(cfg: dict[str, int], ids: torch.Tensor, tw: torch.Tensor) -> torch.Tensor:
            return direct_gemm(a, w, M, N, K, ids, per_slot, tw if per_slot else None, cfg, torch.float32).sum(0)

        out[key] = sweep(f"moe_direct {name} M={M}", candidates("moe_direct", M, g), default,
                         lambda cfg: [lambda r=r: run(cfg, *r) for r in (routings * 16)[:16]],
                         lambda cfg: run(cfg, *routings[0]), deadline)
    return out


def tune_awq(shape: dict[str, int], M: int, dev: torch.device, deadline: float) -> dict[str, dict[str, Any]]:
    """Best dense AWQ config for the qkv and o projections at M tokens."""
    H, g = shape["H"], shape["g"]
    out: dict[str, dict[str, Any]] = {}
    for name, N, K in (("qkv", shape["qkv"], H), ("o", H, shape["q"])):
        n_copies = max(2, min(16, L2_ROTATE_BYTES // (N * K // 2)))
        ws = [random_packed(N, K, g, dev) for _ in range(n_copies)]
        x = torch.randn(M, K, device=dev, dtype=torch.float16)
        default = awq_config(M, N, K, g, dev)
        out[f"N={N},K={K},G={g}"] = sweep(
            f"awq {name} M={M}", candidates("awq", M, g), default,
            lambda cfg: [lambda w=w: awq_linear_triton(x, w, **cfg) for w in (ws * 16)[:16]],
            lambda cfg: awq_linear_triton(x, ws[0], **cfg).float(), deadline)
        del ws
    return out


def sweep(label: str, cands: list[dict[str, int]], default: dict[str, int],
          calls: Callable[[dict[str, int]], list[Callable[[], Any]]],
          result: Callable[[dict[str, int]], torch.Tensor], deadline: float) -> dict[str, Any]:
    """Time `default` and every candidate; return the fastest that agrees with the default."""
    ref = result(default)
    tol = 2e-2 * float(ref.abs().max()) + 1e-3
    t_default = graph_time_ms(calls(default))
    best, t_best = dict(default), t_default
    tried = 0
    for cfg in cands:
        if time.perf_counter() > deadline:
            break
        try:
            if float((result(cfg) - ref).abs().max()) > tol:
                print(f"  {label}: {cfg} disagrees with the default config: skipped", file=sys.stderr)
                continue
            t = graph_time_ms(calls(cfg))
        except Exception as e:  # a config the compiler rejects (resources) is just not a candidate
            print(f"  {label}: {cfg} failed ({type(e).__name__}: {str(e)[:80]})", file=sys.stderr)
            continue
        tried += 1
        if t < t_best:
            best, t_best = dict(cfg), t
    print(f"{label:<26} default {1000 * t_default:8.1f} us  best {1000 * t_best:8.1f} us  "
          f"({t_default / t_best:4.2f}x, {tried}/{len(cands)} tried)  {best}", flush=True)
    return {"config": best, "us": 1000 * t_best, "default_us": 1000 * t_default}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="mixtral")
    ap.add_argument("--ms", default="1,8,16,4,2", help="token counts (decode batch sizes), most important first")
    ap.add_argument("--kernels", default="moe_direct,awq")
    ap.add_argument("--deadline-s", type=float, default=150.0, help="stop sweeping after this; keep what is tuned")
    ap.add_argument("--out", default=None, help="also write the table here (default: only the committed file)")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shapes on the CPU under Triton's interpreter (proves the script; needs --out, "
                         "writes no committed file)")
    args = ap.parse_args(argv)
    if args.smoke:
        dev, name = torch.device("cpu"), "cpu-smoke"
        args.shapes, path = "tiny", None
    elif not torch.cuda.is_available():
        print("tune_kernels needs a CUDA GPU (or --smoke)", file=sys.stderr)
        return 2
    else:
        dev = torch.device("cuda")
        name = torch.cuda.get_device_name(dev)
        path = CONFIG_DIR / device_file_name(name)
    table: dict[str, Any] = json.loads(path.read_text()) if path is not None and path.exists() else {}
    deadline = time.perf_counter() + args.deadline_s
    details: dict[str, Any] = {}
    for shape_name, M, kind in itertools.product(args.shapes.split(","), [int(m) for m in args.ms.split(",")],
                                                 args.kernels.split(",")):
        if time.perf_counter() > deadline:
            print(f"deadline reached: {shape_name} {kind} M={M} not tuned", file=sys.stderr)
            continue
        fn = tune_moe if kind == "moe_direct" else tune_awq
        for key, res in fn(SHAPES[shape_name], M, dev, deadline).items():
            table.setdefault(kind, {}).setdefault(key, {})[str(M)] = res["config"]
            details.setdefault(kind, {}).setdefault(key, {})[str(M)] = res
    table.update(device=name, source=f"benchmarks/tune_kernels.py, {time.strftime('%Y-%m-%d')}, torch "
                 f"{torch.__version__}; rows per kernel/shape/M")
    if path is not None:
        CONFIG_DIR.mkdir(exist_ok=True)
        path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
        print(f"wrote {path}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"table": table, "details": details}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
