"""Per-step batch metadata that the model runner builds once and every layer reads.

The forward pass is shaped for paged, batched inference: all tokens of the step are
flattened into one `[num_tokens]` vector; this context says which sequence each belongs
to, where its K/V go in the paged cache and what it may attend to.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class ForwardContext:
    # True when any sequence in the step feeds more than one token (prefill or chunked
    # prefill); decode-only steps use the decode attention kernel.
    is_prefill: bool
    # [num_seqs + 1] int32: prefix sums of new tokens per sequence in this step.
    cu_seqlens_q: torch.Tensor
    # [num_seqs] int32: tokens of each sequence in the cache after this step (cached + new).
    context_lens: torch.Tensor
    # [num_seqs, max_blocks_per_seq] int32: physical block ids, -1 padded.
    block_tables: torch.Tensor
    # [num_tokens] int64: flat cache slot (block * block_size + offset) for each new token;
    # -1 means "do not store" (used by CUDA-graph padding).
    slot_mapping: torch.Tensor
    max_seqlen_q: int
    max_context_len: int
    # Multi-LoRA batch description (serving.lora), None when no request uses an adapter.
    lora: Any | None = None
    # Per-layer (k_cache, v_cache), each [num_blocks, block_size, num_kv_heads, head_dim].
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)

    @property
    def num_seqs(self) -> int:
        return int(self.context_lens.shape[0])
