"""Tiny random models in real Hub layout, built locally and deterministically.

`make_tiny(out_dir, arch, quant, adapters, seed)` writes what a Hub user would download:
`config.json`, `generation_config.json`, `model.safetensors` (fp16 or AutoAWQ GEMM 4-bit),
a byte-level BPE `tokenizer.json` trained on the spot, `tokenizer_config.json` with the
family's real chat template, `special_tokens_map.json` and a `README.md` model card.
`transformers` loads the fp16 ones unchanged. Same seed -> byte-identical files.
LoRA adapters go to sibling directories `<out_dir>-lora-<i>` (see `adapters.py`).
"""
from __future__ import annotations

import json
import math
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from hubdeploy.kernels.awq_format import awq_dequantize, awq_quantize
from hubdeploy.serving.tiny import spec
from hubdeploy.serving.tiny.adapters import RANKS, adapter_dir, adapter_targets, write_adapter
from hubdeploy.serving.tiny.spec import ARCHS, GROUP_SIZE, QUANTS
from hubdeploy.serving.tiny.tokenizer import write_tokenizer

__all__ = ["make_tiny", "dequantize_awq_dir", "adapter_dir", "ARCHS", "QUANTS", "GROUP_SIZE"]

_TEMPLATE_NAMES = {
    "mixtral": "Mixtral-8x7B-Instruct ([INST], strictly alternating user/assistant, no system role)",
    "qwen3_moe": "Qwen ChatML (<|im_start|>/<|im_end|>, system and tools)",
    "llama": "Mistral-style [INST] with an optional system message",
}


def _dump_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _random_weights(arch: str, vocab: int, seed: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(fp16 non-linear tensors, fp16 linear weights [out, in]), drawn in a fixed order.

    Scales keep activations O(1) through the layers (unit-gain linears, N(0,1) embeddings,
    norms near 1) so greedy decoding depends on the context instead of collapsing.
    """
    g = torch.Generator().manual_seed(seed)
    others: dict[str, torch.Tensor] = {}
    for name, shape, kind in spec.other_shapes(arch, vocab):
        if kind == "norm":
            t = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif kind == "embed":
            t = torch.randn(shape, generator=g)
        elif kind == "router":
            t = torch.randn(shape, generator=g) * (2.0 / math.sqrt(shape[1]))
        else:  # lm_head
            t = torch.randn(shape, generator=g) * (2.0 / math.sqrt(shape[1]))
        others[name] = t.to(torch.float16)
    linears: dict[str, torch.Tensor] = {}
    for name, out_f, in_f in spec.linear_shapes(arch):
        linears[name] = (torch.randn(out_f, in_f, generator=g) / math.sqrt(in_f)).to(torch.float16)
    return others, linears


def _render_card(**ctx: Any) -> str:
    import jinja2

    text = resources.files("hubdeploy.templates").joinpath("model_card.md.j2").read_text(encoding="utf-8")
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
                             undefined=jinja2.StrictUndefined, autoescape=False)
    return env.from_string(text).render(**ctx)


def make_tiny(
    out_dir: str | Path,
    arch: str = "mixtral",
    quant: str = "awq",
    adapters: int = 0,
    seed: int = 0,
    base_model_id: str | None = None,
) -> Path:
    """Build a tiny model directory (and `adapters` sibling LoRA dirs); returns its path.

    `base_model_id` is written as the adapters' `base_model_name_or_path` (default: the
    model directory's name), e.g. the repo id the model will be pushed to.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    if quant not in QUANTS:
        raise ValueError(f"unknown quant {quant!r}; choose one of {', '.join(QUANTS)}")
    if adapters < 0:
        raise ValueError("adapters must be >= 0")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tok_ids = write_tokenizer(out, arch)
    vocab = int(math.ceil(tok_ids["vocab"] / 64) * 64)
    cfg = spec.model_config(arch, vocab, tok_ids)
    others, linears = _random_weights(arch, vocab, seed)
    tensors: dict[str, torch.Tensor] = dict(others)
    if quant == "awq":
        for name, w in linears.items():
            qweight, qzeros, scales = awq_quantize(w, GROUP_SIZE)
            tensors[f"{name}.qweight"] = qweight
            tensors[f"{name}.qzeros"] = qzeros
            tensors[f"{name}.scales"] = scales
        cfg["quantization_config"] = {
            "quant_method": "awq", "bits": 4, "group_size": GROUP_SIZE, "zero_point": True,
            "version": "gemm", "modules_to_not_convert": ["gate"],
        }
    else:
        tensors.update({f"{name}.weight": w for name, w in linears.items()})
    save_file(dict(sorted(tensors.items())), str(out / "model.safetensors"), metadata={"format": "pt"})
    _dump_json(out / "config.json", cfg)
    gen = {"bos_token_id": tok_ids["bos"], "eos_token_id": tok_ids["eos_all"] if len(tok_ids["eos_all"]) > 1
           else tok_ids["eos"], "pad_token_id": tok_ids["pad"], "do_sample": False}
    _dump_json(out / "generation_config.json", gen)

    adapter_info = []
    for i in range(adapters):
        d = write_adapter(out, arch, i, seed, base_model_id)
        adapter_info.append({"dir": d.name, "r": RANKS[i % len(RANKS)], "targets": adapter_targets(arch, i)})
    tags = [arch, "tiny", "random-weights", "text-generation"]
    if arch != "llama":
        tags.append("moe")
    if quant == "awq":
        tags += ["awq", "4-bit"]
    card = _render_card(
        name=out.name, base_model=spec.BASE_MODEL_IDS[arch], quant=quant, tags=tags, seed=seed,
        architecture=cfg["architectures"][0], layers=spec.LAYERS, hidden=spec.HIDDEN, heads=spec.HEADS,
        kv_heads=spec.KV_HEADS, experts=cfg.get("num_local_experts") or cfg.get("num_experts") or 0,
        experts_per_tok=cfg.get("num_experts_per_tok", 0), vocab_size=vocab, group_size=GROUP_SIZE,
        chat_template_name=_TEMPLATE_NAMES[arch], adapters=adapter_info,
    )
    (out / "README.md").write_text(card, encoding="utf-8")
    return out


def dequantize_awq_dir(src: str | Path, dst: str | Path) -> Path:
    """Write an fp16 copy of an AWQ model directory (weights = dequantized AWQ, no
    quantization_config): the reference that transformers can load, since transformers 5.x
    cannot be trusted to load AWQ MoE experts (5.24 through gptqmodel leaves every expert
    randomly initialised without an error)."""
    import shutil

    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((src / "config.json").read_text())
    q = cfg.pop("quantization_config", None)
    if not q or q.get("quant_method") != "awq":
        raise ValueError(f"{src} is not an AWQ model (config.json has no awq quantization_config)")
    group = int(q["group_size"])
    state = load_file(str(src / "model.safetensors"))
    out: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        if key.endswith(".qweight"):
            base = key[: -len(".qweight")]
            w = awq_dequantize(t, state[f"{base}.qzeros"], state[f"{base}.scales"], group)
            out[f"{base}.weight"] = w.t().contiguous().to(torch.float16)
        elif key.endswith((".qzeros", ".scales")):
            continue
        else:
            out[key] = t
    save_file(dict(sorted(out.items())), str(dst / "model.safetensors"), metadata={"format": "pt"})
    _dump_json(dst / "config.json", cfg)
    for f in src.iterdir():
        if f.is_file() and f.name not in ("config.json", "model.safetensors"):
            shutil.copyfile(f, dst / f.name)
    return dst
