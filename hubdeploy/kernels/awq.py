"""W4A16 AWQ linear: kernel layout (repacked once at load), torch reference, Triton kernel.

Kernel layout (`AWQPacked`), chosen so one output row's weights are contiguous along K:
- `qweight` int32 `[out, in/8]` (or `[E, out, in/8]` stacked for MoE): nibble `j` (bits
  4j..4j+3) of word `(n, c)` holds input channel `k = 8c + j` — natural order, no AWQ shuffle.
- `qzeros`  int32 `[in/g, out/8]`: nibble `j` of word `(g, c)` holds output column `8c + j`.
- `scales`  `[in/g, out]` in the checkpoint's dtype (fp16).
- `y = x @ W.T` with `W[n, k] = (q[n, k] - z[k // g, n]) * s[k // g, n]`.

The Triton kernel never materialises W: per K tile (inside one group) it computes
`s · (dot(a, q) − z · sum(a))` — raw 0..15 nibbles go through `tl.dot` exactly in fp16/bf16
and the zero point leaves the inner loop. Small M (decode) splits K so a few output tiles still fill
the GPU: M ≤ 4 runs as a GEMV (multiply-reduce, no tensor cores), M ≤ 16 as a skinny
`tl.dot` with BLOCK_M = 16; large M (prefill) uses bigger tiles and no split. The kernel and
its launcher live in awq_triton.py, imported only when Triton runs (kernels/dispatch.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from hubdeploy.kernels.awq_format import PACK_FACTOR, awq_unpack_int4, awq_dequantize, awq_quantize  # noqa: F401
from hubdeploy.kernels.dispatch import num_sms, use_triton
from hubdeploy.kernels.tuned import tuned_config

# ----------------------------------------------------------------------------------------
# Layout: packing helpers (plain torch)
# ----------------------------------------------------------------------------------------


def pack_int4_natural(vals: torch.Tensor) -> torch.Tensor:
    """Pack values 0..15 along the last dim, 8 per int32, nibble j = element 8c + j."""
    if vals.shape[-1] % PACK_FACTOR:
        raise ValueError(f"pack_int4_natural needs a last dim divisible by 8, got {tuple(vals.shape)}")
    v = vals.to(torch.int64).reshape(*vals.shape[:-1], vals.shape[-1] // PACK_FACTOR, PACK_FACTOR)
    shifts = torch.arange(0, 32, 4, device=v.device, dtype=torch.int64)
    packed = (v << shifts).sum(dim=-1)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)
    return packed.to(torch.int32)


def unpack_int4_natural(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_int4_natural`: int32 `[..., c]` -> uint8 `[..., 8c]`."""
    p = packed.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(0, 32, 4, device=p.device, dtype=torch.int64)
    vals = (p[..., None] >> shifts) & 0xF
    return vals.reshape(*p.shape[:-1], p.shape[-1] * PACK_FACTOR).to(torch.uint8)


