"""Test helpers: run our decoder with a temporary paged KV cache, and build reference
checkpoints (AWQ-quantized / dequantized copies, LoRA-merged copies) for comparison against
transformers.

`prefill_last_logits` and `greedy_generate` build `ForwardContext`s by hand, the way the
engine's runner does, so model tests need neither scheduler nor runner.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from hubdeploy.kernels.awq_format import awq_dequantize, awq_quantize
from hubdeploy.serving.config import ModelConfig
from hubdeploy.serving.forward_context import ForwardContext


class PagedCache:
    """A paged KV cache for a fixed batch: seq i owns blocks [i*per_seq, (i+1)*per_seq)."""

    def __init__(self, cfg: ModelConfig, num_seqs: int, max_len: int, block_size: int = 4,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        self.block_size = block_size
        self.per_seq = math.ceil(max_len / block_size)
        num_blocks = num_seqs * self.per_seq
        shape = (num_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim)
        self.kv_caches = [
            (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(cfg.num_hidden_layers)
        ]
        # Reverse the block order inside each sequence so that a wrong block table shows.
        self.block_tables = torch.tensor(
            [[i * self.per_seq + j for j in reversed(range(self.per_seq))] for i in range(num_seqs)],
            dtype=torch.int32, device=device,
        )
        self.device = device

    def slot(self, seq: int, pos: int) -> int:
        return int(self.block_tables[seq, pos // self.block_size]) * self.block_size + pos % self.block_size

    def context(self, seq_ids: list[int], starts: list[int], lens: list[int]) -> ForwardContext:
        """Context for feeding `lens[i]` new tokens of seq `seq_ids[i]` after `starts[i]` cached ones."""
        cu = [0]
        for n in lens:
            cu.append(cu[-1] + n)
        slots = [self.slot(s, p) for s, st, n in zip(seq_ids, starts, lens) for p in range(st, st + n)]
        ctx_lens = [st + n for st, n in zip(starts, lens)]
        dev = self.device
        return ForwardContext(
            is_prefill=max(lens) > 1,
            cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=dev),
            context_lens=torch.tensor(ctx_lens, dtype=torch.int32, device=dev),
            block_tables=self.block_tables[seq_ids],
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            max_seqlen_q=max(lens),
            max_context_len=max(ctx_lens),
            lora=None,
            kv_caches=self.kv_caches,
        )


@torch.no_grad()
def prefill_last_logits(model, prompts: list[list[int]], block_size: int = 4,
                        cache: PagedCache | None = None) -> torch.Tensor:
    """One batched prefill; returns the last position's logits `[B, V]` float32."""
    device = model.cos_sin.device
    cache = cache or PagedCache(model.cfg, len(prompts), max(map(len, prompts)), block_size,
                                model.dtype, device)
    ids = torch.tensor([t for p in prompts for t in p], dtype=torch.long, device=device)
    pos = torch.tensor([i for p in prompts for i in range(len(p))], dtype=torch.long, device=device)
    ctx = cache.context(list(range(len(prompts))), [0] * len(prompts), [len(p) for p in prompts])
    hidden = model(ids, pos, ctx)
    rows = ctx.cu_seqlens_q[1:].long() - 1
    return model.compute_logits(hidden[rows])


@torch.no_grad()
def router_margin(model, prompts: list[list[int]]) -> float:
    """The smallest gap, over every MoE layer and prompt token, between the k-th and (k+1)-th
    router logit: below a few bf16 ulps a reduced-precision run may pick another expert."""
    k, gaps = model.cfg.num_experts_per_tok, []
    hooks = [m.register_forward_hook(lambda _m, _i, out: gaps.append(out.float().topk(k + 1, -1).values))
             for name, m in model.named_modules() if name.endswith("mlp.gate")]
    try:
        prefill_last_logits(model, prompts)
    finally:
        for h in hooks:
            h.remove()
    return min((g[:, k - 1] - g[:, k]).min().item() for g in gaps) if gaps else float("inf")


def prompts_clear_of_router_ties(model, count: int, length: int, margin: float = 0.05,
                                 seed: int = 0, tries: int = 500) -> list[list[int]]:
    """`count` random prompts of `length` tokens on which `model` (a full-precision reference)
    routes every token with `router_margin` >= `margin`, so that a bf16 run of the same weights
    routes them alike and logits compare within bf16 tolerance (a flipped expert is a different,
    equally valid, computation)."""
    gen = torch.Generator().manual_seed(seed)
    found: list[list[int]] = []
    for _ in range(tries):
        p = torch.randint(3, model.cfg.vocab_size, (length,), generator=gen).tolist()
        if router_margin(model, [p]) >= margin:
            found.append(p)
            if len(found) == count:
                return found
    raise AssertionError(f"no {count} prompts of {length} tokens with router margin >= {margin} in {tries} tries")


