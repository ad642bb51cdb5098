"""The CPU engine's own machinery, kept out of the model runner's (GPU-shaped) path.

On the CPU a step is bound by memory traffic and by Python, not by launches, so the engine
does four things there that a GPU never needs: it lays weights out for the CPU GEMMs
(`cpu_gemm_layout`: NN storage for fp32, oneDNN-blocked copies for bf16/fp16, the 4-bit
kernel's layout for AWQ), builds every GEMM shape a step can use at load
(`_warm_up_cpu_gemms`), runs each step on one thread or all of them by its size, and keeps
the decode rows' K/V dense across steps (`kernels.cpu_step.DecodeKV`). `CpuBackend` owns all
of it; the runner makes one on a CPU device and runs each step inside `CpuBackend.step`. The
kernels read the step's state through `kernels.cpu_step`, so their signatures do not change.
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

import torch

from hubdeploy.kernels.cpu_step import DecodeKV, cpu_step
from hubdeploy.serving.config import EngineArgs
from hubdeploy.serving.heap import retain_freed_memory, return_freed_memory

if TYPE_CHECKING:
    from hubdeploy.serving.scheduler import ScheduledSeq

log = logging.getLogger(__name__)

# Tokens x weights per token from which a CPU step runs on all its threads: 256 tokens of the
# serving benchmark's tiny Mixtral (2.1M weights per token), where two threads made a 2048-token
# prefill step faster and decode-sized steps slower under load (benchmarks/RESULTS.md). A model
# with 512M+ weights per token (a 1B dense model) runs every step on all threads.
CPU_PARALLEL_MIN_WORK = 512 << 20


class CpuBackend:
    """Prepares a loaded model for the CPU and runs each of its steps (see the module docstring).

    Threads: all of `config.cpu_threads` (default: torch's) for steps of >=
    `parallel_min_tokens` tokens (default: CPU_PARALLEL_MIN_WORK / the model's weights per
    token), one for smaller steps, whose ops are too small to pay for a barrier and where a
    second busy core (the HTTP front end, clients) would stall every one of them.
    """

    def __init__(self, model: torch.nn.Module, num_layers: int, config: EngineArgs, dtype: torch.dtype) -> None:
        self.threads = max(1, config.cpu_threads or torch.get_num_threads())
        self.parallel_min_tokens = config.cpu_parallel_min_tokens or max(
            1, -(-CPU_PARALLEL_MIN_WORK // max(1, active_weights_per_token(model))))
        # decode K/V kept dense across steps instead of gathered per layer per step; None = gather
        self.dense_kv: DecodeKV | None = DecodeKV(num_layers)
        cpu_gemm_layout(model)
        return_freed_memory()  # load and repack temporaries (AWQ int4: hundreds of MB)
        retain_freed_memory()  # prefill temporaries reuse heap memory instead of fresh pages
        if dtype in (torch.bfloat16, torch.float16):
            _warm_up_cpu_gemms(model, config.max_num_batched_tokens, self.threads)

    def threads_for(self, batch: list[ScheduledSeq]) -> int:
        big = sum(item.num_tokens for item in batch) >= self.parallel_min_tokens
        return self.threads if big else 1

    @contextmanager
    def step(self, batch: list[ScheduledSeq]) -> Iterator[None]:
        """Run the body as this batch's step: its thread count (the caller's restored after),
        and a `kernels.cpu_step` whose dense K/V rows are found by sequence (id and preemption
        count: a recomputed context is never taken for the old one)."""
        keys = [(item.seq.seq_id, item.seq.num_preemptions) for item in batch] if self.dense_kv else None
        caller, want = torch.get_num_threads(), self.threads_for(batch)
        if want != caller:
            torch.set_num_threads(want)
        try:
            with cpu_step(self.dense_kv, keys):
                yield
        finally:
            if want != caller:
                torch.set_num_threads(caller)


def active_weights_per_token(model: torch.nn.Module) -> int:
    """Weights one token multiplies in a forward: every linear, and top_k experts of each MoE."""
    from hubdeploy.serving.models.layers import Linear, MoE

    n = 0
    for m in model.modules():
        if isinstance(m, Linear):
            n += m.in_features * m.out_features
        elif isinstance(m, MoE):
            n += m.top_k * 3 * m.hidden * m.inter
    return n


def cpu_gemm_layout(model: torch.nn.Module) -> int:
    """Store every plain linear / expert weight `[out, in]` as the transpose of a contiguous `[in, out]`.

    Same shapes and values, other strides: `x @ W.t()` then runs MKL's NN GEMM, faster than
    the NT one at decode sizes on the CPU (bit-identical results at M >= 16; at M = 1 MKL
    takes a GEMV whose rounding differs in the last bits). Weights shared with an embedding
    are left alone (row lookups want rows). fp32 only: bf16/fp16 GEMMs run in oneDNN, which
    packs the weight itself and was no faster on `[in, out]` storage, so low-precision weights
    keep the checkpoint's `[out, in]` and, on a CPU with native bf16, get a oneDNN-blocked copy
    instead (`_pack_low_precision`: a second copy of those weights in memory). Figures:
    benchmarks/RESULTS.md. Returns the number of tensors changed (or packed).
    """
    from hubdeploy.serving.models.layers import Linear, MoE

    shared = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    params: list[torch.nn.Parameter] = []
    for m in model.modules():
        if isinstance(m, Linear) and isinstance(m.weight, torch.nn.Parameter) and id(m.weight) not in shared:
            params.append(m.weight)
        elif isinstance(m, MoE) and not m.quantized:
            params += [m.w13, m.w2]
    changed = _pack_low_precision(model)
    for p in params:
        if p.dtype in (torch.bfloat16, torch.float16):
            continue
        if p.dim() >= 2 and p.is_contiguous():
            p.data = p.data.transpose(-1, -2).contiguous().transpose(-1, -2)
            changed += 1
    return changed


def _pack_low_precision(model: torch.nn.Module) -> int:
    """bf16/fp16 on a CPU with native bf16 (`kernels.cpu_gemm.blocked_low_precision_supported`):
    a oneDNN-blocked copy of every plain linear and expert weight, filed with
    `kernels.cpu_gemm.remember_packed` (used while the weight keeps its storage); bf16 also the
    LM head's (a tied head: the embedding's, for logits only; fp16 heads stay plain, blocked was
    slower at one row); bf16/fp16 AWQ: the 4-bit kernel's layout of every AWQ weight
    (`AWQPacked.cpu_int4`, at load rather than on a request's first step). Returns how many
    weights were (re)packed, 0 when all are current."""
    from hubdeploy.kernels.cpu_gemm import (LOW_PRECISION, blocked_low_precision_supported, pack_weight,
                                            packed_copy, remember_packed)
    from hubdeploy.serving.models.layers import Linear, MoE

    n = 0
    dtype = getattr(model, "dtype", None)
    if dtype in LOW_PRECISION:
        for m in model.modules():
            awq = [m.packed] if isinstance(m, Linear) and m.packed is not None else []
            if isinstance(m, MoE) and m.quantized and m.weights is not None:
                awq = [m.weights.w13, m.weights.w2]
            for p in awq:
                built = p.build_cpu_int4()
                if p.cpu_int4_for(dtype) is not None:
                    n += built
                    p.keep_cpu_int4_only()  # the int4 form is all a 16-bit step reads
    if not blocked_low_precision_supported():
        return n  # our 16-bit kernel serves the plain weights (a CPU without native bf16)
    head = getattr(model, "lm_head", None)
    for m in model.modules():
        if isinstance(m, Linear) and isinstance(m.weight, torch.nn.Parameter) and m.weight.dtype in LOW_PRECISION:
            if m is head and m.weight.dtype != torch.bfloat16:
                continue
            if packed_copy(m.weight) is None:
                pw = pack_weight(m.weight)
                if pw is not None:
                    remember_packed(pw, m.weight)
                    n += 1
        elif isinstance(m, MoE) and not m.quantized and m.w13.dtype in LOW_PRECISION:
            if packed_copy(m.w13, m.w2) is None:
                p13 = [pack_weight(t) for t in m.w13]
                p2 = [pack_weight(t) for t in m.w2]
                if all(p is not None for p in p13 + p2):
                    remember_packed((p13, p2), m.w13, m.w2)
                    n += 2
    embed = getattr(model, "embed_tokens", None)
    if head is None and embed is not None and embed.weight.dtype == torch.bfloat16 and packed_copy(embed.weight) is None:
        pw = pack_weight(embed.weight)  # the tied head's weight (rows stay rows for the lookup)
        if pw is not None:
            remember_packed(pw, embed.weight)
            n += 1
    return n


def _warm_up_cpu_gemms(model: torch.nn.Module, max_rows: int, cpu_threads: int) -> None:
    """bf16/fp16: oneDNN builds every GEMM shape a step can use now, not on a request's first
    use of it (`kernels.cpu_gemm.warm_up`). Weights our AVX2 16-bit kernel serves (no blocked
    copy without native bf16) need no per-shape build: the kernel is loaded instead."""
    from hubdeploy.kernels.awq_cpu import dense16_supported
    from hubdeploy.kernels.cpu_gemm import packed_copy, warm_up
    from hubdeploy.serving.models.layers import Linear, MoE

    weights: list[tuple[torch.Tensor, torch.Tensor | None, bool]] = []
    for m in model.modules():
        if isinstance(m, Linear) and isinstance(m.weight, torch.nn.Parameter):
            packed = packed_copy(m.weight)
            if packed is not None or not dense16_supported(m.weight):
                weights.append((m.weight, packed, False))
        elif isinstance(m, MoE) and not m.quantized:
            packed = packed_copy(m.w13, m.w2)
            if packed is not None or not dense16_supported(m.w13, m.w2):
                p13, p2 = packed or ([None], [None])
                weights += [(m.w13[0], p13[0], True), (m.w2[0], p2[0], True)]
    t0 = time.perf_counter()
    n = warm_up(weights, max_rows, (1, cpu_threads) if cpu_threads > 1 else (1,))
    log.info("CPU GEMM warm-up: %d shapes built in %.1f s", n, time.perf_counter() - t0)
