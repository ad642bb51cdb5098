"""`EngineStats`: a snapshot of the engine's gauges and monotonically growing counters.

The server turns these into Prometheus metrics; per-request latencies (TTFT, end-to-end)
come with each finished `RequestOutput.metrics` for its histograms.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class EngineStats:
    num_running: int = 0
    num_waiting: int = 0
    num_preempted: int = 0  # waiting sequences that were preempted and wait to resume
    kv_cache_usage: float = 0.0  # fraction of KV blocks held by live sequences
    num_kv_blocks: int = 0
    block_size: int = 0
    prefix_cache_queries: int = 0  # blocks looked up (counter)
    prefix_cache_hits: int = 0  # blocks found (counter)
    prompt_tokens_total: int = 0  # prompt tokens computed (cache hits excluded)
    generation_tokens_total: int = 0
    preemptions_total: int = 0
    requests_finished_total: int = 0
    requests_aborted_total: int = 0
    steps_total: int = 0
    lora_swaps_total: int = 0  # adapters copied into a device slot (serving.lora)
    lora_resident: int = 0  # adapters in device slots now
    lora_registered: int = 0  # adapters servable (any tier)

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["prefix_cache_hit_rate"] = self.prefix_cache_hit_rate
        return d
