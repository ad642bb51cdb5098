"""The per-step LoRA description (`ForwardContext.lora`): which device slot each token uses.

Built once per step by the model runner from the scheduled chunks; every LoRA hook of the
step reads it. `None` when no request of the step uses an adapter, so the base path does
no LoRA work at all.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import torch

from kernels.lora import LoRASegments, lora_segments


@dataclass
class LoRABatch:
    """`token_slots [N]` int32 (-1 = base model), runs of equal slots, and the slots in use."""

    token_slots: torch.Tensor
    segments: LoRASegments | None
    active_slots: frozenset[int]
    num_tokens: int
    _rows: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    def slot_of_rows(self, top_k: int) -> torch.Tensor:
        """Slot per (token, k) row of a top-k MoE (`token_slots` repeated k times), cached per k."""
        rows = self._rows.get(top_k)
        if rows is None:
            rows = self._rows[top_k] = self.token_slots.repeat_interleave(top_k)
        return rows


def build_lora_batch(chunks: Iterable[tuple[int, int]], device: torch.device | str) -> LoRABatch | None:
    """`chunks`: (slot or -1, number of tokens) per scheduled sequence, in batch order.

    Returns None when every slot is -1. Segments (runs of one slot) are built for prefill-
    shaped steps, where the SGMV kernels use them; decode steps use one-token-per-row BGMV.
    """
    chunks = list(chunks)
    active = frozenset(s for s, n in chunks if s >= 0 and n > 0)
    if not active:
        return None
    flat: list[int] = []
    for slot, n in chunks:
        flat += [slot] * n
    slots = torch.tensor(flat, dtype=torch.int32, device=device)
    long_runs = any(n > 1 for _, n in chunks)
    return LoRABatch(token_slots=slots, segments=lora_segments(slots) if long_runs else None,
                     active_slots=active, num_tokens=len(flat))


__all__ = ["LoRABatch", "build_lora_batch"]
