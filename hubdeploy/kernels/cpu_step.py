"""The CPU engine's per-step state: what the kernels' CPU paths keep for one step, or across steps.

A CPU step is many small ops, and much of what a layer's CPU path derives from the step's
metadata is the same in every layer (the decode block index and key mask, the rotary rows,
the padding-slot check). The CPU backend (`serving.cpu_backend.CpuBackend`) opens one
`CpuStep` around each forward; the CPU paths memoize into `step_memo()` and read the decode
rows' K/V from its `DecodeKV`. Outside a step (a model called directly, tests of a kernel)
there is none and the paths recompute: the same values. So a kernel's signature is one
contract for its reference, Triton and CPU paths, and none of this reaches the GPU path.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

__all__ = ["CpuStep", "DecodeKV", "DensePlan", "KERNEL_SWITCHES", "cpu_step", "current_step", "dense_kv_views",
           "gather_blocks", "kernel_switch", "step_memo"]

# Environment variables that pick kernels (dispatch.py, awq_cpu.py). Reading os.environ costs
# microseconds and the dispatchers ask on every call, so a CPU step reads them once.
KERNEL_SWITCHES = ("HUBDEPLOY_FORCE_TRITON", "HUBDEPLOY_CPU_INT4", "HUBDEPLOY_CPU_GEMM16")


def _read_switches() -> dict[str, str]:
    env = os.environ
    return {name: env[name] for name in KERNEL_SWITCHES if name in env}


@dataclass
class CpuStep:
    """One forward step on the CPU: a memo for what every layer would recompute, the decode
    K/V buffers with each batch entry's key into them (None: gather every step), and the
    kernel switches as the environment had them when the step began."""

    memo: dict[Any, Any] = field(default_factory=dict)
    dense: DecodeKV | None = None
    keys: list | None = None
    switches: dict[str, str] = field(default_factory=_read_switches)


# a ContextVar, not a global: an engine thread and a test calling a model directly never share a step
_CURRENT: ContextVar[CpuStep | None] = ContextVar("hubdeploy_cpu_step", default=None)


@contextmanager
def cpu_step(dense: DecodeKV | None = None, keys: list | None = None) -> Iterator[CpuStep]:
    """Run the body as one CPU step (a fresh memo; `dense` with each batch entry's `keys`)."""
    token = _CURRENT.set(CpuStep(dense=dense, keys=keys))
    try:
        yield _CURRENT.get()  # type: ignore[misc]
    finally:
        _CURRENT.reset(token)


def current_step() -> CpuStep | None:
    return _CURRENT.get()


def kernel_switch(name: str, default: str = "") -> str:
    """A kernel switch's value (one of KERNEL_SWITCHES): as the current CPU step read it, or
    from the environment now outside a step."""
    step = _CURRENT.get()
    return (step.switches if step is not None else os.environ).get(name, default)


def step_memo() -> dict[Any, Any] | None:
    """The current step's memo, None outside a step (then the caller recomputes)."""
    step = _CURRENT.get()
    return None if step is None else step.memo


def gather_blocks(cache: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """`cache[blocks]` for a [B, nblk] block index as one `index_select` (2x faster than advanced indexing)."""
    nb, bs, hkv, d = cache.shape
    flat = cache.view(nb, bs * hkv * d).index_select(0, blocks.reshape(-1))
    return flat.view(blocks.shape[0], blocks.shape[1] * bs, hkv, d)



@dataclass
class DensePlan:
    """One decode step's instructions for every layer's `DecodeKV` buffers (made once per step)."""

    step: int
    prev_step: int  # the plan before this one: a layer whose buffers applied it is up to date
    shape: tuple[int, int]  # (rows, token capacity) the buffers must have
    length: int  # L: the step reads buffer[:B, :L]
    order: torch.Tensor | None  # batch entry of each buffer row 0..B-1; None when row i is entry i
    rows: torch.Tensor | None  # buffer row of each batch entry (the inverse of `order`)
    moves: tuple[torch.Tensor, torch.Tensor] | None  # (from rows, to rows): continuing sequences moved below B
    fill: tuple[torch.Tensor, torch.Tensor] | None  # (batch entries, their rows): gather whole contexts
    append: tuple[torch.Tensor, torch.Tensor] | None  # (flat buffer positions, cache slots) of new tokens
    all_rows: torch.Tensor  # rows 0..B-1 with each entry's blocks, for a layer that must gather all


class DecodeKV:
    """Dense copies of the decode rows' K/V, one buffer pair per layer, kept across steps (CPU path).

    Without them, every layer of every decode step gathers each sequence's whole context out
    of the paged cache (memory traffic that grows with batch x context and dominates the CPU
    attention). Here each decoding sequence owns a row of the buffers, found by the key its
    owner gives it (`plan(keys, ...)`: sequence id and preemption count, so a recomputed context
    is never taken for the old one). A step appends one K/V position to each row that held the
    sequence up to its previous token, gathers whole contexts only for sequences new to the
    buffers, and moves the few rows that sit past the batch size into rows freed by finished
    sequences, so the step reads `[:B, :L]` views (queries permuted to row order when the batch
    order differs). A batch that changes by one sequence so costs one row, not a regather of all.
    Every row's values at visible positions equal the gather's, the masked tail is finite, and
    L is the same: SDPA's output is bit-identical (tests/test_cpu_step.py).
    Buffers keep `headroom` tokens past L; `max_bytes` bounds them all (over it: gather).
    """

    def __init__(self, num_layers: int, max_bytes: int = 256 << 20, headroom: int = 64) -> None:
        self.num_layers = max(1, num_layers)
        self.max_bytes = max_bytes
        self.headroom = headroom
        self.min_gather_bytes = 64 << 10
        self.step = 0
        self.prev_plan_step = -1
        self.shape = (0, 0)  # (rows, token capacity) of the buffers
        self.held: dict = {}  # key -> (row, context length the row holds)
        self.layers: dict[int, list] = {}  # id(k_cache) -> [kd, vd, step of the plan last applied]
        self.appended = 0  # layer-steps that appended new tokens (for tests and benchmarks)
        self.gathered = 0  # layer-steps that gathered whole contexts
        self.moved = 0  # rows moved below the batch size (sequences that kept their data)

    def plan(self, keys: list, context_lens: torch.Tensor, blocks: torch.Tensor, bs: int) -> DensePlan:
        """Once per step: where each sequence's row is and what every layer must copy into it."""
        self.step += 1
        b, nblk = blocks.shape
        length = nblk * bs
        lens = context_lens.tolist()
        rows_cap, cap = self.shape
        if b > rows_cap or length > cap:
            rows_cap = max(rows_cap, -(-b // 8) * 8)
            cap = max(cap, -(-(length + self.headroom) // bs) * bs)
        held = self.held
        rows = [-1] * b
        continuing = [i for i, (k, n) in enumerate(zip(keys, lens)) if held.get(k, (0, -1))[1] == n - 1]
        for i in continuing:
            r = held[keys[i]][0]
            if r < b:
                rows[i] = r
        free = iter(sorted(set(range(b)) - set(rows)))
        move_from, move_to = [], []
        for i in continuing:
            if rows[i] < 0:  # its row lies past the batch: move it into a freed one
                rows[i] = next(free)
                move_from.append(held[keys[i]][0])
                move_to.append(rows[i])
        self.moved += len(move_from)
        fill = [i for i in range(b) if rows[i] < 0]
        for i in fill:
            rows[i] = next(free)
        self.held = {k: (r, n) for k, r, n in zip(keys, rows, lens)}
        identity = rows == list(range(b))
        rows_t = None if identity else torch.tensor(rows, dtype=torch.long)
        order = None
        if rows_t is not None:
            order = torch.empty_like(rows_t)
            order[rows_t] = torch.arange(b)
        append = None
        if continuing:
            sel = None if len(continuing) == b else torch.tensor(continuing, dtype=torch.long)
            pos = context_lens.to(torch.long) - 1
            src = blocks.gather(1, (pos // bs)[:, None]).squeeze(1) * bs + pos % bs
            dst = (rows_t if rows_t is not None else torch.arange(b)) * cap + pos
            append = (dst, src) if sel is None else (dst.index_select(0, sel), src.index_select(0, sel))
        t = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
        plan = DensePlan(
            step=self.step, prev_step=self.prev_plan_step, shape=(rows_cap, cap), length=length, order=order,
            rows=rows_t, moves=(t(move_from), t(move_to)) if move_from else None,
            fill=(t(fill), t([rows[i] for i in fill])) if fill else None, append=append,
            all_rows=rows_t if rows_t is not None else torch.arange(b))
        self.prev_plan_step = self.step
        self.shape = (rows_cap, cap)
        return plan

    def worth(self, b: int, length: int, row_bytes: int) -> bool:
        """Dense buffers for this step: within `max_bytes`, and only when a gather would move
        enough bytes (>= `min_gather_bytes` per K or V) to pay for the few extra small ops."""
        rows = max(self.shape[0], b)
        cap = max(self.shape[1], length + self.headroom)
        return (b * length * row_bytes >= self.min_gather_bytes
                and 2 * rows * cap * row_bytes * self.num_layers <= self.max_bytes)


def dense_kv_views(dense: DecodeKV, plan: DensePlan, k_cache: torch.Tensor, v_cache: torch.Tensor,
              blocks: torch.Tensor, acc_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """This layer's [B, L, Hkv, D] K/V views of `dense`'s buffers (in buffer-row order), brought
    up to date as `plan` says: grow, move rows, gather new sequences, append new tokens."""
    b = blocks.shape[0]
    _, bs, hkv, d = k_cache.shape
    L = plan.length
    entry = dense.layers.get(id(k_cache))
    if entry is not None and entry[2] == plan.step:  # already brought up to date in this step
        return entry[0][:b, :L], entry[1][:b, :L]
    current = entry is not None and entry[2] == plan.prev_step and entry[0].dtype == acc_dtype
    if entry is None or tuple(entry[0].shape[:2]) != plan.shape or entry[0].dtype != acc_dtype:
        # zeros: the masked tail of a row is read and must be finite
        grown = [torch.zeros((*plan.shape, hkv, d), dtype=acc_dtype, device=k_cache.device) for _ in range(2)]
        if current:
            r, c = (min(x, y) for x, y in zip(entry[0].shape[:2], plan.shape))
            for new, old in zip(grown, entry[:2]):
                new[:r, :c] = old[:r, :c]
        entry = [*grown, 0]
        dense.layers[id(k_cache)] = entry
    if not current:  # this layer missed the last plan: gather every row
        fill: tuple[torch.Tensor, torch.Tensor] | None = (torch.arange(b), plan.all_rows)
        moves, append = None, None
    else:
        fill, moves, append = plan.fill, plan.moves, plan.append
    for buf, cache in ((entry[0], k_cache), (entry[1], v_cache)):
        if moves is not None:
            buf.index_copy_(0, moves[1], buf.index_select(0, moves[0]))
        if fill is not None:
            rows = gather_blocks(cache, blocks.index_select(0, fill[0]) if fill[0].shape[0] != b else blocks)
            buf.narrow(1, 0, L).index_copy_(0, fill[1], rows if rows.dtype == acc_dtype else rows.to(acc_dtype))
        if append is not None:
            new = cache.view(-1, hkv, d).index_select(0, append[1])
            buf.view(-1, hkv, d).index_copy_(0, append[0], new if new.dtype == acc_dtype else new.to(acc_dtype))
    dense.gathered += fill is not None
    dense.appended += append is not None
    entry[2] = plan.step
    return entry[0][:b, :L], entry[1][:b, :L]