@torch.no_grad()
def greedy_generate(model, prompts: list[list[int]], max_new_tokens: int, block_size: int = 4) -> list[list[int]]:
    """Batched greedy decoding: one prefill, then one token per sequence per decode step."""
    device = model.cos_sin.device
    cache = PagedCache(model.cfg, len(prompts), max(map(len, prompts)) + max_new_tokens, block_size,
                       model.dtype, device)
    logits = prefill_last_logits(model, prompts, block_size, cache)
    outs = [[int(t)] for t in logits.argmax(-1)]
    lens = [len(p) for p in prompts]
    seqs = list(range(len(prompts)))
    for _ in range(max_new_tokens - 1):
        ids = torch.tensor([o[-1] for o in outs], dtype=torch.long, device=device)
        pos = torch.tensor(lens, dtype=torch.long, device=device)
        ctx = cache.context(seqs, lens, [1] * len(seqs))
        logits = model.compute_logits(model(ids, pos, ctx))
        for o, t in zip(outs, logits.argmax(-1)):
            o.append(int(t))
        lens = [n + 1 for n in lens]
    return outs


# ----------------------------------------------------------------------------- references

COMMON = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6)

ARCHS: dict[str, tuple[str, dict]] = {
    "mixtral": ("MixtralConfig", dict(intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
                                      rope_theta=1e6)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(intermediate_size=64, moe_intermediate_size=32, num_experts=4,
                                         num_experts_per_tok=2, head_dim=16, norm_topk_prob=False,
                                         mlp_only_layers=[1])),
    # Llama 3.1-style rope scaling (written by transformers 5 under rope_parameters)
    "llama": ("LlamaConfig", dict(intermediate_size=96, tie_word_embeddings=True, rope_parameters={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16, "rope_theta": 500000.0})),
    "mistral": ("MistralConfig", dict(intermediate_size=96, sliding_window=8, head_dim=16)),
    "qwen2": ("Qwen2Config", dict(intermediate_size=96, use_sliding_window=False)),
    "qwen3": ("Qwen3Config", dict(intermediate_size=96, head_dim=32)),
}


