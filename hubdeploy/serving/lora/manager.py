"""`LoRAManager`: which adapters exist, which are in host memory, which sit in device slots.

Three tiers, as S-LoRA and vLLM:
- registered: name -> source (dir or Hub repo); unlimited; validated when registered.
- host cache: up to `max_cpu_loras` adapters' weights in host memory, least recently used
  dropped (re-read from the source when needed again).
- device slots: `max_loras` preallocated slots in every LoRA site (stacked A/B zero-padded
  to `max_lora_rank`). A sequence is admitted only once its adapter has a slot
  (`acquire`), which pins it until the sequence finishes or is preempted (`release`);
  a free slot is used first, else the least recently used unpinned one is swapped out.
  A request whose adapter cannot get a slot waits; pinned adapters are never evicted.
Thread-safe: the HTTP side registers/unregisters while the engine thread steps.
"""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch

from hubdeploy.serving.lora.adapter import LoRAAdapter, LoRAError, TargetShape, load_adapter, parse_source
from hubdeploy.serving.lora.batch import LoRABatch, build_lora_batch
from hubdeploy.serving.lora.layers import LinearSite, MoESite

log = logging.getLogger(__name__)


@dataclass
class LoRAStats:
    """Counters and gauges the engine exports."""

    swaps_total: int = 0  # adapters copied into a device slot (first loads included)
    evictions_total: int = 0  # resident adapters replaced by another
    resident: int = 0
    registered: int = 0
    host_cached: int = 0
    resident_names: list[str] = field(default_factory=list)


