"""Multi-LoRA: many PEFT adapters on one base model, mixed per token in one batch.

- `adapter`: read and validate a PEFT adapter (dir or Hub repo) against the base model.
- `manager`: `LoRAManager` — registry, host cache, device slots, LRU swap-in, pinning.
- `batch`: the per-step token -> slot mapping (`ForwardContext.lora`).
- `layers`: the per-module device buffers and hooks (attention, dense MLP, MoE experts).
`attach_lora(engine)` wires a manager into an `LLMEngine` (hooks on model, scheduler, runner).
"""
from __future__ import annotations

from typing import Any

from serving.lora.adapter import LoRAAdapter, LoRAConfig, LoRAError, load_adapter, parse_source
from serving.lora.batch import LoRABatch, build_lora_batch
from serving.lora.manager import LoRAManager, LoRAStats


def attach_lora(engine: Any) -> LoRAManager:
    """Give `engine` (an `LLMEngine`) a `LoRAManager` and register `args.lora_modules`.

    The scheduler admits a sequence only when its adapter holds a device slot
    (`lora_admit`), unpins it on preemption/finish (`lora_release`); the runner asks the
    manager for the step's `LoRABatch`. Unloading an adapter drops the prefix cache on the
    engine thread (a later adapter of the same name must not reuse its K/V).
    """
    args = engine.args
    mgr = LoRAManager(engine.runner.model, max_loras=args.max_loras, max_lora_rank=args.max_lora_rank,
                      max_cpu_loras=args.max_cpu_loras, device=engine.device, dtype=engine.dtype, token=args.token)
    for name, source in (args.lora_modules or {}).items():
        mgr.register(name, source)
    bm = engine.block_manager

    def admit(seq: Any) -> bool:
        if mgr.take_prefix_cache_stale():
            bm.reset_prefix_cache()
        return mgr.acquire(seq)

    engine.scheduler.lora_admit = admit
    engine.scheduler.lora_release = mgr.release
    engine.runner.lora_manager = mgr
    return mgr


__all__ = ["LoRAAdapter", "LoRABatch", "LoRAConfig", "LoRAError", "LoRAManager", "LoRAStats", "attach_lora",
           "build_lora_batch", "load_adapter", "parse_source"]
