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
from hubdeploy.kernels.awq_cpu import Avx2Int4Weight, avx2_supported, to_avx2_int4
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

    On the CPU, bf16/fp16 activations use `cpu_int4()` (the weights stay 4-bit: our AVX2
    kernel, `awq_cpu.Avx2Int4Weight`, or torch's tinygemm, `CpuInt4Weight`, bf16 only). fp32
    (the reference mode) and shapes neither kernel takes use `_dequant_cache`, a lazily built
    dense weight `[.., out, in]` per dtype (the CPU engine calls the layer every step;
    dequantizing each call would dominate). Neither is ever filled for CUDA tensors, where the
    Triton kernels read this layout directly.
    """

    qweight: torch.Tensor  # int32 [out, in/8] or [E, out, in/8]
    qzeros: torch.Tensor  # int32 [in/g, out/8] or [E, in/g, out/8]
    scales: torch.Tensor  # [in/g, out] or [E, in/g, out]
    in_features: int
    out_features: int
    group_size: int
    _dequant_cache: dict[Any, torch.Tensor] = field(default_factory=dict, repr=False, compare=False)
    _cpu_int4: "CpuInt4Form | None" = field(default=None, repr=False, compare=False)

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    @property
    def num_experts(self) -> int | None:
        return self.qweight.shape[0] if self.qweight.dim() == 3 else None

    def to(self, device: torch.device | str) -> "AWQPacked":
        """Copy to `device` (the dequantized CPU cache is dropped)."""
        self._check_ints("to()")
        return AWQPacked(
            self.qweight.to(device), self.qzeros.to(device), self.scales.to(device),
            self.in_features, self.out_features, self.group_size,
        )

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Dense weight `[.., out, in]` (nn.Linear orientation) in `dtype` (default: scales')."""
        dtype = dtype or self.scales.dtype
        self._check_ints("dequantize()")
        q = unpack_int4_natural(self.qweight).to(torch.float32)  # [.., out, in]
        z = unpack_int4_natural(self.qzeros).to(torch.float32)  # [.., in/g, out]
        s = self.scales.to(torch.float32)
        g = self.group_size
        z = z.repeat_interleave(g, dim=-2).transpose(-1, -2)  # [.., out, in]
        s = s.repeat_interleave(g, dim=-2).transpose(-1, -2)
        return ((q - z) * s).to(dtype)

    def _check_ints(self, what: str) -> None:
        if self.qweight.shape[-1] * PACK_FACTOR != self.in_features:
            raise RuntimeError(f"AWQ {what}: this weight lives only in the CPU int4 form "
                               "(keep_cpu_int4_only), which serves the model's 16-bit dtype only")

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """Dense `[.., out, in]` weight; cached per dtype on the CPU (see class doc)."""
        if self.qweight.is_cuda:
            return self.dequantize(dtype)
        w = self._dequant_cache.get(dtype)
        if w is None:
            w = self.dequantize(dtype)
            self._dequant_cache[dtype] = w
        return w

    def cpu_int4(self) -> "CpuInt4Form | None":
        """The 4-bit CPU form (built once, cached): our AVX2 kernel's where it is available and
        takes the shape, else tinygemm's, else None (then callers use `dense_weight`)."""
        if self._cpu_int4 is None and self.qweight.device.type == "cpu":
            if avx2_supported(self.in_features, self.group_size):
                self._cpu_int4 = to_avx2_int4(unpack_int4_natural(self.qweight), unpack_int4_natural(self.qzeros),
                                              self.scales, self.group_size)
            elif cpu_int4_supported(self):
                self._cpu_int4 = to_cpu_int4(self)
        return self._cpu_int4

    def cpu_int4_for(self, dtype: torch.dtype) -> "CpuInt4Form | None":
        """The 4-bit CPU form when it serves activations of `dtype` (None for fp32, which keeps the
        exact dense reference, and for CUDA weights)."""
        if dtype not in (torch.bfloat16, torch.float16):
            return None
        w = self.cpu_int4()
        return w if w is not None and dtype in w.dtypes else None

    def build_cpu_int4(self) -> bool:
        """Build the int4 form now (at load); True when it was built by this call."""
        return self._cpu_int4 is None and self.cpu_int4() is not None

    def keep_cpu_int4_only(self) -> bool:
        """16-bit CPU serving reads only the int4 form: free the natural-layout integers (`qweight`,
        half of the resident weight memory otherwise), keeping their shape. Afterwards
        `dequantize` raises. True when freed now."""
        if self.cpu_int4() is None or self.qweight.shape[-1] == 0:
            return False
        self.qweight = self.qweight.new_empty(*self.qweight.shape[:-1], 0)
        self._dequant_cache.clear()
        return True


# ----------------------------------------------------------------------------------------
# CPU int4 (torch's tinygemm CPU kernel): AWQ stays 4-bit in memory
# ----------------------------------------------------------------------------------------

CPU_INT4_GROUP_SIZES = (32, 64, 128, 256)  # what `_weight_int4pack_mm_for_cpu` accepts
_CPU_INT4_INNER_K_TILES = 2  # K must be a multiple of 16 * this (32); group sizes all are


@dataclass
class CpuInt4Weight:
    """AWQ weights in torch's tinygemm CPU int4 layout (`aten._convert_weight_to_int4pack_for_cpu`).

    tinygemm computes `W[n, k] = (q - 8) · scale + zero` per group; AWQ's `(q - z) · s` is the
    same with `scale = s`, `zero = (8 - z) · s` (exact in fp32, stored rounded to bf16 as the
    kernel requires). The kernel is fast only for bf16 activations on this torch build (fp32 and
    fp16 take a slow path), so it serves bf16 alone. Same memory as the checkpoint: 4 bits per
    weight plus two bf16 values per group and output column.
    """

    weight: torch.Tensor  # uint8 [.., out, in/2]
    scale_and_zero: torch.Tensor  # bf16 [.., in/g, out, 2]
    group_size: int
    dtypes = (torch.bfloat16,)  # activations it serves fast

    def mm(self, x: torch.Tensor, expert: int | None = None) -> torch.Tensor:
        """`x [M, in]` (bf16) @ W.T -> `[M, out]` bf16; `expert` picks one of stacked experts."""
        w, sz = (self.weight, self.scale_and_zero) if expert is None else (self.weight[expert], self.scale_and_zero[expert])
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, w, self.group_size, sz)


