"""CPU bf16/fp16 GEMMs with the row count rounded up to a few buckets.

On a CPU with native bf16 (AVX512-BF16/AMX: ~10x fp32) torch runs bf16/fp16 matmuls through oneDNN,
which builds a new primitive for every new shape — about 1-2 ms, measured here (a cached
one runs a 1000x512x256 GEMM in 0.3 ms). The engine's row counts change every step
(tokens per prefill step, tokens per expert), so without care nearly every GEMM pays that
build. Rounding the row count up to a bucket (exact up to 16, then multiples of 16, then
eight buckets per power of two: at most 12.5% padding) keeps the set of shapes small and
the oneDNN primitive cache warm. fp32 (MKL sgemm, no per-shape build) is never padded.

oneDNN also re-blocks a plain weight on every call: at decode sizes that is half the GEMM
(a 4x256 @ 256x1024 bf16 GEMM: 71 us plain, 35 us on a pre-blocked weight; same bits), so
up to `PACKED_MAX_ROWS` rows the blocked copy is used. `pack_weight` makes it once (the CPU
backend does, at load: `serving.cpu_backend.cpu_gemm_layout`) and `remember_packed` files it
under its weight, where `linear` and the MoE CPU path find it; it costs a second copy of the
bf16 weights. Without native bf16 oneDNN emulates it and our 16-bit kernel
(`kernels.awq_cpu.Avx2Dense16Weight`) is faster from a few rows up, so no copies are made there
(`blocked_low_precision_supported`).
A packed copy is used only while its weight still has the storage, shape and strides it was
made from (`packed_for`); weights written in place afterwards need packing again.
"""
from __future__ import annotations

import functools
import time
import weakref
from typing import Any

import torch
import torch.nn.functional as F

from hubdeploy.kernels.awq_cpu import Avx2Dense16Weight, dense16_supported

LOW_PRECISION = (torch.bfloat16, torch.float16)


# Rows up to which the blocked weight is used: above it the plain call was as fast or faster
# here (2048x256 @ 256x512: 0.52 ms blocked, 0.36 ms plain; 1024x256 @ 256x1024: 0.37 / 0.36 ms).
PACKED_MAX_ROWS = 256


def bucket_rows(m: int) -> int:
    """The row count a CPU low-precision GEMM of `m` rows runs at (>= m)."""
    if m <= 16:
        return m
    if m <= 256:
        return -(-m // 16) * 16
    step = 1 << (m.bit_length() - 4)  # 8 buckets per power of two
    return -(-m // step) * step


def weight_key(*weights: torch.Tensor) -> tuple:
    """What a packed copy was made from: storage, shape, strides and dtype of each weight."""
    return tuple((w.data_ptr(), tuple(w.shape), w.stride(), w.dtype) for w in weights)


def pack_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """oneDNN's blocked copy of a bf16/fp16 CPU weight `[out, in]` for `packed_linear`, or None
    (other dtypes or devices, or a torch build without the op)."""
    if weight.dtype not in LOW_PRECISION or weight.device.type != "cpu" or weight.dim() != 2:
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), 16)
    except (AttributeError, RuntimeError):  # no mkldnn in this torch build
        return None


