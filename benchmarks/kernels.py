"""Kernel benchmarks: AWQ W4A16 linear and fused MoE at Mixtral-8x7B and Qwen3-30B-A3B shapes.

Per kernel and M: time, achieved bytes/s as a fraction of the measured copy bandwidth,
achieved FLOP/s as a fraction of a measured bf16 matmul peak, and speed-up over baselines run
in the same process (torch dequantize-then-matmul, per-expert torch loop,
`aten._weight_int4pack_mm` where it works). Then one decode step of full-size Mixtral-8x7B
AWQ shapes (32 layers of q/k/v/o projections + router + fused MoE, plus the fp16 lm_head;
attention over the KV cache and norms are not included) against the bytes it must read.

    PYTHONPATH=. python benchmarks/kernels.py                 # CUDA, full shapes
    PYTHONPATH=. python benchmarks/kernels.py --smoke         # tiny shapes on the CPU
    PYTHONPATH=. python benchmarks/kernels.py --smoke --interp  # + Triton interpreter
    ... --json OUT.json   # every row as JSON

Weights are random (made on the device); routing comes from random router logits.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch

# This file is named kernels.py: drop its own folder from sys.path so `kernels` is the package.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

if "--interp" in sys.argv:  # must precede the first kernel launch (kernels are built lazily)
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["HUBDEPLOY_FORCE_TRITON"] = "1"

from hubdeploy.kernels.awq import AWQPacked, awq_config, awq_linear_ref  # noqa: E402
from hubdeploy.kernels.awq_triton import awq_linear_triton  # noqa: E402
from hubdeploy.kernels.fused_moe import AWQMoEWeights, MoEWeights, fused_moe_ref, topk_route
from hubdeploy.kernels.fused_moe_triton import fused_moe_triton


@dataclass
class Shape:
    name: str
    hidden: int
    inter: int
    experts: int
    top_k: int
    group: int
    renormalize: bool
    attn_out: tuple[int, int] = (4096, 1024)  # q/o width, k/v width
    layers: int = 32
    vocab: int = 32000


MIXTRAL = Shape("mixtral-8x7b", 4096, 14336, 8, 2, 128, True)
QWEN3 = Shape("qwen3-30b-a3b", 2048, 768, 128, 8, 128, True, attn_out=(4096, 512), layers=48, vocab=151936)
TINY = Shape("tiny", 64, 32, 8, 2, 32, True, attn_out=(64, 16), layers=2, vocab=128)


@dataclass
class Row:
    kernel: str
    shape: str
    M: int
    ms: float
    gbps: float
    bw_frac: float
    tflops: float
    peak_frac: float
    baselines: dict[str, float] = field(default_factory=dict)  # name -> ms
    note: str = ""

    def speedups(self) -> dict[str, float]:
        return {k: v / self.ms for k, v in self.baselines.items() if v == v and self.ms > 0}


# ----------------------------------------------------------------------------- timing


def bench(fn: Callable[[], Any], device: torch.device, rep_ms: int = 60) -> float:
    """Milliseconds per call: triton's do_bench (L2 flushed) on CUDA, a median loop on the CPU."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=10, rep=rep_ms))
    fn()
    times: list[float] = []
    t_end = time.perf_counter() + rep_ms / 1000
    while len(times) < 7 or (time.perf_counter() < t_end and len(times) < 50):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def measure_copy_bw(device: torch.device) -> float:
    """Device copy bandwidth in bytes/s, read + write counted."""
    n = (1 << 30) if device.type == "cuda" else (1 << 26)
    a = torch.empty(n, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    ms = bench(lambda: b.copy_(a), device)
    del a, b
    return 2 * n / (ms / 1000)


def measure_matmul_peak(device: torch.device) -> float:
    """bf16 torch.matmul FLOP/s on a large square problem (fp32 on the CPU)."""
    n, dt = (8192, torch.bfloat16) if device.type == "cuda" else (512, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dt)
    b = torch.randn(n, n, device=device, dtype=dt)
    ms = bench(lambda: a @ b, device)
    return 2 * n**3 / (ms / 1000)


# ----------------------------------------------------------------------------- weights


def random_packed(out_f: int, in_f: int, g: int, device: torch.device, experts: int | None = None,
                  scale: float = 2e-3) -> AWQPacked:
    """Random AWQ layer(s) directly in the kernel layout (any int32 bits are valid nibbles)."""
    lead = (experts,) if experts else ()
    lo, hi = -(2**31), 2**31 - 1
    qw = torch.randint(lo, hi, (*lead, out_f, in_f // 8), dtype=torch.int32, device=device)
    qz = torch.randint(lo, hi, (*lead, in_f // g, out_f // 8), dtype=torch.int32, device=device)
    s = (torch.rand(*lead, in_f // g, out_f, device=device) * scale + scale / 20).to(torch.float16)
    return AWQPacked(qw, qz, s, in_f, out_f, g)


def awq_bytes(p: AWQPacked, n_matrices: int = 1) -> float:
    n, k, g = p.out_features, p.in_features, p.group_size
    return n_matrices * (n * k / 2 + (k // g) * n * (2 + 0.5))


def expert_slice(p: AWQPacked, e: int) -> AWQPacked:
    return AWQPacked(p.qweight[e], p.qzeros[e], p.scales[e], p.in_features, p.out_features, p.group_size)


def torch_awq_moe_loop(x: torch.Tensor, w: AWQMoEWeights, tw: torch.Tensor, ti: torch.Tensor) -> torch.Tensor:
    """Baseline: per touched expert, dequantize then matmul (what an unfused engine does)."""
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    I = w.intermediate_size
    ids = ti.long()
    for e in torch.unique(ids).tolist():
        tok, slot = torch.nonzero(ids == e, as_tuple=True)
        h = x[tok] @ expert_slice(w.w13, e).dequantize(x.dtype).t()
        a = torch.nn.functional.silu(h[:, :I]) * h[:, I:]
        y = a @ expert_slice(w.w2, e).dequantize(x.dtype).t()
        out.index_add_(0, tok, y.float() * tw[tok, slot, None])
    return out.to(x.dtype)


def make_int4pack_baseline(p: AWQPacked, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """`aten._weight_int4pack_mm` (tinygemm) on the same weights, bf16; None if unavailable."""
    if device.type != "cuda":
        return None
    try:
        from hubdeploy.kernels.awq import unpack_int4_natural

        q = unpack_int4_natural(p.qweight).to(torch.int32)  # [N, K]
        packed_u8 = ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8)
        w4 = torch.ops.aten._convert_weight_to_int4pack(packed_u8, 8)
        z = unpack_int4_natural(p.qzeros).float()  # [K/g, N]
        s = p.scales.float()
        sz = torch.stack([s, (8 - z) * s], dim=-1).to(torch.bfloat16).contiguous()  # w = (q-8)s + (8-z)s
        g = p.group_size

        def fn(x: torch.Tensor) -> torch.Tensor:
            return torch.ops.aten._weight_int4pack_mm(x.to(torch.bfloat16), w4, g, sz)

        x = torch.randn(4, p.in_features, device=device, dtype=torch.float16)
        ref = awq_linear_ref(x.to(torch.bfloat16).to(torch.float16), p).float()
        got = fn(x).float()
        if (got - ref).abs().max() > 0.05 * ref.abs().max() + 1e-3:
            print("  note: _weight_int4pack_mm disagrees with the reference; baseline dropped", file=sys.stderr)
            return None
        return fn
    except Exception as exc:  # not built for this device / torch version
        print(f"  note: _weight_int4pack_mm unavailable ({type(exc).__name__}: {str(exc)[:80]})", file=sys.stderr)
        return None


# ----------------------------------------------------------------------------- benches


def bench_awq_linear(shape: Shape, ms_list: list[int], dev: torch.device, bw: float, peak: float,
                     triton_on: bool, which: str = "w13") -> list[Row]:
    """`which`: "w13" = one expert's gate|up GEMM (the biggest AWQ linear), "o" = o_proj."""
    K, N = (shape.hidden, 2 * shape.inter) if which == "w13" else (shape.attn_out[0], shape.hidden)
    p = random_packed(N, K, shape.group, dev)
    kernel = f"awq_linear_{which}"
    int4mm = make_int4pack_baseline(p, dev)
    dense_w = p.dequantize(torch.float16)
    rows = []
    for M in ms_list:
        x = torch.randn(M, K, device=dev, dtype=torch.float16)
        base = {
            "torch_dequant_mm": bench(lambda: x @ p.dequantize(torch.float16).t(), dev),
            "fp16_dense_mm": bench(lambda: x @ dense_w.t(), dev),
        }
        if int4mm is not None:
            base["int4pack_mm"] = bench(lambda: int4mm(x), dev)
        if triton_on:
            ms = bench(lambda: awq_linear_triton(x, p), dev)
            note = f"BLOCK_M={awq_config(M, N, K, p.group_size, dev)['BLOCK_M']}"
            if M <= 4:  # the other small-M design, to check the M-based choice
                base["triton_dot16"] = bench(lambda: awq_linear_triton(x, p, BLOCK_M=16, BLOCK_N=64), dev)
        else:
            ms = bench(lambda: awq_linear_ref(x, p), dev)
            note = "reference (cached dequant); no Triton"
        nbytes = awq_bytes(p) + 2 * M * (K + N)
        flops = 2 * M * N * K
        rows.append(_row(kernel, shape, M, ms, nbytes, flops, bw, peak, base, note))
    return rows


def _row(kernel: str, shape: Shape, M: int, ms: float, nbytes: float, flops: float, bw: float, peak: float,
         base: dict[str, float], note: str = "") -> Row:
    s = ms / 1000
    r = Row(kernel, shape.name, M, ms, nbytes / s / 1e9, nbytes / s / bw, flops / s / 1e12, flops / s / peak, base, note)
    # progress on stderr, so a run cut short by a timeout still leaves its numbers
    print(f"  {kernel} {shape.name} M={M}: {ms:.4f} ms, {100 * r.bw_frac:.1f}% bw, "
          + " ".join(f"{k}={v:.4f}ms" for k, v in base.items()), file=sys.stderr, flush=True)
    return r


def bench_moe(shape: Shape, ms_list: list[int], dev: torch.device, bw: float, peak: float, triton_on: bool,
              dense_too: bool) -> list[Row]:
    H, I, E, k, g = shape.hidden, shape.inter, shape.experts, shape.top_k, shape.group
    w = AWQMoEWeights(random_packed(2 * I, H, g, dev, E), random_packed(H, I, g, dev, E))
    dense = None
    if dense_too:
        dense = MoEWeights(w.w13.dequantize(torch.float16), w.w2.dequantize(torch.float16))
    per_expert_bytes = awq_bytes(w.w13) + awq_bytes(w.w2)
    rows = []
    for M in ms_list:
        x = torch.randn(M, H, device=dev, dtype=torch.float16)
        tw, ti = topk_route(torch.randn(M, E, device=dev), k, shape.renormalize)
        touched = int(torch.unique(ti).numel())
        act_bytes = 2 * M * H * 2 + M * k * (3 * I + H) * 2
        flops = 2 * M * k * 3 * I * H
        base = {"torch_dequant_loop": bench(lambda: torch_awq_moe_loop(x, w, tw, ti), dev)}
        if dense is not None:
            base["fp16_torch_loop"] = bench(lambda: fused_moe_ref(x, dense, tw, ti), dev)
            if triton_on:
                base["fp16_fused_triton"] = bench(lambda: fused_moe_triton(x, dense, tw, ti), dev)
        if triton_on:
            ms = bench(lambda: fused_moe_triton(x, w, tw, ti), dev)
            if M * k <= 2 * E:  # GEMV-shaped blocks vs the default BLOCK_M=16 tl.dot
                base["triton_gemv_bm4"] = bench(lambda: fused_moe_triton(x, w, tw, ti, BLOCK_M=4, BLOCK_N=32), dev)
            note = f"{touched} experts touched"
        else:
            ms = bench(lambda: fused_moe_ref(x, w, tw, ti), dev)
            note = f"reference; {touched} experts touched"
        rows.append(_row("fused_moe_awq", shape, M, ms, touched * per_expert_bytes + act_bytes, flops, bw, peak, base, note))
    return rows


def bench_decode_step(shape: Shape, batches: list[int], dev: torch.device, bw: float, triton_on: bool) -> list[dict[str, Any]]:
    """One decode step through all layers' AWQ projections + router + MoE + lm_head."""
    H, I, E, k, g = shape.hidden, shape.inter, shape.experts, shape.top_k, shape.group
    qo, kv = shape.attn_out
    layers = []
    sc = 2e-4  # small weights keep 32 residual layers (no norms here) finite in fp16
    for _ in range(shape.layers):
        layers.append(dict(
            q=random_packed(qo, H, g, dev, scale=sc), k=random_packed(kv, H, g, dev, scale=sc),
            v=random_packed(kv, H, g, dev, scale=sc), o=random_packed(H, qo, g, dev, scale=sc),
            router=torch.randn(E, H, device=dev, dtype=torch.float16) * 0.02,
            moe=AWQMoEWeights(random_packed(2 * I, H, g, dev, E, scale=sc), random_packed(H, I, g, dev, E, scale=sc)),
        ))
    lm_head = torch.randn(shape.vocab, H, device=dev, dtype=torch.float16) * 0.02
    lin = awq_linear_triton if triton_on else awq_linear_ref
    moe = fused_moe_triton if triton_on else fused_moe_ref
    out = []
    for B in batches:
        x0 = torch.randn(B, H, device=dev, dtype=torch.float16)
        routes = [topk_route(x0 @ L["router"].t(), k, shape.renormalize) for L in layers]

        def step() -> torch.Tensor:
            h = x0
            for L in layers:
                q = lin(h, L["q"])  # attention itself is not modelled: q stands in for its output
                lin(h, L["k"])
                lin(h, L["v"])
                h = h + lin(q, L["o"])
                tw, ti = topk_route(h @ L["router"].t(), k, shape.renormalize)
                h = h + moe(h, L["moe"], tw, ti)
            return h @ lm_head.t()

        finite = bool(torch.isfinite(step()).all())
        ms = bench(step, dev, rep_ms=200)
        graph_ms: float | None = None
        if dev.type == "cuda":
            try:
                from triton.testing import do_bench_cudagraph

                graph_ms = float(do_bench_cudagraph(step, rep=200))
            except Exception as exc:
                print(f"  note: CUDA graph capture failed ({type(exc).__name__}: {str(exc)[:80]})", file=sys.stderr)
        # bytes that must be read: attention weights, the experts the routing touches, lm_head
        attn = sum(awq_bytes(L[n]) for L in layers for n in "qkvo")
        per_expert = awq_bytes(layers[0]["moe"].w13) + awq_bytes(layers[0]["moe"].w2)
        experts = sum(int(torch.unique(r[1]).numel()) for r in routes) * per_expert
        nbytes = attn + experts + lm_head.numel() * 2
        best = ms if graph_ms is None else min(ms, graph_ms)
        out.append(dict(shape=shape.name, batch=B, eager_ms=ms, graph_ms=graph_ms, gbytes=nbytes / 1e9,
                        roofline_ms=nbytes / bw * 1000, frac_of_roofline=(nbytes / bw * 1000) / best,
                        tok_per_s=B / (best / 1000), finite=finite))
    del layers
    return out


# ----------------------------------------------------------------------------- main


def print_table(rows: list[Row], steps: list[dict[str, Any]], bw: float, peak: float, dev: torch.device) -> None:
    print(f"\n# device {torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu'}; "
          f"copy bandwidth {bw / 1e9:.0f} GB/s (read+write); matmul peak {peak / 1e12:.3f} TFLOP/s")
    print(f"{'kernel':<18}{'shape':<15}{'M':>6}{'ms':>10}{'GB/s':>9}{'%bw':>6}{'TFLOP/s':>9}{'%pk':>6}  speed-up vs baselines")
    for r in rows:
        sp = " ".join(f"{k}={v:.2f}x" for k, v in r.speedups().items())
        print(f"{r.kernel:<18}{r.shape:<15}{r.M:>6}{r.ms:>10.4f}{r.gbps:>9.1f}{100 * r.bw_frac:>6.1f}"
              f"{r.tflops:>9.2f}{100 * r.peak_frac:>6.1f}  {sp} {r.note}")
    if steps:
        print("\n# decode step (projections + router + MoE + lm_head; no attention/norms); roofline = bytes read / copy bw")
        print(f"{'shape':<15}{'batch':>6}{'eager ms':>10}{'graph ms':>10}{'GB read':>9}{'roof ms':>9}{'%roof':>7}{'tok/s':>9}")
        for s in steps:
            print(f"{s['shape']:<15}{s['batch']:>6}{s['eager_ms']:>10.3f}{(s['graph_ms'] if s['graph_ms'] is not None else float('nan')):>10.3f}{s['gbytes']:>9.2f}"
                  f"{s['roofline_ms']:>9.3f}{100 * s['frac_of_roofline']:>7.1f}{s['tok_per_s']:>9.1f}")


def dump(path: str | None, dev: torch.device, bw: float, peak: float, triton_on: bool, rows: list[Row],
         steps: list[dict[str, Any]]) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(dict(device=str(dev), copy_bw=bw, matmul_peak=peak, triton=triton_on,
                           rows=[{**asdict(r), "speedups": r.speedups()} for r in rows], decode_steps=steps), f, indent=1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (proves the script runs)")
    ap.add_argument("--interp", action="store_true", help="with --smoke: also run the Triton interpreter")
    ap.add_argument("--ms", default="1,4,16,64,256,2048", help="comma-separated M values")
    ap.add_argument("--shapes", default="mixtral,qwen3", help="mixtral,qwen3")
    ap.add_argument("--decode-batches", default="1,8,64", help="batches for the decode-step estimate ('' = skip)")
    ap.add_argument("--no-dense", action="store_true", help="skip the fp16 dense MoE baselines")
    ap.add_argument("--json", dest="json_out", help="write all rows here")
    args = ap.parse_args(argv)

    smoke = args.smoke or not torch.cuda.is_available()
    dev = torch.device("cpu" if smoke else "cuda")
    triton_on = dev.type == "cuda" or args.interp
    torch.manual_seed(0)
    if smoke:
        shapes, ms_list, batches = [TINY], [1, 4, 16], [1, 8]
        if not args.smoke:
            print("no CUDA device: running the --smoke shapes on the CPU", file=sys.stderr)
    else:
        pick = {"mixtral": MIXTRAL, "qwen3": QWEN3}
        shapes = [pick[s] for s in args.shapes.split(",") if s]
        ms_list = [int(m) for m in args.ms.split(",") if m]
        batches = [int(b) for b in args.decode_batches.split(",") if b]
    bw, peak = measure_copy_bw(dev), measure_matmul_peak(dev)
    rows: list[Row] = []
    for sh in shapes:
        t = time.time()
        rows += bench_awq_linear(sh, ms_list, dev, bw, peak, triton_on, "w13")
        rows += bench_awq_linear(sh, ms_list, dev, bw, peak, triton_on, "o")
        rows += bench_moe(sh, ms_list, dev, bw, peak, triton_on, dense_too=not args.no_dense)
        print(f"  {sh.name}: {time.time() - t:.1f}s", file=sys.stderr)
        dump(args.json_out, dev, bw, peak, triton_on, rows, [])
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    steps: list[dict[str, Any]] = []
    if batches:
        step_shape = TINY if smoke else MIXTRAL
        steps = bench_decode_step(step_shape, batches, dev, bw, triton_on)
    dump(args.json_out, dev, bw, peak, triton_on, rows, steps)
    print_table(rows, steps, bw, peak, dev)
    return 0


if __name__ == "__main__":
    sys.exit(main())
