"""The per-step LoRA description (`ForwardContext.lora`): which device slot each token uses.

Built once per step by the model runner from the scheduled chunks; every LoRA hook of the
step reads it. `None` when no request of the step uses an adapter, so the base path does
no LoRA work at all.

A *static* batch (`static_lora_batch`) is the CUDA-graph form of a decode step: its
`token_slots` is a fixed device buffer that the runner overwrites in place before each
replay (-1 = base model, also for padding rows). Hooks then must not branch on which
slots are active nor wait on the device: every allocated site runs its BGMV path for all
rows, and slots or parts holding no weights are zeros, so they add exactly nothing.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import torch

from hubdeploy.kernels.lora import LoRASegments, lora_segments


@dataclass
class LoRABatch:
    """`token_slots [N]` int32 (-1 = base model), runs of equal slots, and the slots in use.

    `static=True`: `token_slots` is a graph's input buffer whose contents change between
    replays; `active_slots` is then every slot and nothing derived from `token_slots` is cached.
    """

    token_slots: torch.Tensor
    segments: LoRASegments | None
    active_slots: frozenset[int]
    num_tokens: int
    static: bool = False
    _rows: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)
    _host_segments: list[tuple[int, int, int]] | None = field(default=None, repr=False)

    def slot_of_rows(self, top_k: int) -> torch.Tensor:
        """Slot per (token, k) row of a top-k MoE (`token_slots` repeated k times), cached per k
        (recomputed on every call for a static batch: inside a graph it must be a recorded op)."""
        if self.static:
            return self.token_slots.repeat_interleave(top_k)
        rows = self._rows.get(top_k)
        if rows is None:
            rows = self._rows[top_k] = self.token_slots.repeat_interleave(top_k)
        return rows


    def host_segments(self) -> list[tuple[int, int, int]]:
        """(start, end, slot) of each run of equal slots, on the host: read once per step (one
        sync) for the CPU path's per-run GEMMs. Needs `segments` (prefill-shaped, not static)."""
        if self._host_segments is None:
            if self.segments is None or self.static:
                raise ValueError("host_segments: this LoRABatch has no segments (decode-shaped or static)")
            starts, lens, slots = (t.tolist() for t in self.segments)
            self._host_segments = [(a, a + n, s) for a, n, s in zip(starts, lens, slots)]
        return self._host_segments


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


def static_lora_batch(slots_buffer: torch.Tensor, num_slots: int) -> LoRABatch:
    """A decode batch over a fixed int32 buffer (one token per row) for CUDA-graph capture:
    write each step's slots into `slots_buffer` in place (`-1` for base rows and padding)."""
    if slots_buffer.dtype != torch.int32 or slots_buffer.dim() != 1:
        raise ValueError(f"static_lora_batch: need a 1-D int32 slot buffer, got {slots_buffer.dtype} "
                         f"{tuple(slots_buffer.shape)}")
    return LoRABatch(token_slots=slots_buffer, segments=None, active_slots=frozenset(range(num_slots)),
                     num_tokens=int(slots_buffer.shape[0]), static=True)


__all__ = ["LoRABatch", "build_lora_batch", "static_lora_batch"]
