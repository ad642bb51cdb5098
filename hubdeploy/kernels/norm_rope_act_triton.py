"""Triton kernels of kernels/norm_rope_act.py: RMSNorm (+ residual), rotary (neox), SiLU·mul.

Imported by norm_rope_act's dispatchers only when Triton runs (CUDA, or forced on the CPU
under the interpreter): see kernels/dispatch.py for the convention.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from hubdeploy.kernels.dispatch import check_launchable
from hubdeploy.kernels.norm_rope_act import _check_rotary, _rows


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
    H, stride_x, stride_r, stride_o, stride_ro, eps,
    HAS_RES: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        s = (x + r).to(res_out_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * stride_ro + cols, s, mask=mask)
        x = s.to(tl.float32)
    var = tl.sum(x * x, axis=0) / H
    rstd = 1.0 / tl.sqrt(var + eps)
    h = (x * rstd).to(out_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (h * w).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm_triton(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """One program per row; the residual add, the norm and the weight in one pass.

    Any leading shape is flattened to rows (e.g. Qwen3's per-head q/k norm on [N, H, D]).
    """
    shape = x.shape
    h = shape[-1]
    if weight.shape != (h,):
        raise ValueError(f"rms_norm: weight shape {tuple(weight.shape)} != ({h},)")
    if residual is not None and residual.shape != shape:
        raise ValueError(f"rms_norm: residual {tuple(residual.shape)} != x {tuple(shape)}")
    x2 = _rows(x)
    r2 = _rows(residual) if residual is not None else None
    n = x2.shape[0]
    out = torch.empty((n, h), dtype=x.dtype, device=x.device)
    res_out = torch.empty((n, h), dtype=x.dtype, device=x.device) if r2 is not None else out
    if n > 0 and h > 0:
        block = triton.next_power_of_2(h)
        check_launchable(_rms_norm_kernel, x)[(n,)](
            x2, r2 if r2 is not None else x2, weight, out, res_out,
            h, x2.stride(0), r2.stride(0) if r2 is not None else 0,
            out.stride(0), res_out.stride(0), float(eps),
            HAS_RES=r2 is not None, BLOCK=block,
            num_warps=4 if block <= 2048 else 8,
        )
    if residual is None:
        return out.view(shape)
    return out.view(shape), res_out.view(shape)


@triton.jit
def _rotary_kernel(
    x_ptr, out_ptr, pos_ptr, cs_ptr,
    NH, stride_xt, stride_xh, stride_ot, stride_oh, stride_cs,
    HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    tok = tl.program_id(0)
    hb = tl.program_id(1)
    pos = tl.load(pos_ptr + tok)
    d = tl.arange(0, BLOCK_D)
    dmask = d < HALF
    cos = tl.load(cs_ptr + pos * stride_cs + d, mask=dmask, other=0.0).to(tl.float32)
    sin = tl.load(cs_ptr + pos * stride_cs + HALF + d, mask=dmask, other=0.0).to(tl.float32)
    h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    m = (h[:, None] < NH) & dmask[None, :]
    base = x_ptr + tok * stride_xt + h[:, None] * stride_xh + d[None, :]
    x1 = tl.load(base, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(base + HALF, mask=m, other=0.0).to(tl.float32)
    o1 = x1 * cos[None, :] - x2 * sin[None, :]
    o2 = x2 * cos[None, :] + x1 * sin[None, :]
    obase = out_ptr + tok * stride_ot + h[:, None] * stride_oh + d[None, :]
    tl.store(obase, o1.to(out_ptr.dtype.element_ty), mask=m)
    tl.store(obase + HALF, o2.to(out_ptr.dtype.element_ty), mask=m)


def _rotary_launch(x: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    n, nh, d = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty((n, nh, d), dtype=x.dtype, device=x.device)
    if n == 0 or nh == 0:
        return out
    half = d // 2
    block_h = min(triton.next_power_of_2(nh), 16)
    check_launchable(_rotary_kernel, x)[(n, triton.cdiv(nh, block_h))](
        x, out, positions, cos_sin,
        nh, x.stride(0), x.stride(1), out.stride(0), out.stride(1), cos_sin.stride(0),
        HALF=half, BLOCK_H=block_h, BLOCK_D=triton.next_power_of_2(half),
    )
    return out


def apply_rotary_triton(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One program per (token, block of heads); reads strided q/k views (e.g. slices of a qkv GEMM)."""
    _check_rotary(q, k, positions, cos_sin)
    cos_sin = cos_sin.contiguous()
    positions = positions.contiguous()
    return _rotary_launch(q, positions, cos_sin), _rotary_launch(k, positions, cos_sin)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, I, stride_x, stride_o, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < I
    g = tl.load(x_ptr + row * stride_x + cols, mask=m, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + row * stride_x + I + cols, mask=m, other=0.0).to(tl.float32)
    y = g / (1.0 + tl.exp(-g)) * u
    tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=m)


def silu_and_mul_triton(x: torch.Tensor) -> torch.Tensor:
    """One program per (row, column block); any leading shape is flattened to rows."""
    two_i = x.shape[-1]
    if two_i % 2:
        raise ValueError(f"silu_and_mul: last dim must be even (gate|up), got {two_i}")
    i = two_i // 2
    x2 = _rows(x)
    m = x2.shape[0]
    out = torch.empty((m, i), dtype=x.dtype, device=x.device)
    if m and i:
        block = min(triton.next_power_of_2(i), 1024)
        check_launchable(_silu_and_mul_kernel, x)[(m, triton.cdiv(i, block))](
            x2, out, i, x2.stride(0), out.stride(0), BLOCK=block
        )
    return out.view(*x.shape[:-1], i)
