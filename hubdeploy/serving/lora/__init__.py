"""Multi-LoRA: many PEFT adapters on one base model, mixed per token in one batch.

- `adapter`: read and validate a PEFT adapter (dir or Hub repo) against the base model.
- `manager`: `LoRAManager` — registry, host cache, device slots, LRU swap-in, pinning.
- `batch`: the per-step token -> slot mapping (`ForwardContext.lora`).
- `layers`: the per-module device buffers and hooks (attention, dense MLP, MoE experts).
`LLMEngine` calls `create_lora_manager` (before the KV cache is sized) and hands the manager to
its `Scheduler` (admission: an adapter's sequence runs once the adapter holds a device slot) and
`ModelRunner` (each step's `LoRABatch`).
"""
from __future__ import annotations

from typing import Any

from hubdeploy.serving.lora.adapter import LoRAAdapter, LoRAConfig, LoRAError, load_adapter, parse_source
from hubdeploy.serving.lora.batch import LoRABatch, build_lora_batch
from hubdeploy.serving.lora.manager import LoRAManager, LoRAStats


def create_lora_manager(args: Any, model: Any, device: Any, dtype: Any) -> LoRAManager:
    """A `LoRAManager` for `model` from `EngineArgs` with `args.lora_modules` registered; their
    device buffers are allocated now, before the engine sizes the KV cache from what is left."""
    mgr = LoRAManager(model, max_loras=args.max_loras, max_lora_rank=args.max_lora_rank,
                      max_cpu_loras=args.max_cpu_loras, device=device, dtype=dtype, token=args.token)
    for name, source in (args.lora_modules or {}).items():
        mgr.register(name, source)
    return mgr


__all__ = ["LoRAAdapter", "LoRABatch", "LoRAConfig", "LoRAError", "LoRAManager", "LoRAStats",
           "build_lora_batch", "create_lora_manager", "load_adapter", "parse_source"]
