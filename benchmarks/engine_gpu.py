"""End-to-end serving latency of our engine at full Mixtral-8x7B-AWQ shapes, random weights.

TTFT for 128/1024/4096-token prompts (batch 1) and TPOT (one steady-state decode step) at
batch 1/8/64, through the real `LLMEngine` (scheduler, runner, sampler, detokenizer), with
CUDA graphs off (`enforce_eager=True`) and on, against the bandwidth roofline of a decode
step: bytes it must read (AWQ attention weights + the experts routing touches,
E·(1−(1−k/E)^B) per layer + router + fp16 lm_head + the batch's KV cache) / copy bandwidth
measured here (1 GiB `copy_`, read + write counted, as benchmarks/kernels.py does).

No checkpoint: `random_awq_model` draws every tensor a Hub AWQ checkpoint would hold
(qweight/qzeros int32, fp16 scales, plain norms/router/embeddings/lm_head) on the device, in
the loader's plan order, and installs them with the loader's own finishing step
(`serving.loader._finish`: concatenate fused parts, `awq_repack` / `awq_moe_repack`), so the
layout is exactly what `load_model` gives. Prompts are token ids; every request runs with
`ignore_eos`, greedy.

    PYTHONPATH=. python benchmarks/engine_gpu.py                 # CUDA, 32 layers (~25 GB)
    PYTHONPATH=. python benchmarks/engine_gpu.py --layers 8      # cut the model (per-layer cost is the same)
    PYTHONPATH=. python benchmarks/engine_gpu.py --smoke         # tiny config on the CPU, same code
    PYTHONPATH=. python benchmarks/engine_gpu.py --json out.json
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import signal
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # for _common, also when loaded by path
from _common import MIXTRAL_8X7B, use_source_tree  # noqa: E402

use_source_tree()

import torch  # noqa: E402

from hubdeploy.serving.config import ModelConfig  # noqa: E402
from hubdeploy.serving.engine import EngineArgs, LLMEngine  # noqa: E402
from hubdeploy.serving.loader import AWQ_FORMAT, Slot, _finish, _Pending, build_plan, resolve_dtype  # noqa: E402
from hubdeploy.serving.models import CausalLM, MoE, build_model  # noqa: E402
from hubdeploy.serving.models.layers import Linear  # noqa: E402
from hubdeploy.serving.sampling_params import SamplingParams  # noqa: E402
from hubdeploy.serving.tokenizer import Tokenizer  # noqa: E402

TINY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, num_local_experts=4, num_experts_per_tok=2, vocab_size=512)


def mixtral_config_dict(shape: dict[str, int], layers: int | None = None, group: int = 128) -> dict[str, Any]:
    """A Hub `config.json` (MixtralForCausalLM, AutoAWQ GEMM 4-bit) for `shape`."""
    cfg: dict[str, Any] = dict(
        shape, architectures=["MixtralForCausalLM"], model_type="mixtral", rms_norm_eps=1e-5, rope_theta=1e6,
        max_position_embeddings=32768, tie_word_embeddings=False, torch_dtype="float16",
        quantization_config={"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True,
                             "version": "gemm"})
    if layers:
        cfg["num_hidden_layers"] = layers
    return cfg


# ----------------------------------------------------------------------------- random model


def random_checkpoint(model: CausalLM, group: int, seed: int = 0) -> Iterator[tuple[str, Slot, torch.Tensor]]:
    """Every tensor a Hub AWQ checkpoint of `model` holds, random, in the loader's plan order.

    Values are drawn on the model's device with a seeded generator (same seed, same tensors):
    qweight/qzeros uniform int32 (all nibbles), scales ≈ 0.1/√in (so activations stay O(1)),
    norms 1, other float tensors N(0, 1/in).
    """
    dev = next(model.parameters()).device
    gen = torch.Generator(device=dev).manual_seed(seed)
    for name, slot in build_plan(model, group, tied=False).items():
        if slot.leaf in ("qweight", "qzeros"):
            t = torch.randint(-2**31, 2**31 - 1, slot.shape, dtype=torch.int32, device=dev, generator=gen)
        elif slot.leaf == "scales":
            n_in = slot.shape[0] * group
            t = (0.5 + torch.rand(slot.shape, device=dev, generator=gen)) * (0.1 / math.sqrt(n_in))
            t = t.to(torch.float16)
        elif "norm" in name:
            t = torch.ones(slot.shape, device=dev)
        elif name.endswith(".bias"):
            t = torch.zeros(slot.shape, device=dev)
        else:
            t = torch.randn(slot.shape, device=dev, generator=gen) / math.sqrt(slot.shape[-1])
        yield name, slot, t


@torch.no_grad()
def random_awq_model(cfg: ModelConfig, device: torch.device | str, dtype: torch.dtype | None = None,
                     seed: int = 0) -> CausalLM:
    """Our decoder for an AWQ `cfg` with random weights made on `device`, laid out as `load_model`'s.

    AWQ parts are installed the way the loader streams them: each fused module (qkv, o, one
    layer's experts) is finished (concatenated + repacked) as soon as its parts are drawn,
    so peak extra memory is one layer's raw experts.
    """
    device = torch.device(device)
    if cfg.quant is None or not cfg.quant.is_awq:
        raise ValueError("random_awq_model needs an AWQ config (quantization_config.quant_method='awq')")
    group = int(cfg.quant.group_size)
    dtype = dtype or resolve_dtype(None, cfg, device)  # the engine's "auto"
    model = build_model(cfg, dtype, device)
    pending: dict[int, _Pending] = {}
    for m in model.modules():
        if isinstance(m, Linear) and m.quantized:
            pending[id(m)] = _Pending(needed=3 * len(m.hf_parts))
        elif isinstance(m, MoE) and m.quantized:
            pending[id(m)] = _Pending(needed=9 * m.num_experts)
    for _, slot, t in random_checkpoint(model, group, seed):
        if slot.kind in ("param", "linear", "moe"):
            slot.target.copy_(t)
            continue
        pend = pending[id(slot.target)]
        pend.got.setdefault(slot.part, {})[slot.leaf] = t
        pend.count += 1
        if pend.count == pend.needed:
            _finish(slot.target, pend, group, AWQ_FORMAT, Path("<random weights>"))
            del pending[id(slot.target)]
    if pending:
        raise RuntimeError(f"{len(pending)} AWQ module(s) left without weights (plan and model disagree)")
    return model.eval()


def id_tokenizer(vocab_size: int) -> Tokenizer:
    """A real `Tokenizer` over `vocab_size` word-level tokens `<i>`, no EOS: the engine's
    detokenizer runs as in serving, prompts are token ids."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    tok = HFTokenizer(models.WordLevel({f"<{i}>": i for i in range(vocab_size)}, unk_token="<0>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return Tokenizer(tok, {})


# ----------------------------------------------------------------------------- roofline


def measure_copy_bw(device: torch.device) -> float:
    """Device copy bandwidth in bytes/s, read + write counted (1 GiB on CUDA, 64 MiB on the CPU)."""
    n = (1 << 30) if device.type == "cuda" else (1 << 26)
    a = torch.empty(n, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    times = []
    for i in range(12):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        b.copy_(a)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= 2:
            times.append(time.perf_counter() - t)
    del a, b
    return 2 * n / statistics.median(times)


def awq_bytes(n_in: int, n_out: int, group: int) -> int:
    """Packed 4-bit weights + fp16 scales + int32-packed zeros of one AWQ linear."""
    g = n_in // group
    return n_in * n_out // 2 + g * n_out * 2 + g * (n_out // 8) * 4


def decode_step_bytes(cfg: ModelConfig, batch: int, context: float, elem: int = 2) -> dict[str, float]:
    """Bytes one decode step must read at `batch` sequences of mean length `context`.

    Experts: the expected number touched when each of `batch` tokens picks top-k of E
    uniformly (P(an expert is missed by one token) = 1 − k/E; 0.75 for Mixtral).
    `elem`: bytes of a plain (non-AWQ) element, i.e. of the compute dtype.
    """
    g = int(cfg.quant.group_size)
    H, L, E, k = cfg.hidden_size, cfg.num_hidden_layers, cfg.num_experts, cfg.num_experts_per_tok
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    attn = awq_bytes(H, q + 2 * kv, g) + awq_bytes(q, H, g)
    router = H * E * elem
    per_expert = awq_bytes(H, 2 * cfg.moe_intermediate_size, g) + awq_bytes(cfg.moe_intermediate_size, H, g)
    touched = E * (1 - (1 - k / E) ** batch)
    lm_head = cfg.vocab_size * H * elem
    kv_bytes = batch * context * L * 2 * kv * elem
    out = dict(attention=L * attn, router=L * router, experts=L * touched * per_expert, lm_head=lm_head,
               kv_cache=kv_bytes, experts_touched=touched)
    out["total"] = out["attention"] + out["router"] + out["experts"] + lm_head + kv_bytes
    return out


# ----------------------------------------------------------------------------- the engine


def build_engine(model: CausalLM, cfg: ModelConfig, tok: Tokenizer, device: torch.device, eager: bool,
                 max_model_len: int, max_num_seqs: int, kv_cache_tokens: int, budget: int | None) -> LLMEngine:
    """An `LLMEngine` serving `model` (prefix caching off: repeated prompts must not hit it; no LoRA)."""
    kw: dict[str, Any] = {} if budget is None else dict(max_num_batched_tokens=budget)
    args = EngineArgs(model="random-awq", device=str(device), max_model_len=max_model_len,
                      max_num_seqs=max_num_seqs, kv_cache_tokens=kv_cache_tokens, enable_prefix_caching=False,
                      enforce_eager=eager, max_loras=0, **kw)
    return LLMEngine(args, model=model, model_config=cfg, tokenizer=tok)


def _drain(engine: LLMEngine, max_steps: int = 100_000) -> None:
    for rid in list(engine.seqs):
        engine.abort_request(rid)
    for _ in range(max_steps):
        if not engine.has_unfinished():
            return
        engine.step()
    raise RuntimeError("engine did not drain")


def time_ttft(engine: LLMEngine, prompt_len: int, iters: int, gen: torch.Generator, tag: str) -> list[float]:
    """Seconds from `add_request` to the first token of one `prompt_len`-token request (after one warm-up)."""
    vocab = engine.model_config.vocab_size
    out: list[float] = []
    for i in range(iters + 1):
        ids = torch.randint(0, vocab, (prompt_len,), generator=gen).tolist()
        rid = f"ttft-{tag}-{prompt_len}-{i}"
        t0 = time.perf_counter()
        engine.add_request(rid, ids, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
        for _ in range(prompt_len + 8):  # chunked prefill: ceil(len / budget) steps
            if any(o.request_id == rid and o.token_ids for o in engine.step()):
                break
        else:
            raise RuntimeError(f"no first token for a {prompt_len}-token prompt")
        dt = time.perf_counter() - t0
        _drain(engine)
        if i:
            out.append(dt)
    return out


def time_tpot(engine: LLMEngine, batch: int, prompt_len: int, warmup: int, steps: int,
              gen: torch.Generator, tag: str) -> tuple[list[float], float]:
    """Seconds per decode step with `batch` sequences all decoding (after prefill and `warmup`
    steps), and their mean context length over the timed steps."""
    vocab = engine.model_config.vocab_size
    rids = [f"tpot-{tag}-{batch}-{i}" for i in range(batch)]
    # early sequences decode while later ones prefill (chunked): room for those tokens too
    prefill_steps = -(-batch * prompt_len // engine.args.max_num_batched_tokens) + 2
    params = SamplingParams(max_tokens=prefill_steps + warmup + steps + 4, temperature=0.0, ignore_eos=True)
    for rid in rids:
        engine.add_request(rid, torch.randint(0, vocab, (prompt_len,), generator=gen).tolist(), params)
    started: set[str] = set()
    for _ in range(batch * prompt_len + 8):
        started |= {o.request_id for o in engine.step() if o.token_ids}
        if len(started) == batch:
            break
    else:
        raise RuntimeError(f"batch {batch}: prefill never finished")
    times: list[float] = []
    lens: list[float] = []
    for i in range(warmup + steps):
        if i >= warmup:
            lens.append(statistics.fmean(len(engine.seqs[r].token_ids) + 1 for r in rids))
        t0 = time.perf_counter()
        outs = engine.step()
        dt = time.perf_counter() - t0
        if len(outs) != batch or any(len(o.delta_token_ids) != 1 for o in outs):
            raise RuntimeError(f"batch {batch}: a decode step produced {len(outs)} outputs; the batch is not "
                               "all decoding (KV cache too small? max_num_seqs?)")
        if i >= warmup:
            times.append(dt)
    _drain(engine)
    return times, statistics.fmean(lens)


# ----------------------------------------------------------------------------- main


def run(args: argparse.Namespace, result: dict[str, Any]) -> dict[str, Any]:
    """Measure into `result` (filled as it goes, so a run stopped early still has its rows)."""
    result.setdefault("notes", [])
    dev = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    shape = TINY if args.smoke else MIXTRAL_8X7B
    cfg = ModelConfig.from_dict(mixtral_config_dict(shape, args.layers, args.group))
    prompts = [int(p) for p in args.prompts.split(",") if p]
    batches = [int(b) for b in args.batches.split(",") if b]
    modes = [m for m in args.modes.split(",") if m]
    if dev.type != "cuda":
        modes = [m for m in modes if m == "eager"] or ["eager"]  # CUDA graphs need CUDA
    t_start = time.perf_counter()
    bw = measure_copy_bw(dev)
    t = time.perf_counter()
    model = random_awq_model(cfg, dev, seed=args.seed)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    build_s = time.perf_counter() - t
    elem = next(model.parameters()).element_size()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    for m in model.modules():
        packed = [getattr(m, "packed", None)] if isinstance(m, Linear) else (
            [m.weights.w13, m.weights.w2] if isinstance(m, MoE) and m.quantized else [])
        for pk in packed:
            if pk is not None:
                weight_bytes += sum(x.numel() * x.element_size() for x in (pk.qweight, pk.qzeros, pk.scales))
    max_model_len = max(prompts + [args.decode_prompt]) + args.warmup_steps + args.steps + 96
    kv_tokens = max(max(batches, default=1) * (args.decode_prompt + args.warmup_steps + args.steps + 64),
                    max(prompts, default=0) + 64, max_model_len)
    gen = torch.Generator().manual_seed(args.seed)
    result.update(
        device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})",
        torch=torch.__version__, copy_bw=bw, layers=cfg.num_hidden_layers, shape="tiny" if args.smoke else "mixtral-8x7b-awq",
        weight_bytes=weight_bytes, model_build_s=build_s, max_num_batched_tokens=None, kv_cache_tokens=kv_tokens,
        decode_prompt=args.decode_prompt, ttft=[], tpot=[])

    def out_of_time(what: str) -> bool:
        if args.deadline_s is None or time.perf_counter() - t_start < args.deadline_s:
            return False
        result["notes"].append(f"--deadline-s {args.deadline_s:g} reached: skipped {what}")
        print(f"  deadline reached: skipping {what}", file=sys.stderr)
        return True

    for mode in modes:
        if out_of_time(f"mode {mode}"):
            continue
        t = time.perf_counter()
        engine = build_engine(model, cfg, id_tokenizer(cfg.vocab_size), dev, mode == "eager", max_model_len,
                              max(batches, default=1), kv_tokens, args.max_num_batched_tokens)
        result["max_num_batched_tokens"] = engine.args.max_num_batched_tokens
        graphs = sorted(engine.runner.graphs)
        if mode == "graphs" and not graphs:
            result["notes"].append("CUDA graph capture failed: the 'graphs' rows ran eagerly (see the log)")
        result.setdefault("engine_build_s", {})[mode] = time.perf_counter() - t
        for p in prompts:
            if out_of_time(f"{mode} TTFT {p}"):
                continue
            ts = time_ttft(engine, p, args.ttft_iters, gen, mode)
            result["ttft"].append(dict(mode=mode, prompt=p, ms=1000 * statistics.median(ts),
                                       all_ms=[1000 * x for x in ts], prefill_tok_s=p / statistics.median(ts)))
            print(f"  {mode} TTFT {p}: {1000 * statistics.median(ts):.2f} ms", file=sys.stderr)
        for b in batches:
            if out_of_time(f"{mode} TPOT batch {b}"):
                continue
            ts, ctx = time_tpot(engine, b, args.decode_prompt, args.warmup_steps, args.steps, gen, mode)
            ms = 1000 * statistics.median(ts)
            nb = decode_step_bytes(cfg, b, ctx, elem)
            roof = nb["total"] / bw * 1000
            result["tpot"].append(dict(mode=mode, batch=b, ms=ms, all_ms=[1000 * x for x in ts],
                                       tok_s=b / (ms / 1000), context=ctx, gbytes=nb["total"] / 1e9,
                                       bytes=nb, roofline_ms=roof, pct_roofline=100 * roof / ms,
                                       graph=mode == "graphs" and b <= max(graphs, default=0)))
            print(f"  {mode} TPOT batch {b}: {ms:.3f} ms/step (roofline {roof:.3f} ms)", file=sys.stderr)
        del engine
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return result


def print_table(r: dict[str, Any]) -> None:
    if "copy_bw" not in r:
        print(f"\n# engine end-to-end: no numbers ({'; '.join(r.get('notes', []))})")
        return
    print(f"\n# engine end-to-end: {r['shape']}, {r['layers']} layers, random weights; device {r['device']}; "
          f"copy bw {r['copy_bw'] / 1e9:.1f} GB/s; weights {r['weight_bytes'] / 1e9:.3g} GB "
          f"(built in {r['model_build_s']:.1f} s); prefill budget {r['max_num_batched_tokens']} tokens/step; "
          f"{r['total_s']:.0f} s in all")
    print(f"{'TTFT (batch 1)':<16}{'mode':<8}{'ms':>10}{'prefill tok/s':>15}")
    for x in r["ttft"]:
        print(f"{'prompt ' + str(x['prompt']):<16}{x['mode']:<8}{x['ms']:>10.2f}{x['prefill_tok_s']:>15.0f}")
    print(f"\n# TPOT = one decode step, prompt {r['decode_prompt']}; roofline = bytes read "
          "(AWQ attention + touched experts + router + fp16 lm_head + KV) / copy bw")
    print(f"{'batch':>6}  {'mode':<8}{'ms/step':>9}{'tok/s':>9}{'ctx':>6}{'experts':>8}{'GB read':>9}"
          f"{'roof ms':>9}{'%roof':>7}")
    for x in r["tpot"]:
        print(f"{x['batch']:>6}  {x['mode']:<8}{x['ms']:>9.3f}{x['tok_s']:>9.1f}{x['context']:>6.0f}"
              f"{x['bytes']['experts_touched']:>8.2f}{x['gbytes']:>9.3f}{x['roofline_ms']:>9.3f}{x['pct_roofline']:>7.1f}")
    for n in r["notes"]:
        print(f"note: {n}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny config on the CPU (what the tests run)")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: all of the config's)")
    ap.add_argument("--group", type=int, default=128, help="AWQ group size")
    ap.add_argument("--prompts", default=None, help="TTFT prompt lengths (default 128,1024,4096; smoke 16,64)")
    ap.add_argument("--batches", default="1,8,64", help="TPOT batch sizes")
    ap.add_argument("--modes", default="eager,graphs", help="eager and/or graphs (CUDA graphs; CUDA only)")
    ap.add_argument("--decode-prompt", type=int, default=128, help="prompt length of the TPOT sequences")
    ap.add_argument("--steps", type=int, default=None, help="timed decode steps per batch (default 12; smoke 4)")
    ap.add_argument("--warmup-steps", type=int, default=2, help="untimed decode steps before them")
    ap.add_argument("--ttft-iters", type=int, default=2, help="timed requests per prompt length (after one warm-up)")
    ap.add_argument("--max-num-batched-tokens", type=int, default=None,
                    help="prefill token budget per step (default: EngineArgs'; longer prompts are chunked)")
    ap.add_argument("--deadline-s", type=float, default=None,
                    help="skip the measurements not started after this many seconds (partial table, noted)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write every number here")
    args = ap.parse_args(argv)
    if args.prompts is None:
        args.prompts = "16,64" if args.smoke else "128,1024,4096"
    if args.steps is None:
        args.steps = 4 if args.smoke else 12
    if args.smoke and args.layers is None:
        args.layers = TINY["num_hidden_layers"]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("no CUDA device: running --smoke (tiny config, CPU)", file=sys.stderr)
        args = parse_args([*(argv if argv is not None else sys.argv[1:]), "--smoke"])
    if args.smoke:
        torch.set_num_threads(1)
    r: dict[str, Any] = {"notes": []}
    t0 = time.perf_counter()

    def on_term(signum: int, frame: Any) -> None:
        raise TimeoutError(f"signal {signum} (the check's timeout?)")

    main_thread = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGTERM, on_term) if main_thread else None  # a timeout still gets the table
    rc = 0
    try:
        run(args, r)
    except TimeoutError as e:
        r["notes"].append(f"stopped early by {e}: the rows above are what was measured")
    except Exception as e:  # a benchmark prints what it has, then fails
        import traceback

        traceback.print_exc()
        r["notes"].append(f"failed: {type(e).__name__}: {e}")
        rc = 1
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, old)
    r["total_s"] = time.perf_counter() - t0
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=1)
    print_table(r)
    return rc


if __name__ == "__main__":
    sys.exit(main())