@dataclass
class AWQPacked:
    """One AWQ linear (or a stack of E expert linears) in the kernel layout above.

    `_dequant_cache` holds a lazily built dense weight `[.., out, in]` per dtype for the CPU
    reference path only (the CPU engine calls `awq_linear_ref` every step; dequantizing each
    call would dominate). It is never filled for CUDA tensors, where the memory is the point.
    """

    qweight: torch.Tensor  # int32 [out, in/8] or [E, out, in/8]
    qzeros: torch.Tensor  # int32 [in/g, out/8] or [E, in/g, out/8]
    scales: torch.Tensor  # [in/g, out] or [E, in/g, out]
    in_features: int
    out_features: int
    group_size: int
    _dequant_cache: dict[Any, torch.Tensor] = field(default_factory=dict, repr=False, compare=False)

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    @property
    def num_experts(self) -> int | None:
        return self.qweight.shape[0] if self.qweight.dim() == 3 else None

    def to(self, device: torch.device | str) -> "AWQPacked":
        """Copy to `device` (the dequantized CPU cache is dropped)."""
        return AWQPacked(
            self.qweight.to(device), self.qzeros.to(device), self.scales.to(device),
            self.in_features, self.out_features, self.group_size,
        )

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Dense weight `[.., out, in]` (nn.Linear orientation) in `dtype` (default: scales')."""
        dtype = dtype or self.scales.dtype
        q = unpack_int4_natural(self.qweight).to(torch.float32)  # [.., out, in]
        z = unpack_int4_natural(self.qzeros).to(torch.float32)  # [.., in/g, out]
        s = self.scales.to(torch.float32)
        g = self.group_size
        z = z.repeat_interleave(g, dim=-2).transpose(-1, -2)  # [.., out, in]
        s = s.repeat_interleave(g, dim=-2).transpose(-1, -2)
        return ((q - z) * s).to(dtype)

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """Dense `[.., out, in]` weight; cached per dtype on the CPU (see class doc)."""
        if self.qweight.is_cuda:
            return self.dequantize(dtype)
        w = self._dequant_cache.get(dtype)
        if w is None:
            w = self.dequantize(dtype)
            self._dequant_cache[dtype] = w
        return w


def awq_repack(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int
) -> AWQPacked:
    """AutoAWQ GEMM tensors (`[in, out/8]`, `[in/g, out/8]`, `[in/g, out]`) -> `AWQPacked`.

    Done once at load on the target device; lossless (`dequantize()` equals `awq_dequantize`).
    """
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32:
        raise ValueError(f"AWQ qweight/qzeros must be int32, got {qweight.dtype}/{qzeros.dtype}")
    in_f, out_f = qweight.shape[0], qweight.shape[1] * PACK_FACTOR
    if group_size <= 0 or in_f % group_size or group_size % PACK_FACTOR:
        raise ValueError(
            f"group_size {group_size} must be a multiple of 8 dividing in_features {in_f}; "
            "this checkpoint's quantization_config.group_size does not fit the layer"
        )
    if qzeros.shape != (in_f // group_size, out_f // PACK_FACTOR) or scales.shape != (in_f // group_size, out_f):
        raise ValueError(
            f"AWQ shapes disagree: qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)}, "
            f"scales {tuple(scales.shape)} for group_size {group_size} (expected zeros "
            f"{(in_f // group_size, out_f // PACK_FACTOR)}, scales {(in_f // group_size, out_f)})"
        )
    iw = awq_unpack_int4(qweight)  # [in, out] uint8
    iz = awq_unpack_int4(qzeros)  # [in/g, out]
    qw_t = pack_int4_natural(iw.t().contiguous())  # [out, in/8]
    qz = pack_int4_natural(iz)  # [in/g, out/8]
    return AWQPacked(qw_t.contiguous(), qz.contiguous(), scales.contiguous(), in_f, out_f, group_size)


def stack_packed(parts: list[AWQPacked]) -> AWQPacked:
    """Stack same-shaped `AWQPacked` along a new leading expert dim."""
    p0 = parts[0]
    for p in parts:
        if (p.in_features, p.out_features, p.group_size) != (p0.in_features, p0.out_features, p0.group_size):
            raise ValueError("all stacked AWQ experts must share in/out features and group size")
    return AWQPacked(
        torch.stack([p.qweight for p in parts]), torch.stack([p.qzeros for p in parts]),
        torch.stack([p.scales for p in parts]), p0.in_features, p0.out_features, p0.group_size,
    )


def concat_out(a: AWQPacked, b: AWQPacked) -> AWQPacked:
    """Concatenate two linears of the same input along out (e.g. gate | up)."""
    if (a.in_features, a.group_size) != (b.in_features, b.group_size):
        raise ValueError("concat_out needs the same in_features and group_size")
    return AWQPacked(
        torch.cat([a.qweight, b.qweight], dim=-2), torch.cat([a.qzeros, b.qzeros], dim=-1),
        torch.cat([a.scales, b.scales], dim=-1), a.in_features, a.out_features + b.out_features,
        a.group_size,
    )


# ----------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------


def _check_x(x: torch.Tensor, packed: AWQPacked) -> None:
    if x.shape[-1] != packed.in_features:
        raise ValueError(f"awq_linear: x has {x.shape[-1]} features, layer expects {packed.in_features}")
    if packed.num_experts is not None:
        raise ValueError("awq_linear takes a single linear; stacked experts go through fused_moe")


def awq_linear_ref(x: torch.Tensor, packed: AWQPacked, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantize then matmul in x's dtype (the CPU engine's path)."""
    _check_x(x, packed)
    w = packed.dense_weight(x.dtype)
    return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))


# ----------------------------------------------------------------------------------------
# Triton
# ----------------------------------------------------------------------------------------



def awq_config(M: int, N: int, K: int, group_size: int, device: torch.device) -> dict[str, int]:
    """Tuned for this GPU (kernels/tuned.py) when a table is committed, else by M:

    M ≤ 4: GEMV (BLOCK_M = next power of two ≥ M, multiply-reduce on CUDA cores, split-K);
    M ≤ 16: skinny tl.dot with BLOCK_M 16 and split-K; larger M (prefill): big tiles, no split.
    """
    t = tuned_config("awq", f"N={N},K={K},G={group_size}", M, device)
    if t is not None and (M > 4 or t["BLOCK_M"] >= M):
        return t
    if M <= 16:
        bm = 16 if M > 4 else 1 << (M - 1).bit_length()
        bn = 64 if bm == 16 or bm == 1 else 32
        bk = min(group_size, 128)
        tiles = K // bk
        n_tiles = -(-N // bn)
        split = max(1, min(tiles, (2 * num_sms(device)) // max(n_tiles, 1)))
        cfg = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, num_warps=4, num_stages=4, LOOP_STAGES=3)
    else:
        bm = 64 if M <= 128 else 128
        bk = min(group_size, 64)
        cfg = dict(BLOCK_M=bm, BLOCK_N=128, BLOCK_K=bk, SPLIT_K=1, num_warps=8 if bm == 128 else 4, num_stages=3,
                   LOOP_STAGES=1)
    if not device.type == "cuda":  # interpreter: smaller tiles are far faster
        cfg.update(BLOCK_M=min(cfg["BLOCK_M"], 16), BLOCK_N=32, num_warps=1, num_stages=1, LOOP_STAGES=1)
    return cfg


def awq_linear(x: torch.Tensor, packed: AWQPacked, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x [.., in] @ W.T (+ bias)`: Triton on CUDA (or when forced), torch reference otherwise."""
    if use_triton(x):
        from hubdeploy.kernels.awq_triton import awq_linear_triton

        return awq_linear_triton(x, packed, bias)
    return awq_linear_ref(x, packed, bias)


__all__ = [
    "AWQPacked",
    "awq_repack",
    "awq_linear_ref",
    "awq_linear",
    "awq_config",
    "pack_int4_natural",
    "unpack_int4_natural",
    "stack_packed",
    "concat_out",
    "awq_quantize",
    "awq_dequantize",
]
