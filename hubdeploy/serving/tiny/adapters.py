"""PEFT LoRA adapters for tiny models, in PEFT's saved layout (what the Hub and vLLM read).

Adapter i is written to the sibling directory `<model_dir>-lora-<i>`. Unlike PEFT's own
initialisation (B = 0, a no-op adapter), both A and B are random so an adapter visibly
changes the logits. Targets differ per adapter so loaders meet every case:
  0: attention q/v, r=4;  1: attention q/k/v/o (+ dense MLP for llama), r=8, rsLoRA;
  2: MoE experts (Mixtral w1/w2/w3, Qwen3-MoE gate/up/down_proj) + q_proj, r=16
     (llama: its dense MLP), keys per expert as `...experts.<e>.w1.lora_A.weight`.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from hubdeploy.serving.tiny.spec import linear_shapes

RANKS = (4, 8, 16)


def adapter_targets(arch: str, i: int) -> list[str]:
    kind = i % 3
    if kind == 0:
        return ["q_proj", "v_proj"]
    if kind == 1:
        extra = ["gate_proj", "up_proj", "down_proj"] if arch == "llama" else []
        return ["q_proj", "k_proj", "v_proj", "o_proj", *extra]
    experts = ["w1", "w2", "w3"] if arch == "mixtral" else ["gate_proj", "up_proj", "down_proj"]
    return [*experts, "q_proj"]


def adapter_dir(model_dir: Path, i: int) -> Path:
    """Where adapter `i` of `model_dir` lives: the sibling `<model_dir>-lora-<i>`."""
    model_dir = Path(model_dir)
    return model_dir.with_name(f"{model_dir.name}-lora-{i}")


def write_adapter(model_dir: Path, arch: str, i: int, seed: int, base_model_id: str | None = None) -> Path:
    """Write adapter `i` (deterministic for `seed`) and return its directory."""
    out = adapter_dir(model_dir, i)
    out.mkdir(parents=True, exist_ok=True)
    r = RANKS[i % len(RANKS)]
    targets = adapter_targets(arch, i)
    use_rslora = i % 3 == 1
    alpha = 2 * r
    scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
    g = torch.Generator().manual_seed(seed * 1000 + 17 + i)
    tensors: dict[str, torch.Tensor] = {}
    for name, out_f, in_f in linear_shapes(arch):
        if name.rsplit(".", 1)[-1] not in targets:
            continue
        a = torch.randn(r, in_f, generator=g) / math.sqrt(in_f)
        # B sized so scaling * B @ A perturbs the layer by ~30% of a unit-gain weight.
        b = torch.randn(out_f, r, generator=g) * (0.3 / (math.sqrt(r) * scaling))
        key = f"base_model.model.{name}"
        tensors[f"{key}.lora_A.weight"] = a.to(torch.float16).contiguous()
        tensors[f"{key}.lora_B.weight"] = b.to(torch.float16).contiguous()
    save_file(dict(sorted(tensors.items())), str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = {
        "alpha_pattern": {},
        "auto_mapping": None,
        "base_model_name_or_path": base_model_id or Path(model_dir).name,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": r,
        "rank_pattern": {},
        "revision": None,
        "target_modules": sorted(targets),
        "task_type": "CAUSAL_LM",
        "use_dora": False,
        "use_rslora": use_rslora,
    }
    (out / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (out / "README.md").write_text(
        f"---\nbase_model: {cfg['base_model_name_or_path']}\nlibrary_name: peft\ntags:\n- lora\n- tiny\n---\n\n"
        f"# Tiny LoRA adapter {i}\n\nRandom rank-{r} LoRA on {', '.join(sorted(targets))} for tests "
        f"(seed {seed}); not a trained model.\n",
        encoding="utf-8",
    )
    return out