class LoRAManager:
    """Adapters for one model: `register`/`unregister`, `acquire`/`release` per sequence,
    `build_batch` per step. `max_loras` device slots, `max_cpu_loras` host cache."""

    def __init__(self, model: Any, max_loras: int = 1, max_lora_rank: int = 16, max_cpu_loras: int | None = None,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 token: str | None = None) -> None:
        if max_loras < 1:
            raise ValueError(f"max_loras must be at least 1, got {max_loras}")
        if max_lora_rank < 1:
            raise ValueError(f"max_lora_rank must be at least 1, got {max_lora_rank}")
        self.max_loras = max_loras
        self.max_lora_rank = max_lora_rank
        # host cache: at least the device slots; default 4 (an expert adapter of Mixtral-8x7B at rank 16 is ~0.45 GB)
        self.max_cpu_loras = max(max_cpu_loras or 4, max_loras)
        self.device = torch.device(device)
        self.dtype = dtype
        self.token = token
        self._lock = threading.RLock()
        self.sources: dict[str, str] = {}
        self._paths: dict[str, Any] = {}  # name -> resolved local dir (re-reads never go to the Hub)
        self._host: OrderedDict[str, LoRAAdapter] = OrderedDict()  # LRU order, oldest first
        self.slot_names: list[str | None] = [None] * max_loras
        self._slot_lru: OrderedDict[int, None] = OrderedDict()  # slot use order, oldest first
        self._pins: dict[int, str] = {}  # seq_id -> adapter, for admitted (running) sequences
        self._users: dict[str, set[int]] = {}  # adapter -> live seq ids (waiting or running)
        self.stats = LoRAStats()
        self._prefix_stale = False  # an adapter name was freed: cached K/V under it must not be reused
        self.targets: dict[str, TargetShape] = {}
        self.sites: list[LinearSite | MoESite] = []
        self._install(model)

    # --- hooks on the model ----------------------------------------------------------
    def _install(self, model: Any) -> None:
        """One site per module that `model.lora_targets()` names; its hook goes in `module.lora_hook`."""
        from hubdeploy.serving.models.layers import MoE

        by_module: dict[int, tuple[Any, list[tuple[str, slice]]]] = {}
        for name, t in model.lora_targets().items():
            self.targets[name] = TargetShape(t.in_features, t.out_features)
            by_module.setdefault(id(t.module), (t.module, []))[1].append((name, t.out_slice))
        for module, parts in by_module.values():
            if isinstance(module, MoE):
                site: LinearSite | MoESite = MoESite(module, self.max_loras, self.max_lora_rank, self.dtype, self.device)
            else:
                parts.sort(key=lambda p: p[1].start)
                site = LinearSite(module, parts, self.max_loras, self.max_lora_rank, self.dtype, self.device)
            module.lora_hook = site
            self.sites.append(site)

    # --- registry --------------------------------------------------------------------
    def register(self, name: str, source: str, revision: str | None = None) -> LoRAAdapter:
        """Read and validate an adapter, then make it servable under `name` (LoRAError if not)."""
        if not name or not name.strip():
            raise LoRAError("an adapter needs a non-empty name")
        with self._lock:
            if name in self.sources:
                raise LoRAError(f"an adapter named {name!r} is already loaded (from {self.sources[name]}); "
                                "unload it first or pick another name")
        src = source if revision is None else f"{parse_source(source)[0]}@{revision}"
        return self.add_adapter(self._read(name, src))

    def add_adapter(self, adapter: LoRAAdapter) -> LoRAAdapter:
        """Make an already validated (or built in memory, e.g. by a benchmark) adapter servable."""
        with self._lock:
            if adapter.name in self.sources:
                raise LoRAError(f"an adapter named {adapter.name!r} is already loaded")
            self._reserve(adapter)
            self.sources[adapter.name] = adapter.source
            self._paths[adapter.name] = adapter.path
            self._cache(adapter)
        log.info("LoRA adapter %r registered from %s (rank %d, %d modules)", adapter.name, adapter.source,
                 adapter.max_rank, len(adapter.modules))
        return adapter

    def _reserve(self, adapter: LoRAAdapter) -> None:
        """Allocate the device buffers (all slots) of every site the adapter touches, now."""
        names = set(adapter.modules)
        try:
            for site in self.sites:
                if site.touches_names(names):
                    site.allocate()
        except torch.OutOfMemoryError as e:
            raise LoRAError(f"adapter {adapter.name!r}: no device memory left for its LoRA slots ({e}); pass it "
                            "with --lora at start (slots are allocated before the KV cache), or lower "
                            "--max-loras / --max-lora-rank / gpu_memory_utilization") from e

    def unregister(self, name: str) -> None:
        """Forget an adapter; refused while a request still uses it."""
        with self._lock:
            if name not in self.sources:
                raise KeyError(f"no adapter named {name!r} is loaded")
            users = self._users.get(name)
            if users:
                raise LoRAError(f"adapter {name!r} is in use by {len(users)} request(s); retry when they finish")
            del self.sources[name]
            self._paths.pop(name, None)
            self._users.pop(name, None)
            self._host.pop(name, None)
            for slot, n in enumerate(self.slot_names):
                if n == name:
                    self._clear(slot)
            self._prefix_stale = True

    def take_prefix_cache_stale(self) -> bool:
        """True once after an unregister: the engine thread then drops its prefix cache."""
        with self._lock:
            stale, self._prefix_stale = self._prefix_stale, False
            return stale

    def names(self) -> list[str]:
        with self._lock:
            return list(self.sources)

    def _read(self, name: str, source: str) -> LoRAAdapter:
        return load_adapter(name, source, self.targets, self.max_lora_rank, dtype=self.dtype, token=self.token)

    def _cache(self, adapter: LoRAAdapter) -> None:
        self._host[adapter.name] = adapter
        self._host.move_to_end(adapter.name)
        while len(self._host) > self.max_cpu_loras:
            old = next(iter(self._host))
            if old == adapter.name:
                break
            del self._host[old]

    def _host_adapter(self, name: str) -> LoRAAdapter:
        a = self._host.get(name)
        if a is None:  # dropped from the host cache: read it again from its local copy
            path = self._paths.get(name)
            a = self._read(name, str(path) if path is not None else self.sources[name])
            a.source = self.sources[name]
            self._cache(a)
        else:
            self._host.move_to_end(name)
        return a

    # --- sequences -------------------------------------------------------------------
    def add_user(self, seq: Any) -> None:
        """A new request for `seq.lora_name`: ValueError naming the loaded ones if unknown."""
        name = seq.lora_name
        if name is None:
            return
        with self._lock:
            if name not in self.sources:
                known = ", ".join(self.sources) or "none"
                raise ValueError(f"LoRA adapter {name!r} is not loaded (loaded: {known})")
            self._users.setdefault(name, set()).add(seq.seq_id)

    def acquire(self, seq: Any) -> bool:
        """Pin `seq`'s adapter in a device slot, swapping one in if needed; False = wait."""
        name = seq.lora_name
        if name is None or seq.seq_id in self._pins:
            return True
        with self._lock:
            if name not in self.sources:
                raise ValueError(f"LoRA adapter {name!r} is not loaded")
            slot = self._slot_of(name)
            if slot is None:
                slot = self._free_slot()
                if slot is None:
                    return False
                self._load_into(slot, name)
            self._pins[seq.seq_id] = name
            self._slot_lru.pop(slot, None)
            self._slot_lru[slot] = None
            return True

    def release(self, seq: Any, finished: bool) -> None:
        """Unpin (preempted or finished); a finished sequence also stops being a user."""
        with self._lock:
            self._pins.pop(seq.seq_id, None)
            if finished and seq.lora_name is not None:
                users = self._users.get(seq.lora_name)
                if users is not None:
                    users.discard(seq.seq_id)

    def _slot_of(self, name: str) -> int | None:
        try:
            return self.slot_names.index(name)
        except ValueError:
            return None

    def _free_slot(self) -> int | None:
        for i, n in enumerate(self.slot_names):
            if n is None:
                return i
        pinned = set(self._pins.values())
        for slot in self._slot_lru:  # least recently used first
            if self.slot_names[slot] not in pinned:
                self.stats.evictions_total += 1
                return slot
        return None

    def _load_into(self, slot: int, name: str) -> None:
        adapter = self._host_adapter(name)
        for site in self.sites:
            site.set_slot(slot, adapter.modules)
        old = self.slot_names[slot]
        self.slot_names[slot] = name
        self.stats.swaps_total += 1
        log.debug("LoRA slot %d: %s -> %s", slot, old, name)

    def _clear(self, slot: int) -> None:
        for site in self.sites:
            site.clear_slot(slot)
        self.slot_names[slot] = None
        self._slot_lru.pop(slot, None)

    # --- per step --------------------------------------------------------------------
    def build_batch(self, chunks: Iterable[tuple[str | None, int]]) -> LoRABatch | None:
        """(adapter name or None, new tokens) per scheduled sequence -> `ForwardContext.lora`."""
        with self._lock:
            slotted = []
            for name, n in chunks:
                if name is None:
                    slotted.append((-1, n))
                    continue
                slot = self._slot_of(name)
                if slot is None:
                    raise RuntimeError(f"LoRA adapter {name!r} is scheduled but holds no device slot "
                                       "(acquire() was not called for its sequence)")
                slotted.append((slot, n))
        return build_lora_batch(slotted, self.device)

    def snapshot(self) -> LoRAStats:
        with self._lock:
            s = self.stats
            resident = [n for n in self.slot_names if n is not None]
            return LoRAStats(swaps_total=s.swaps_total, evictions_total=s.evictions_total, resident=len(resident),
                             registered=len(self.sources), host_cached=len(self._host), resident_names=resident)


__all__ = ["LoRAManager", "LoRAStats"]
