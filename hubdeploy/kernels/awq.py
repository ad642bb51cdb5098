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
`tl.dot` with BLOCK_M = 16; large M (prefill) uses bigger tiles and no split. Triton kernels are built lazily (`_kernels()`, keyed by interpreter mode) so importing this
module never imports triton: the CPU engine only needs the torch reference. Triton fixes
compiled-vs-interpreted at its first import, so TRITON_INTERPRET=1 must be set before that
(tests run the interpreter in a child process, see tests/test_kernels_awq.py).
"""
from __future__ import annotations

import functools

from dataclasses import dataclass, field
from typing import Any

import torch

from hubdeploy.kernels.awq_format import PACK_FACTOR, awq_unpack_int4, awq_dequantize, awq_quantize  # noqa: F401
from hubdeploy.kernels.dispatch import check_launchable, interpreting, lazy_kernels, use_triton
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

def _build_kernels() -> Any:
    import triton
    import triton.language as tl

    # A module global: Triton's interpreter resolves a kernel's callees through its module's
    # globals only (it re-executes the rewritten source there; closures are dropped).
    global _awq_tile_dot
    from hubdeploy.kernels.awq_tile import awq_tile_dot as _awq_tile_dot

    @triton.jit
    def awq_gemm_kernel(
        a_ptr, qw_ptr, qz_ptr, s_ptr, c_ptr,
        M, N, K,
        stride_am, stride_ak, stride_wn, stride_zg, stride_sg, stride_cs, stride_cm,
        TILES_PER_SPLIT,
        GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        COMPUTE_F32: tl.constexpr, LOOP_STAGES: tl.constexpr,
    ):
        # grid: (cdiv(N, BLOCK_N), cdiv(M, BLOCK_M), SPLIT_K); c is [SPLIT_K, M, N]
        # LOOP_STAGES: software pipelining of the K loop; Triton pipelines a dot-free (GEMV)
        # loop only when asked through tl.range (a launch's num_stages covers tl.dot loops)
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        pid_k = tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_mask = offs_m < M
        n_mask = offs_n < N
        offs_k = tl.arange(0, BLOCK_K)
        offs_kw = tl.arange(0, BLOCK_K // 8)
        shifts = tl.arange(0, 8) * 4
        z_shift = (offs_n % 8) * 4
        num_tiles = K // BLOCK_K
        t0 = pid_k * TILES_PER_SPLIT
        t1 = tl.minimum(t0 + TILES_PER_SPLIT, num_tiles)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        a_rows = a_ptr + offs_m[:, None] * stride_am
        w_rows = qw_ptr + offs_n[:, None] * stride_wn  # explicit strides: divisibility hints
        for t in tl.range(t0, t1, num_stages=LOOP_STAGES):
            k0 = t * BLOCK_K
            a = tl.load(a_rows + (k0 + offs_k)[None, :] * stride_ak, mask=m_mask[:, None], other=0.0)
            w = tl.load(w_rows + (k0 // 8 + offs_kw)[None, :], mask=n_mask[:, None], other=0)
            g = k0 // GROUP
            s = tl.load(s_ptr + g * stride_sg + offs_n, mask=n_mask, other=0.0).to(tl.float32)
            zw = tl.load(qz_ptr + g * stride_zg + offs_n // 8, mask=n_mask, other=0)
            acc += _awq_tile_dot(a, w, s, zw, shifts, z_shift, BLOCK_M, BLOCK_N, BLOCK_K, COMPUTE_F32)
        c = c_ptr + pid_k * stride_cs + offs_m[:, None] * stride_cm + offs_n[None, :]
        tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])

    return awq_gemm_kernel


_awq_tile_dot: Any = None
_kernels = lazy_kernels(_build_kernels)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (4 for the interpreter): sizes split-K."""
    if device.type == "cuda":
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 4


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
        split = max(1, min(tiles, (2 * _num_sms(device)) // max(n_tiles, 1)))
        cfg = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, num_warps=4, num_stages=4, LOOP_STAGES=3)
    else:
        bm = 64 if M <= 128 else 128
        bk = min(group_size, 64)
        cfg = dict(BLOCK_M=bm, BLOCK_N=128, BLOCK_K=bk, SPLIT_K=1, num_warps=8 if bm == 128 else 4, num_stages=3,
                   LOOP_STAGES=1)
    if not device.type == "cuda":  # interpreter: smaller tiles are far faster
        cfg.update(BLOCK_M=min(cfg["BLOCK_M"], 16), BLOCK_N=32, num_warps=1, num_stages=1, LOOP_STAGES=1)
    return cfg


def awq_linear_triton(
    x: torch.Tensor, packed: AWQPacked, bias: torch.Tensor | None = None, **overrides: int
) -> torch.Tensor:
    """Triton W4A16 GEMM/GEMV on the packed layout; output in x's dtype."""
    _check_x(x, packed)
    lead = x.shape[:-1]
    a = x.reshape(-1, packed.in_features)
    if a.stride(-1) != 1:
        a = a.contiguous()
    M, K, N = a.shape[0], packed.in_features, packed.out_features
    out = torch.empty(M, N, device=x.device, dtype=x.dtype)
    if M == 0:
        return out.reshape(*lead, N)
    cfg = awq_config(M, N, K, packed.group_size, x.device)
    cfg.update(overrides)
    bk = cfg["BLOCK_K"]
    if packed.group_size % bk or K % bk or bk % 8:
        raise ValueError(f"BLOCK_K {bk} must divide group_size {packed.group_size} and be a multiple of 8")
    tiles = K // bk
    split = max(1, min(cfg["SPLIT_K"], tiles))
    per = -(-tiles // split)
    split = -(-tiles // per)
    c = out if split == 1 else torch.empty(split, M, N, device=x.device, dtype=torch.float32)
    grid = (triton_cdiv(N, cfg["BLOCK_N"]), triton_cdiv(M, cfg["BLOCK_M"]), split)
    compute_f32 = interpreting() or x.dtype == torch.float32
    kernel = _kernels()
    check_launchable(kernel, x)
    kernel[grid](
        a, packed.qweight, packed.qzeros, packed.scales, c,
        M, N, K,
        a.stride(0), a.stride(1), packed.qweight.stride(0), packed.qzeros.stride(0), packed.scales.stride(0),
        (M * N if split > 1 else 0), N,
        per,
        GROUP=packed.group_size, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=bk,
        COMPUTE_F32=compute_f32, LOOP_STAGES=cfg.get("LOOP_STAGES", 1),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    if split > 1:
        out = c.sum(0).to(x.dtype)
    if bias is not None:
        out = out + bias.to(out.dtype)
    return out.reshape(*lead, N)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def awq_linear(x: torch.Tensor, packed: AWQPacked, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x [.., in] @ W.T (+ bias)`: Triton on CUDA (or when forced), torch reference otherwise."""
    if use_triton(x):
        return awq_linear_triton(x, packed, bias)
    return awq_linear_ref(x, packed, bias)


__all__ = [
    "AWQPacked",
    "awq_repack",
    "awq_linear_ref",
    "awq_linear_triton",
    "awq_linear",
    "awq_config",
    "check_launchable",
    "pack_int4_natural",
    "unpack_int4_natural",
    "stack_packed",
    "concat_out",
    "awq_quantize",
    "awq_dequantize",
]