def cpu_int4_supported(packed: AWQPacked) -> bool:
    """Whether the tinygemm CPU kernel takes this layer: a CPU tensor, out % 16, group 32..256."""
    return (
        packed.qweight.device.type == "cpu" and packed.out_features % 16 == 0
        and packed.group_size in CPU_INT4_GROUP_SIZES and packed.in_features % packed.group_size == 0
    )


def to_cpu_int4(packed: AWQPacked) -> CpuInt4Weight:
    """Repack `AWQPacked` (one linear or stacked experts) into `CpuInt4Weight`, losslessly for
    the integers; scale and zero rounded to bf16 (see `CpuInt4Weight`)."""
    if not cpu_int4_supported(packed):
        raise ValueError(
            f"CPU int4 needs out_features % 16 == 0 and group size in {CPU_INT4_GROUP_SIZES}; got out "
            f"{packed.out_features}, group {packed.group_size} on {packed.device}"
        )
    stacked = packed.num_experts is not None
    qw = packed.qweight if stacked else packed.qweight[None]
    qz = packed.qzeros if stacked else packed.qzeros[None]
    sc = packed.scales if stacked else packed.scales[None]
    weights, szs = [], []
    for e in range(qw.shape[0]):
        q = unpack_int4_natural(qw[e]).to(torch.int32).contiguous()  # [out, in]
        weights.append(torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, _CPU_INT4_INNER_K_TILES))
        s = sc[e].to(torch.float32)  # [in/g, out]
        z = unpack_int4_natural(qz[e]).to(torch.float32)
        szs.append(torch.stack([s, (8.0 - z) * s], dim=-1).to(torch.bfloat16))
    w, sz = torch.stack(weights), torch.stack(szs)
    if not stacked:
        w, sz = w[0], sz[0]
    return CpuInt4Weight(w.contiguous(), sz.contiguous(), packed.group_size)


CpuInt4Form = CpuInt4Weight | Avx2Int4Weight  # what `AWQPacked.cpu_int4` holds; both have `.mm(x, expert)`


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
    """Dequantize then matmul in x's dtype (the reference; the CPU path for fp32 x)."""
    _check_x(x, packed)
    w = packed.dense_weight(x.dtype)
    return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))


def awq_linear_cpu(x: torch.Tensor, packed: AWQPacked, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The CPU engine's path: 16-bit x through a 4-bit kernel (`AWQPacked.cpu_int4_for`),
    otherwise the reference (fp32 keeps exact reference numerics)."""
    _check_x(x, packed)
    w4 = packed.cpu_int4_for(x.dtype) if x.device.type == "cpu" else None
    if w4 is None:
        return awq_linear_ref(x, packed, bias)
    y = w4.mm(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], packed.out_features)
    return y if bias is None else y.add_(bias.to(y.dtype))


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
    """`x [.., in] @ W.T (+ bias)`: Triton on CUDA (or when forced), `awq_linear_cpu` otherwise."""
    if use_triton(x):
        from hubdeploy.kernels.awq_triton import awq_linear_triton

        return awq_linear_triton(x, packed, bias)
    return awq_linear_cpu(x, packed, bias)


__all__ = [
    "CpuInt4Weight",
    "CpuInt4Form",
    "cpu_int4_supported",
    "to_cpu_int4",
    "awq_linear_cpu",
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
