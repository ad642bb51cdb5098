"""Device-side LoRA state of one base module ("site") and the hook that applies it.

A site owns the stacked, zero-padded weights of every device slot for one of our modules:
- `LinearSite` for a (possibly fused) `Linear`: A of all its HF parts concatenated along
  rank, `[S, P·R, in]`, so one shrink serves e.g. q, k and v; one `B [S, out_p, R]` and
  `scalings [S]` per part, expanded into the part's output columns (`out_offset`).
- `MoESite` for a `MoE` block: per-expert `A13 [S, E, 2R, H]` (w1 | w3 along rank),
  `B1/B3 [S, E, I, R]`, `A2 [S, E, R, I]`, `B2 [S, E, H, R]`, scaling folded into B (it
  may differ per expert through `rank_pattern`/`alpha_pattern`). Expert LoRA changes the
  activation inside each expert, so its hook runs the whole MoE: base grouped GEMM w13,
  + LoRA(w1|w3) on each (token, k) row, SiLU·up, base grouped GEMM w2, + routing weight ·
  LoRA(w2), sum over k. Rows are those of fused MoE (`token·k + j`), so the LoRA terms
  use the MoE LoRA kernels with `expert_of_row = topk_ids` and the row's slot.
Buffers (all slots) are allocated when the first adapter touching the site is registered
(attention-only adapters never pay for expert buffers) and never reallocated: `set_slot`
/ `clear_slot` copy into them in place, so captured CUDA graphs keep reading valid
addresses. Slots with no weights for a site stay zero; a step whose active slots do not
touch a site skips it entirely, and MoE rows of adapters without expert weights are left
to the base path (slot -1).

Paths: Triton (CUDA) runs BGMV for decode, SGMV for long runs. The torch (CPU) path picks
plain GEMMs for a step of one adapter, per-run / per-(expert, slot) GEMMs on contiguous
slices for prefill, and the kernels' gathered BGMV references for decode (cost independent
of the number of distinct adapters). A static batch (`LoRABatch.static`, CUDA-graph decode)
always takes the BGMV form over every row and every part, with no host sync in the LoRA work.
"""
from __future__ import annotations

from typing import Any

import torch

from hubdeploy.kernels.dispatch import use_triton
from hubdeploy.kernels.fused_moe import AWQMoEWeights, MoEWeights, fused_moe
from hubdeploy.kernels.lora import lora_expand, lora_shrink, moe_lora_expand, moe_lora_shrink
from hubdeploy.serving.lora.adapter import LoRAModuleWeights
from hubdeploy.serving.lora.batch import LoRABatch


# torch path, prefill-shaped steps: one GEMM pair per run of one slot when runs average this many
# rows; else gather each row's A/B (the kernels' torch references, BGMV), cheaper for short runs
_ROWS_PER_RUN = 8