@functools.lru_cache(maxsize=None)
def native_bf16_cpu() -> bool:
    """Whether this CPU computes in bf16 natively (AVX512-BF16 or AMX): only there are oneDNN's
    blocked bf16 GEMMs fast; elsewhere oneDNN emulates bf16 and our 16-bit kernel is faster."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch's cpuinfo, any OS
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


@functools.lru_cache(maxsize=None)
def onednn_blocks_low_precision() -> bool:
    """Whether this CPU and torch build make oneDNN-blocked bf16 weights at all (oneDNN needs
    avx512bw/vl/dq or avx_ne_convert), whether or not the engine keeps them."""
    return pack_weight(torch.zeros(16, 16, dtype=torch.bfloat16)) is not None


def blocked_low_precision_supported() -> bool:
    """Whether the engine keeps oneDNN-blocked copies of bf16/fp16 weights: where oneDNN makes them
    and either the CPU has native bf16 or our 16-bit kernel cannot serve (not built, or turned off
    by `HUBDEPLOY_CPU_GEMM16=torch`). Elsewhere our kernel serves the checkpoint's own weights: no
    second copy. Figures: benchmarks/RESULTS.md, "16-bit GEMMs on an AVX-512 Xeon"."""
    if not onednn_blocks_low_precision():
        return False
    return native_bf16_cpu() or not dense16_supported(torch.zeros(1, 8, dtype=torch.bfloat16))


def packed_for(entry: tuple[tuple, Any] | None, *weights: torch.Tensor) -> Any:
    """The packed payload of `entry = (weight_key(...), payload)` if made from these weights, else None."""
    if entry is None or entry[0] != weight_key(*weights):
        return None
    return entry[1]


# Blocked copies by the id of the first weight they were made from; an entry goes with its weight.
_PACKED: dict[int, tuple[tuple, Any]] = {}


def remember_packed(payload: Any, *weights: torch.Tensor) -> None:
    """File `payload` (blocked copies of `weights`) for `packed_copy`, valid while the weights keep
    their storage, shape and strides."""
    key = id(weights[0])
    _PACKED[key] = (weight_key(*weights), payload)
    weakref.finalize(weights[0], _PACKED.pop, key, None)


def packed_copy(*weights: torch.Tensor) -> Any:
    """What `remember_packed` filed for these weights, if still made from them; else None."""
    return packed_for(_PACKED.get(id(weights[0])), *weights)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`; on the CPU, 2-D bf16/fp16 x through `padded_linear` on the
    weight's blocked copy when one was filed, else through our AVX2 16-bit kernel where it
    runs (`kernels.awq_cpu.Avx2Dense16Weight`: no blocked copies without native bf16)."""
    if x.dtype not in LOW_PRECISION or x.device.type != "cpu" or x.dim() != 2:
        return F.linear(x, weight, bias)
    packed = packed_copy(weight)
    if packed is None and weight.dtype == x.dtype and dense16_supported(weight):
        y = Avx2Dense16Weight(weight).mm(x)
        return y if bias is None else y.add_(bias)
    return padded_linear(x, weight, bias, packed)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x @ W.T (+ b)` on a `pack_weight` copy of W (x 2-D, contiguous, W's dtype)."""
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")


def padded_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, packed: torch.Tensor | None = None
) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for 2-D CPU x; bf16/fp16 rows padded to `bucket_rows`, and
    run on `packed` (a `pack_weight` copy of `weight`) when given.

    Other dtypes, devices and shapes go straight to `F.linear` (fp32 stays bit-identical).
    The result is a contiguous row prefix of the padded output.
    """
    if x.dtype not in LOW_PRECISION or x.device.type != "cpu" or x.dim() != 2:
        return F.linear(x, weight, bias)
    m = x.shape[0]
    mb = bucket_rows(m)
    xp = x
    if mb != m:
        xp = x.new_empty((mb, x.shape[1]))
        xp[:m] = x
        xp[m:].zero_()
    use_packed = packed is not None and mb <= PACKED_MAX_ROWS
    y = packed_linear(xp, packed, bias) if use_packed else F.linear(xp, weight, bias)
    return y if mb == m else y[:m]


def row_buckets(max_rows: int) -> list[int]:
    """Every row count `bucket_rows` gives for 1..max_rows, ascending."""
    out, m = [], 1
    while m <= max_rows:
        b = bucket_rows(m)
        out.append(b)
        m = b + 1
    return out


def warm_up(weights: list[tuple[torch.Tensor, torch.Tensor | None, bool]], max_rows: int,
            threads: tuple[int, ...], budget_s: float = 60.0) -> int:
    """Build oneDNN's primitive for every (weight shape, row bucket, thread count) a CPU engine
    step can use, so no request pays the 1-4 ms build on a first use (the first 32-way bf16
    round after start-up ran at 0.78x of later ones). `weights`: (W [out, in], its `pack_weight`
    copy or None, whether it is an expert weight, which runs through `torch.mm(out=)` at prefill
    sizes); up to PACKED_MAX_ROWS rows the packed call, above it the plain one; the first thread
    count covers steps below the engine's parallel threshold (rows <= PACKED_MAX_ROWS), the rest
    all buckets. One weight per distinct shape is enough (the primitive does not depend on the
    values). Stops after `budget_s`; returns the number of GEMMs run."""
    shapes: dict[tuple, tuple[torch.Tensor, torch.Tensor | None, bool]] = {}
    for w, packed, expert in weights:
        if w.dtype in LOW_PRECISION and w.device.type == "cpu" and w.dim() == 2:
            shapes.setdefault((tuple(w.shape), w.dtype, packed is not None, expert), (w, packed, expert))
    caller = torch.get_num_threads()
    deadline = time.monotonic() + budget_s
    n = 0
    try:
        for i, nthreads in enumerate(threads):
            torch.set_num_threads(nthreads)
            top = min(max_rows, PACKED_MAX_ROWS) if i == 0 else max_rows
            for w, packed, expert in shapes.values():
                for m in row_buckets(top):
                    if time.monotonic() > deadline:
                        return n
                    x = torch.zeros(m, w.shape[1], dtype=w.dtype)
                    if packed is not None and m <= PACKED_MAX_ROWS:
                        packed_linear(x, packed)
                    if packed is None or m > PACKED_MAX_ROWS or i > 0:
                        if expert:
                            torch.mm(x, w.t(), out=torch.empty(m, w.shape[0], dtype=w.dtype))
                        else:
                            F.linear(x, w)
                    n += 1
    finally:
        torch.set_num_threads(caller)
    return n


__all__ = [
    "LOW_PRECISION",
    "PACKED_MAX_ROWS",
    "bucket_rows",
    "linear",
    "pack_weight",
    "packed_copy",
    "packed_for",
    "packed_linear",
    "padded_linear",
    "remember_packed",
    "row_buckets",
    "warm_up",
    "weight_key",
]
