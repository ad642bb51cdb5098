"""Multi-LoRA cost: decode and prefill throughput with 0, 1, 4 and 16 distinct adapters in
the batch, relative to the base model alone, same script, same process, same machine.

A Mixtral-architecture `CausalLM` (ours) with random AWQ weights, a `LoRAManager` with 16
device slots holding rank-16 adapters on attention q/k/v/o and on every expert's
w1/w3/w2, and one forward per step over a batch of B sequences (decode: one token each at
context C; prefill: P tokens each). "base" runs with no LoRA context at all; "0" has the
manager installed and every request on the base model (the step builds no LoRA batch);
"1/4/16" spread the B requests round-robin over that many adapters. The time of a step
includes building its LoRA batch (token -> slot map, segments), as in the engine.

On CUDA the decode step is also timed as the engine runs it: a CUDA graph per step kind,
captured once over static inputs ("decode/graph" rows: "base" = the base-only graph; 1/4/16 =
one LoRA graph over a static `LoRABatch` whose slot buffer each step rewrites in place, after
building the step's LoRA batch as the engine does). Ratios compare within a phase. On the CPU
`--static` adds the same rows run eagerly (no graphs there): a check of the graph-safe path.

    PYTHONPATH=. python benchmarks/lora.py               # CUDA: Mixtral-8x7B AWQ shapes; CPU: tiny shapes
    PYTHONPATH=. python benchmarks/lora.py --layers 8    # fewer layers (per-layer cost is the same)
    PYTHONPATH=. python benchmarks/lora.py --json out.json

The "decode" and "prefill" rows are eager; the engine replays CUDA graphs for decode steps,
base-only and with adapters alike (`serving/model_runner.py`), which the "decode/graph" rows time.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # for _common, also when loaded by path
from _common import MIXTRAL_8X7B, use_source_tree  # noqa: E402

use_source_tree()

import torch  # noqa: E402

from hubdeploy.serving.config import ModelConfig  # noqa: E402
from hubdeploy.serving.forward_context import ForwardContext  # noqa: E402
from hubdeploy.serving.lora import LoRAManager  # noqa: E402
from hubdeploy.serving.lora.adapter import LoRAAdapter, LoRAConfig, LoRAModuleWeights  # noqa: E402
from hubdeploy.serving.lora.batch import static_lora_batch  # noqa: E402
from hubdeploy.serving.models import MoE, build_model  # noqa: E402
from hubdeploy.serving.models.layers import Linear  # noqa: E402

TINY = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=64, num_local_experts=4, num_experts_per_tok=2, vocab_size=1024)


def model_config(shape: dict[str, int], layers: int | None, group: int) -> ModelConfig:
    cfg = dict(shape, architectures=["MixtralForCausalLM"], model_type="mixtral", rms_norm_eps=1e-5,
               rope_theta=1e6, max_position_embeddings=4096, tie_word_embeddings=False,
               quantization_config={"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True,
                                    "version": "gemm"})
    if layers:
        cfg["num_hidden_layers"] = layers
    return ModelConfig.from_dict(cfg)


def _awq(n_in: int, n_out: int, group: int, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q = torch.randint(-2**31, 2**31 - 1, (n_in, n_out // 8), dtype=torch.int32, device=dev)
    z = torch.randint(-2**31, 2**31 - 1, (n_in // group, n_out // 8), dtype=torch.int32, device=dev)
    s = torch.full((n_in // group, n_out), 2.0 / (16 * n_in**0.5), dtype=torch.float16, device=dev)
    return q, z, s


@torch.no_grad()
def random_model(cfg: ModelConfig, dtype: torch.dtype, dev: torch.device, group: int) -> Any:
    """Our decoder with random AWQ linears/experts and random fp norms, router, embeddings, lm_head."""
    model = build_model(cfg, dtype, dev)
    for m in model.modules():
        if isinstance(m, Linear) and m.quantized:
            m.set_awq(*_awq(m.in_features, m.out_features, group, dev), group)
        elif isinstance(m, MoE) and m.quantized:
            parts = {(e, r): _awq(*((m.hidden, m.inter) if r != "w2" else (m.inter, m.hidden)), group, dev)
                     for e in range(m.num_experts) for r in ("w1", "w3", "w2")}
            m.set_awq(parts, group)
    for name, p in model.named_parameters():
        if p.dtype.is_floating_point:
            p.copy_(torch.ones_like(p) if "norm" in name else torch.randn_like(p) / p.shape[-1] ** 0.5)
    return model


def synthetic_adapters(mgr: LoRAManager, n: int, rank: int, dtype: torch.dtype, dev: torch.device) -> None:
    """`n` rank-`rank` adapters on attention q/k/v/o and all experts (one random set of
    weights shared between them: each still fills its own device slot)."""
    g = torch.Generator(device=dev).manual_seed(0)
    modules = {}
    for name, shape in mgr.targets.items():
        if not any(name.endswith(s) for s in ("q_proj", "k_proj", "v_proj", "o_proj", ".w1", ".w2", ".w3")):
            continue
        a = torch.randn(rank, shape.in_features, generator=g, device=dev, dtype=dtype) / shape.in_features**0.5
        b = torch.randn(shape.out_features, rank, generator=g, device=dev, dtype=dtype) * 0.01
        modules[name] = LoRAModuleWeights(a, b, 2.0)
    cfg = LoRAConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                  "w1", "w2", "w3"])
    for i in range(n):
        mgr.add_adapter(LoRAAdapter(f"r{i}", "synthetic", None, cfg, modules))  # type: ignore[arg-type]


class Step:
    """One batch shape: B sequences feeding `q` tokens each at context `ctx_len` (KV cache ready)."""

    def __init__(self, cfg: ModelConfig, B: int, q: int, ctx_len: int, dtype: torch.dtype, dev: torch.device,
                 block: int = 16) -> None:
        per = -(-ctx_len // block)
        nb = B * per
        shape = (nb, block, cfg.num_key_value_heads, cfg.head_dim)
        self.kv = [(torch.zeros(shape, dtype=dtype, device=dev), torch.zeros(shape, dtype=dtype, device=dev))
                   for _ in range(cfg.num_hidden_layers)]
        self.B, self.q = B, q
        tables = torch.arange(nb, dtype=torch.int32, device=dev).view(B, per)
        start = ctx_len - q
        pos = torch.arange(start, ctx_len, device=dev).repeat(B)
        slots = (tables[:, :, None] * block + torch.arange(block, device=dev)).view(B, -1)[:, start:ctx_len]
        self.ids = torch.randint(0, cfg.vocab_size, (B * q,), device=dev)
        self.pos = pos
        self.ctx_args = dict(
            is_prefill=q > 1, cu_seqlens_q=torch.arange(0, B * q + 1, q, dtype=torch.int32, device=dev),
            context_lens=torch.full((B,), ctx_len, dtype=torch.int32, device=dev), block_tables=tables,
            slot_mapping=slots.reshape(-1).long(), max_seqlen_q=q, max_context_len=ctx_len, kv_caches=self.kv)
        self.last = (torch.arange(B, device=dev) + 1) * q - 1

    def run(self, model: Any, mgr: LoRAManager | None, names: list[str | None] | None) -> None:
        ctx = ForwardContext(**self.ctx_args)
        if mgr is not None and names is not None:
            ctx.lora = mgr.build_batch((n, self.q) for n in names)
        h = model(self.ids, self.pos, ctx)
        model.compute_logits(h[self.last])


class GraphStep:
    """A decode `Step` as the engine replays it: static inputs and, with `lora`, a static LoRA
    batch whose slot buffer each run rewrites in place; captured once into a CUDA graph on
    CUDA, run eagerly on the CPU (there it checks the graph-safe path, it saves nothing)."""

    def __init__(self, step: Step, model: Any, num_slots: int, lora: bool, dev: torch.device) -> None:
        self.step, self.model = step, model
        self.buf = torch.full((step.B,), -1, dtype=torch.int32, device=dev)
        self.ctx = ForwardContext(**step.ctx_args, lora=static_lora_batch(self.buf, num_slots) if lora else None)
        self.graph: Any = None
        if dev.type == "cuda":
            self._forward()  # warm up: Triton compiles and autotunes outside the capture
            torch.cuda.synchronize(dev)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self._forward()
            torch.cuda.synchronize(dev)

    def _forward(self) -> torch.Tensor:
        h = self.model(self.step.ids, self.step.pos, self.ctx)
        return self.model.compute_logits(h[self.step.last])

    def run(self, mgr: LoRAManager, names: list[str | None] | None) -> None:
        if names is not None:  # the engine builds the step's batch, then copies its slots in place
            lb = mgr.build_batch((n, 1) for n in names)
            if lb is None:
                self.buf.fill_(-1)
            else:
                self.buf.copy_(lb.token_slots)
        if self.graph is None:
            self._forward()
        else:
            self.graph.replay()


def timeit_interleaved(fns: dict[str, Callable[[], None]], dev: torch.device, iters: int, warmup: int) -> dict[str, float]:
    """Seconds per call of each fn, timed round-robin (so load spikes on a shared machine hit all
    alike): median of the rounds on CUDA, minimum on the CPU (the least disturbed round)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(iters):
        for k, fn in fns.items():
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            fn()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            times[k].append(time.perf_counter() - t0)
    pick = statistics.median if dev.type == "cuda" else min
    return {k: pick(v) for k, v in times.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: all of the shape)")
    ap.add_argument("--batch", type=int, default=None, help="sequences per step (default 32 on CUDA, 16 on CPU)")
    ap.add_argument("--context", type=int, default=None, help="decode context length (default 512 / 64)")
    ap.add_argument("--prefill", type=int, default=None, help="prefill tokens per sequence (default 128 / 16)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=1, help="repeat the measurement, keep the best (CPU noise)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--static", action="store_true", help="CPU: also time the graph-safe decode path eagerly")
    args = ap.parse_args()
    dev = torch.device("cuda" if (args.device == "auto" and torch.cuda.is_available()) else
                       (args.device if args.device != "auto" else "cpu"))
    cuda = dev.type == "cuda"
    if not cuda:
        torch.set_num_threads(1)  # the shared 2-core box: one thread is the least disturbed
    dtype = torch.float16 if cuda else torch.float32
    shape, group = (MIXTRAL_8X7B, 128) if cuda else (TINY, 64)
    B = args.batch or (32 if cuda else 16)
    C = args.context or (512 if cuda else 64)
    P = args.prefill or (128 if cuda else 16)
    iters = args.iters or (20 if cuda else 10)
    cfg = model_config(shape, args.layers, group)
    t0 = time.perf_counter()
    model = random_model(cfg, dtype, dev, group)
    mgr = LoRAManager(model, max_loras=16, max_lora_rank=args.rank, max_cpu_loras=16, device=dev, dtype=dtype)
    synthetic_adapters(mgr, 16, args.rank, dtype, dev)
    for i in range(16):  # pin all 16 into the device slots once (as running requests would)
        class _Seq:
            seq_id, lora_name = 10_000 + i, f"r{i}"
        mgr.add_user(_Seq)
        assert mgr.acquire(_Seq)
    build_s = time.perf_counter() - t0
    name = torch.cuda.get_device_name(dev) if cuda else f"CPU {platform.processor() or platform.machine()}"
    print(f"# device: {name}; torch {torch.__version__}; threads {torch.get_num_threads()}")
    print(f"# model: Mixtral-arch AWQ g{group}, hidden {cfg.hidden_size}, experts {cfg.num_experts} "
          f"(inter {cfg.moe_intermediate_size}), {cfg.num_hidden_layers} layers, {dtype}; LoRA rank {args.rank} on "
          f"q/k/v/o + experts w1/w3/w2, 16 slots; built in {build_s:.1f}s")
    rows = []
    graph_note = ""
    # rows are printed as each phase finishes (flushed): a run cut short by a timeout keeps them
    print(f"{'phase':13} {'adapters':>8} {'batch':>5} {'tokens':>6} {'ms/step':>9} {'tok/s':>10} {'vs base':>8}",
          flush=True)
    for phase, q, ctx_len in (("decode", 1, C), ("prefill", P, P)):
        step = Step(cfg, B, q, ctx_len, dtype, dev)
        tokens = B * q
        fns: dict[str, Callable[[], None]] = {"base": lambda: step.run(model, None, None)}
        for n in (0, 1, 4, 16):
            names = [None] * B if n == 0 else [f"r{k % n}" for k in range(B)]
            fns[str(n)] = (lambda nm: lambda: step.run(model, mgr, nm))(names)
        if phase == "decode" and (cuda or args.static):
            try:
                g_base, g_lora = GraphStep(step, model, 16, False, dev), GraphStep(step, model, 16, True, dev)
                fns["graph base"] = lambda: g_base.run(mgr, None)
                for n in (1, 4, 16):
                    fns[f"graph {n}"] = (lambda nm: lambda: g_lora.run(mgr, nm))([f"r{k % n}" for k in range(B)])
            except Exception as e:  # report, keep the eager rows
                graph_note = f"# decode/graph rows missing: capture failed: {type(e).__name__}: {e}"
                print(graph_note, file=sys.stderr)
        t = timeit_interleaved(fns, dev, iters, 2)
        for _ in range(args.repeat - 1):  # best of several runs: shared CPUs have long noisy stretches
            more = timeit_interleaved(fns, dev, iters, 1)
            t = {k: min(v, more[k]) for k, v in t.items()}
        for k, sec in t.items():
            graph = k.startswith("graph ")
            base = t["graph base"] if graph else t["base"]
            r = dict(phase=f"{phase}/graph" if graph else phase, adapters=k.removeprefix("graph "), batch=B,
                     tokens=tokens, ms=sec * 1e3, tok_s=tokens / sec, ratio=base / sec)
            rows.append(r)
            print(f"{r['phase']:13} {str(r['adapters']):>8} {r['batch']:>5} {r['tokens']:>6} {r['ms']:>9.2f} "
                  f"{r['tok_s']:>10.1f} {r['ratio']:>8.3f}", flush=True)
    for phase in ("decode", "decode/graph"):
        d16 = next((r for r in rows if r["phase"] == phase and r["adapters"] == "16"), None)
        if d16 is not None:
            print(f"# 16 distinct adapters, {phase}: {d16['ratio']:.2f}x base-only throughput "
                  f"(cost {100 * (1 - d16['ratio']):.0f}%; the GPU target: under 25% with graphs, as the engine runs)")
    if graph_note:
        print(graph_note)
    print("# note: decode/graph = CUDA graphs as the engine replays them (on the CPU: the same static path, eager)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=name, layers=cfg.num_hidden_layers, rank=args.rank, rows=rows), f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