class LinearSite:
    """LoRA buffers and hook for one `Linear` (fused parts share one shrink)."""

    def __init__(self, module: Any, parts: list[tuple[str, slice]], num_slots: int, max_rank: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.module = module
        self.parts = parts
        self.index = {name: i for i, (name, _) in enumerate(parts)}
        self.S, self.R, self.dtype, self.device = num_slots, max_rank, dtype, device
        self.a: torch.Tensor | None = None
        self.b: list[torch.Tensor] = []
        self.scalings: torch.Tensor | None = None
        self.slot_parts: list[set[int]] = [set() for _ in range(num_slots)]  # parts each slot touches

    def touches_names(self, names: set[str]) -> bool:
        return any(n in self.index for n in names)

    def allocate(self) -> None:
        """The stacked buffers of all slots (zeros); idempotent."""
        if self.a is None:
            P, R, S = len(self.parts), self.R, self.S
            self.a = torch.zeros(S, P * R, self.module.in_features, dtype=self.dtype, device=self.device)
            self.b = [torch.zeros(S, sl.stop - sl.start, R, dtype=self.dtype, device=self.device)
                      for _, sl in self.parts]
            self.scalings = torch.zeros(P, S, dtype=torch.float32, device=self.device)

    def set_slot(self, slot: int, weights: dict[str, LoRAModuleWeights]) -> None:
        """Write one adapter's parts into `slot` (zeros for parts it does not touch)."""
        mine = {n: w for n, w in weights.items() if n in self.index}
        if self.a is None and not mine:
            self.slot_parts[slot] = set()
            return
        self.allocate()
        self.clear_slot(slot)
        R = self.R
        for name, w in mine.items():
            p = self.index[name]
            r = w.rank
            self.a[slot, p * R:p * R + r].copy_(w.a)
            self.b[p][slot, :, :r].copy_(w.b)
            self.scalings[p, slot] = w.scaling
            self.slot_parts[slot].add(p)

    def clear_slot(self, slot: int) -> None:
        if self.a is not None:
            self.a[slot].zero_()
            for b in self.b:
                b[slot].zero_()
            self.scalings[:, slot] = 0
        self.slot_parts[slot] = set()

    @property
    def allocated(self) -> bool:
        return self.a is not None

    def __call__(self, x: torch.Tensor, y: torch.Tensor, lora: LoRABatch) -> None:
        if self.a is None:
            return
        if lora.static:  # graph form: every part, every row; zero weights add exactly nothing
            parts = list(range(len(self.parts)))
        else:
            parts = sorted(set().union(*(self.slot_parts[s] for s in lora.active_slots)))
            if not parts:
                return
        if not use_triton(x) and not lora.static:
            if len(lora.active_slots) == 1:
                self._one_slot(x, y, lora, parts)
                return
            if lora.segments is not None and x.shape[0] >= _ROWS_PER_RUN * int(lora.segments[0].shape[0]):
                self._per_run(x, y, lora, parts)
                return
        # BGMV/SGMV (Triton), or their torch references: gather each row's A/B, batched matmul;
        # no host sync, cost independent of how many distinct adapters the batch holds
        R = self.R
        t = lora_shrink(x, self.a, lora.token_slots, lora.segments)
        for p in parts:
            lora_expand(y, t[:, p * R:(p + 1) * R], self.b[p], lora.token_slots, self.scalings[p],
                        out_offset=self.parts[p][1].start, segments=lora.segments)

    def _one_slot(self, x: torch.Tensor, y: torch.Tensor, lora: LoRABatch, parts: list[int]) -> None:
        """torch path, one adapter in the step (maybe beside base rows): plain GEMMs with its
        weights over all rows, base rows masked to zero; no gather, no host sync."""
        (slot,) = lora.active_slots
        R = self.R
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        t = x.to(acc) @ self.a[slot].to(acc).t()
        t = torch.where((lora.token_slots >= 0)[:, None], t, 0.0)
        for p in parts:
            if p not in self.slot_parts[slot]:
                continue
            sl = self.parts[p][1]
            d = (t[:, p * R:(p + 1) * R] @ self.b[p][slot].to(acc).t()) * self.scalings[p, slot]
            if y.dtype == acc:
                y[:, sl] += d
            else:
                y[:, sl] = (y[:, sl].to(acc) + d).to(y.dtype)

    def _per_run(self, x: torch.Tensor, y: torch.Tensor, lora: LoRABatch, parts: list[int]) -> None:
        """torch path, long runs of one slot (prefill): one GEMM pair per run, on row slices."""
        R = self.R
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        for a, b, slot in lora.host_segments():
            ps = [p for p in parts if slot >= 0 and p in self.slot_parts[slot]]
            if not ps:
                continue
            t = x[a:b].to(acc) @ self.a[slot].to(acc).t()
            for p in ps:
                sl = self.parts[p][1]
                d = (t[:, p * R:(p + 1) * R] @ self.b[p][slot].to(acc).t()) * self.scalings[p, slot]
                y[a:b, sl] += d.to(y.dtype)


_ROLES = ("w1", "w3", "w2")


class MoESite:
    """Expert LoRA buffers of one `MoE` block and the hook that runs the MoE with them."""

    def __init__(self, module: Any, num_slots: int, max_rank: int, dtype: torch.dtype, device: torch.device) -> None:
        self.module = module
        self.E, self.H, self.I, self.k = module.num_experts, module.hidden, module.inter, module.top_k
        self.S, self.R, self.dtype, self.device = num_slots, max_rank, dtype, device
        self.names = {module.expert_name(e, role): (e, role) for e in range(self.E) for role in _ROLES}
        self.a13: torch.Tensor | None = None
        self.used: list[bool] = [False] * num_slots
        # the same on the device, written only when a slot changes (no host copy per step)
        self.used_t = torch.zeros(num_slots, dtype=torch.bool, device=device)

    def touches_names(self, names: set[str]) -> bool:
        return any(n in self.names for n in names)

    def allocate(self) -> None:
        """The stacked buffers of all slots (zeros); idempotent."""
        if self.a13 is None:
            S, E, R, H, I = self.S, self.E, self.R, self.H, self.I
            z = dict(dtype=self.dtype, device=self.device)
            self.a13 = torch.zeros(S, E, 2 * R, H, **z)
            self.b1 = torch.zeros(S, E, I, R, **z)
            self.b3 = torch.zeros(S, E, I, R, **z)
            self.a2 = torch.zeros(S, E, R, I, **z)
            self.b2 = torch.zeros(S, E, H, R, **z)
            self.ones = torch.ones(S, dtype=torch.float32, device=self.device)

    def set_slot(self, slot: int, weights: dict[str, LoRAModuleWeights]) -> None:
        mine = {self.names[n]: w for n, w in weights.items() if n in self.names}
        if self.a13 is None and not mine:
            self.used[slot] = False
            return
        self.allocate()
        self.clear_slot(slot)
        R = self.R
        for (e, role), w in mine.items():
            r = w.rank
            b = w.b.to(torch.float32) * w.scaling  # scaling folded in: it may differ per expert
            if role == "w1":
                self.a13[slot, e, :r].copy_(w.a)
                self.b1[slot, e, :, :r].copy_(b)
            elif role == "w3":
                self.a13[slot, e, R:R + r].copy_(w.a)
                self.b3[slot, e, :, :r].copy_(b)
            else:
                self.a2[slot, e, :r].copy_(w.a)
                self.b2[slot, e, :, :r].copy_(b)
        self.used[slot] = bool(mine)
        self.used_t[slot] = bool(mine)

    def clear_slot(self, slot: int) -> None:
        if self.a13 is not None:
            for t in (self.a13, self.b1, self.b3, self.a2, self.b2):
                t[slot].zero_()
        self.used[slot] = False
        self.used_t[slot] = False

    @property
    def allocated(self) -> bool:
        return self.a13 is not None

    def touches(self, lora: LoRABatch) -> bool:
        """Whether this step runs the MoE with LoRA (a static batch always does, once allocated)."""
        return self.a13 is not None and (lora.static or any(self.used[s] for s in lora.active_slots))

    def __call__(self, x: torch.Tensor, weights: MoEWeights | AWQMoEWeights, topk_weights: torch.Tensor,
                 topk_ids: torch.Tensor, lora: LoRABatch) -> torch.Tensor | None:
        """The MoE output with each (token, k) row's expert adapted by the token's slot;
        None when no active slot has expert weights here (the caller runs plain `fused_moe`)."""
        if not self.touches(lora):
            return None
        slot_rows = lora.slot_of_rows(topk_ids.shape[1])
        if lora.static or not all(self.used[s] for s in lora.active_slots):
            # rows of slots with no expert weights here (e.g. an attention-only adapter) do no LoRA work
            slot_rows = torch.where(self.used_t[slot_rows.clamp(min=0).long()] & (slot_rows >= 0), slot_rows,
                                    torch.full_like(slot_rows, -1))
        return fused_moe(x, weights, topk_weights, topk_ids, hook=_ExpertLoRA(self, topk_ids, slot_rows, lora))

    # --- the LoRA terms on (token, k) rows, gathered per row (BGMV) ---------------------
    def _add_w13(self, h: torch.Tensor, x_rows: torch.Tensor, e_rows: torch.Tensor, s_rows: torch.Tensor) -> None:
        R, I = self.R, self.I
        t = moe_lora_shrink(x_rows, e_rows, s_rows, self.a13)
        moe_lora_expand(h[:, :I], t[:, :R], e_rows, s_rows, self.b1, self.ones)
        moe_lora_expand(h[:, I:], t[:, R:], e_rows, s_rows, self.b3, self.ones)

    def _w2_delta(self, act: torch.Tensor, e_rows: torch.Tensor, s_rows: torch.Tensor) -> torch.Tensor:
        t = moe_lora_shrink(act, e_rows, s_rows, self.a2)
        d = torch.zeros(act.shape[0], self.H, dtype=torch.float32, device=act.device)
        return moe_lora_expand(d, t, e_rows, s_rows, self.b2, self.ones)


class _ExpertLoRA:
    """The `MoEHook` of one step: each (token, k) row's expert adapted by its token's slot.

    Triton paths (rows in slot order) and decode/static steps on the torch path use the
    gathered per-row (BGMV) terms: cost independent of the number of adapters, no host sync.
    The torch path's other steps use plain GEMMs on contiguous slices of its sorted rows:
    - one adapter in the step: per-expert GEMMs with its weights, base rows masked;
    - prefill-shaped steps of several adapters: the rows sort by (expert, slot) (`sort_key`),
      so each (slot, expert) group is one slice with one GEMM pair.
    With zero LoRA terms the result is bit-identical to `fused_moe_torch` without a hook.
    """

    def __init__(self, site: MoESite, topk_ids: torch.Tensor, slot_rows: torch.Tensor, lora: LoRABatch) -> None:
        self.site, self.slot_rows = site, slot_rows
        self.flat = topk_ids.reshape(-1).long()
        self.one = None if lora.static or len(lora.active_slots) != 1 else next(iter(lora.active_slots))
        self.grouped = self.one is None and not lora.static and lora.segments is not None
        self.G = site.S + 1 if self.grouped else 1  # sub-groups per expert: base rows, then one per slot
        self.spans: list[tuple[int, int, int]] = []  # (expert, start, end) of the sorted rows
        self.groups: list[tuple[int, int, int, int]] = []  # (slot, expert, start, end), grouped only
        self.keep: torch.Tensor | None = None

    def sort_key(self, expert_of_slot: torch.Tensor) -> torch.Tensor:
        return expert_of_slot * self.G + (self.slot_rows.long() + 1) if self.grouped else expert_of_slot

    def _sliced(self, order: torch.Tensor | None) -> bool:
        """Whether this call adds per-slice GEMMs (torch path, one adapter or grouped); lays them out."""
        if order is None or (self.one is None and not self.grouped):
            return False
        if not self.spans:
            counts = torch.bincount(self.sort_key(self.flat), minlength=self.site.E * self.G).tolist()
            start = 0
            for e in range(self.site.E):
                c0 = start
                for g in range(self.G):
                    c = counts[e * self.G + g]
                    if c and g > 0:
                        self.groups.append((g - 1, e, start, start + c))
                    start += c
                if start > c0:
                    self.spans.append((e, c0, start))
            self.keep = (self.slot_rows.index_select(0, order) >= 0)[:, None]
        return True

    def _rows(self, order: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if order is None:
            return self.flat, self.slot_rows
        return self.flat.index_select(0, order), self.slot_rows.index_select(0, order)

    def add_w13(self, h: torch.Tensor, x_rows: torch.Tensor, order: torch.Tensor | None) -> None:
        site = self.site
        if not self._sliced(order):
            site._add_w13(h, x_rows, *self._rows(order))
            return
        I, R = site.I, site.R
        acc = torch.float64 if h.dtype == torch.float64 else torch.float32
        for slot, e, a, b in self._slices():
            t = x_rows[a:b].to(acc) @ site.a13[slot, e].to(acc).t()
            if self.one is not None:
                t = torch.where(self.keep[a:b], t, 0.0)
            h[a:b, :I] += (t[:, :R] @ site.b1[slot, e].to(acc).t()).to(h.dtype)
            h[a:b, I:] += (t[:, R:] @ site.b3[slot, e].to(acc).t()).to(h.dtype)

    def add_w2(self, y: torch.Tensor, act: torch.Tensor, order: torch.Tensor | None,
               row_weights: torch.Tensor | None) -> None:
        site = self.site
        if not self._sliced(order):
            d = site._w2_delta(act, *self._rows(order)).to(y.dtype)
            y.add_(d if row_weights is None else d * row_weights[:, None])
            return
        for slot, e, a, b in self._slices():  # torch path: `row_weights` is None (weighted after)
            t = act[a:b].to(y.dtype) @ site.a2[slot, e].to(y.dtype).t()
            if self.one is not None:
                t = torch.where(self.keep[a:b], t, 0.0)
            y[a:b] += t @ site.b2[slot, e].to(y.dtype).t()

    def _slices(self) -> list[tuple[int, int, int, int]]:
        """(slot, expert, start, end): the one adapter over each expert's rows, or each group."""
        return [(self.one, e, a, b) for e, a, b in self.spans] if self.one is not None else self.groups


__all__ = ["LinearSite", "MoESite"]