def make_hf_checkpoint(arch: str, out: Path, seed: int = 0, **overrides) -> Path:
    """A random tiny model of `arch` saved by transformers itself in fp16 (Hub layout);
    `overrides` change config fields (e.g. wider layers for larger quantization groups).

    Weights ~ N(0, 0.1) (norms 1 ± 0.1) rather than transformers' 0.02, so that greedy
    choices are not near-ties that float rounding could flip.
    """
    cls_name, extra = ARCHS[arch]
    import transformers

    cfg = getattr(transformers, cls_name)(**{**COMMON, **extra, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    model.to(torch.float16).save_pretrained(out)
    return out




@torch.no_grad()
def hf_last_logits(hf_model, prompts: list[list[int]]) -> torch.Tensor:
    """transformers' last-position logits, one prompt at a time (no padding involved)."""
    rows = [hf_model(torch.tensor([p])).logits[0, -1].float() for p in prompts]
    return torch.stack(rows)


@torch.no_grad()
def hf_greedy(hf_model, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy decoding with transformers' KV cache, one prompt at a time, ignoring EOS."""
    outs = []
    for p in prompts:
        out = hf_model(torch.tensor([p]), use_cache=True)
        past, toks = out.cache, []
        nxt = int(out.logits[0, -1].argmax())
        for _ in range(max_new_tokens):
            toks.append(nxt)
            if len(toks) == max_new_tokens:
                break
            out = hf_model(torch.tensor([[nxt]]), cache=past, use_cache=True)
            past, nxt = out.cache, int(out.logits[0, -1].argmax())
        outs.append(toks)
    return outs


def peft_greedy_logprobs(peft_model, prompts: list[list[int]], new_tokens: int) -> tuple[list, float]:
    """A transformers+PEFT reference: per prompt, `new_tokens` greedy tokens and their log-probs;
    and how much the adapter moves the first prompt's logits (max |diff| against it disabled)."""
    refs = []
    with torch.no_grad():
        for p in prompts:
            g = peft_model.generate(input_ids=torch.tensor([p]), max_new_tokens=new_tokens,
                                    min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
            toks = g[0, len(p):].tolist()
            logits = peft_model(input_ids=g).logits[0, len(p) - 1:-1].float()
            refs.append((toks, torch.log_softmax(logits, -1).gather(1, torch.tensor(toks)[:, None])[:, 0].tolist()))
        ids = torch.tensor([prompts[0]])
        with peft_model.disable_adapter():
            plain = peft_model(input_ids=ids).logits
        changed = float((peft_model(input_ids=ids).logits - plain).abs().max())
    return refs, changed


def _read_all(model_dir: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():
                tensors[k] = sf.get_tensor(k)
    return tensors


def _copy_side_files(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name not in (
            "model.safetensors.index.json", "quant_config.json", "config.json"
        ):
            shutil.copy(f, dst / f.name)


def awq_quantize_checkpoint(src: Path, dst: Path, group_size: int = 32,
                            modules_to_not_convert: list[str] | None = None) -> Path:
    """Write an AutoAWQ-GEMM copy of an unquantized checkpoint (router gates and lm_head stay
    plain, and so does every module whose name contains a `modules_to_not_convert` entry:
    AutoAWQ's substring rule)."""
    src, dst = Path(src), Path(dst)
    _copy_side_files(src, dst)
    skip = modules_to_not_convert or []
    out: dict[str, torch.Tensor] = {}
    for name, t in _read_all(src).items():
        mod = name[: -len(".weight")]
        if (name.endswith(".weight") and t.dim() == 2 and "embed_tokens" not in name
                and mod != "lm_head" and not mod.endswith(".gate") and not any(k in mod for k in skip)):
            qw, qz, sc = awq_quantize(t.float(), group_size)
            out[mod + ".qweight"], out[mod + ".qzeros"], out[mod + ".scales"] = qw, qz, sc
        else:
            out[name] = t.to(torch.float16) if t.is_floating_point() else t
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {
        "quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True,
        "version": "gemm", "modules_to_not_convert": modules_to_not_convert,
    }
    cfg["torch_dtype"] = "float16"
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst


def dequantized_copy(src: Path, dst: Path) -> Path:
    """Write a plain float32 copy of an AWQ checkpoint (for transformers references: never load
    AWQ through transformers: it can leave the experts randomly initialised)."""
    src, dst = Path(src), Path(dst)
    _copy_side_files(src, dst)
    cfg = json.loads((src / "config.json").read_text())
    q = cfg.pop("quantization_config", None)
    if q is None and (src / "quant_config.json").is_file():
        q = json.loads((src / "quant_config.json").read_text())
    group = int(q.get("group_size") or q.get("q_group_size"))
    tensors = _read_all(src)
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name.endswith(".qweight"):
            mod = name[: -len(".qweight")]
            # float32: exactly (q - z) * s, as our CPU path computes it (fp16 would round it)
            w = awq_dequantize(t, tensors[mod + ".qzeros"], tensors[mod + ".scales"].float(), group)
            out[mod + ".weight"] = w.t().contiguous()
        elif name.endswith((".qzeros", ".scales")):
            continue
        else:
            out[name] = t
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg["torch_dtype"] = "float32"
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst


def merged_reference(base: Path, adapter: Path, dst: Path) -> Path:
    """Write an fp32 copy of `base` with scaling · B @ A merged into each adapted weight in
    float64 (PEFT's `merge_and_unload` math, Hub key layout): the reference an adapter served
    by our engine is compared against. An existing `dst` is reused as is."""
    if (dst / "model.safetensors").is_file():
        return dst
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    scaling = cfg["lora_alpha"] / (math.sqrt(cfg["r"]) if cfg["use_rslora"] else cfg["r"])
    sd = {k: v.double() for k, v in load_file(str(base / "model.safetensors")).items()}
    lora = load_file(str(adapter / "adapter_model.safetensors"))
    for k, a in lora.items():
        if k.endswith(".lora_A.weight"):
            module = k[len("base_model.model."): -len(".lora_A.weight")]
            b = lora[k.replace(".lora_A.", ".lora_B.")]
            sd[f"{module}.weight"] += scaling * b.double() @ a.double()
    dst.mkdir(parents=True, exist_ok=True)
    for f in base.iterdir():
        if f.is_file() and f.name != "model.safetensors":
            shutil.copyfile(f, dst / f.name)
    save_file({k: v.float() for k, v in sd.items()}, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


_TRITON_CHILD = """
import json, sys
from hubdeploy.serving.loader import load_model
from tests.helpers_forward import greedy_generate, prefill_last_logits
model, cfg = load_model(sys.argv[1])
prompts = json.loads(sys.argv[2])
logits = prefill_last_logits(model, prompts)
print(json.dumps({"logits": logits.tolist(), "tokens": greedy_generate(model, prompts, int(sys.argv[3]))}))
"""


def run_under_triton_interpreter(ckpt: Path, prompts: list[list[int]], n_tokens: int, timeout: float = 300) -> dict:
    """Last-position logits and `n_tokens` greedy tokens of `ckpt` through every Triton kernel under
    the interpreter, in a child process (TRITON_INTERPRET is read at import and must not leak)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="1", HUBDEPLOY_FORCE_TRITON="1")
    proc = subprocess.run([sys.executable, "-c", _TRITON_CHILD, str(ckpt), json.dumps(prompts), str(n_tokens)],
                          env=env, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
