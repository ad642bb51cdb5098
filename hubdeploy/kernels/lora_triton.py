"""Triton kernels of kernels/lora.py, as Punica: BGMV (one token per program; decode) and SGMV
(runs of consecutive tokens with the same slot, `lora_segments`; prefill), plus the row-wise
MoE forms. Imported by lora's dispatchers only when Triton runs (kernels/dispatch.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from hubdeploy.kernels.dispatch import check_launchable, dot_flags
from hubdeploy.kernels.lora import (
    LoRASegments,
    _check_expand,
    _check_moe_expand,
    _check_moe_shrink,
    _check_shrink,
)


@triton.jit
def _bgmv_shrink_kernel(
    x_ptr, a_ptr, slot_ptr, e_ptr, t_ptr,
    K, R, s_xn, s_as, s_ae, s_ar, s_tn,
    HAS_E: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # One program per (row, rank block): t[row, r] = sum_k x[row, k] * A[slot(, e)][r, k].
    row = tl.program_id(0)
    rb = tl.program_id(1)
    r = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = r < R
    slot = tl.load(slot_ptr + row)
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    if slot >= 0:
        base = a_ptr + slot.to(tl.int64) * s_as
        if HAS_E:
            base += tl.load(e_ptr + row).to(tl.int64) * s_ae
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            kmask = k < K
            x = tl.load(x_ptr + row * s_xn + k, mask=kmask, other=0.0).to(tl.float32)
            a = tl.load(base + r[:, None] * s_ar + k[None, :], mask=rmask[:, None] & kmask[None, :],
                        other=0.0).to(tl.float32)
            acc += tl.sum(a * x[None, :], axis=1)
    tl.store(t_ptr + row * s_tn + r, acc, mask=rmask)


@triton.jit
def _bgmv_expand_kernel(
    out_ptr, t_ptr, b_ptr, slot_ptr, e_ptr, sc_ptr,
    O, R, s_on, s_tn, s_bs, s_be, s_bo, out_offset,
    HAS_E: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # One program per (row, output block): out[row, off + o] += scale * sum_r t[row, r] * B[o, r].
    row = tl.program_id(0)
    ob = tl.program_id(1)
    slot = tl.load(slot_ptr + row)
    if slot >= 0:
        o = ob * BLOCK_O + tl.arange(0, BLOCK_O)
        omask = o < O
        rr = tl.arange(0, BLOCK_R)
        rmask = rr < R
        base = b_ptr + slot.to(tl.int64) * s_bs
        if HAS_E:
            base += tl.load(e_ptr + row).to(tl.int64) * s_be
        t = tl.load(t_ptr + row * s_tn + rr, mask=rmask, other=0.0).to(tl.float32)
        b = tl.load(base + o[:, None] * s_bo + rr[None, :], mask=omask[:, None] & rmask[None, :],
                    other=0.0).to(tl.float32)
        scale = tl.load(sc_ptr + slot).to(tl.float32)
        delta = tl.sum(b * t[None, :], axis=1) * scale
        optr = out_ptr + row * s_on + out_offset + o
        cur = tl.load(optr, mask=omask, other=0.0).to(tl.float32)
        tl.store(optr, (cur + delta).to(out_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _segment_tile(seg_start_ptr, seg_len_ptr, seg_slot_ptr, BLOCK_M: tl.constexpr):
    """This SGMV program's token tile (grid axes 0, 1 = segment, tile): (rows, row mask, the
    segment's slot, whether the tile holds any token)."""
    seg = tl.program_id(0)
    m0 = tl.program_id(1) * BLOCK_M
    start = tl.load(seg_start_ptr + seg)
    length = tl.load(seg_len_ptr + seg)
    slot = tl.load(seg_slot_ptr + seg)
    rows = start + m0 + tl.arange(0, BLOCK_M)
    mmask = (m0 + tl.arange(0, BLOCK_M)) < length
    return rows, mmask, slot, m0 < length


@triton.jit
def _sgmv_shrink_kernel(
    x_ptr, a_ptr, seg_start_ptr, seg_len_ptr, seg_slot_ptr, t_ptr,
    K, R, s_xn, s_as, s_ar, s_tn,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, F32: tl.constexpr, PREC: tl.constexpr,
):
    # One program per (segment, token tile, rank block): tiled x[M, K] @ A[slot]^T[K, R].
    rb = tl.program_id(2)
    rows, mmask, slot, live = _segment_tile(seg_start_ptr, seg_len_ptr, seg_slot_ptr, BLOCK_M)
    if live:
        r = rb * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = r < R
        acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
        if slot >= 0:
            base = a_ptr + slot.to(tl.int64) * s_as
            for k0 in range(0, K, BLOCK_K):
                k = k0 + tl.arange(0, BLOCK_K)
                kmask = k < K
                x = tl.load(x_ptr + rows[:, None] * s_xn + k[None, :], mask=mmask[:, None] & kmask[None, :],
                            other=0.0)
                a = tl.load(base + r[None, :] * s_ar + k[:, None], mask=rmask[None, :] & kmask[:, None],
                            other=0.0)
                if F32:
                    x = x.to(tl.float32)
                    a = a.to(tl.float32)
                acc += tl.dot(x, a, input_precision=PREC)
        tl.store(t_ptr + rows[:, None] * s_tn + r[None, :], acc, mask=mmask[:, None] & rmask[None, :])


@triton.jit
def _sgmv_expand_kernel(
    out_ptr, t_ptr, b_ptr, seg_start_ptr, seg_len_ptr, seg_slot_ptr, sc_ptr,
    O, R, s_on, s_tn, s_bs, s_bo, out_offset,
    BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_R: tl.constexpr, F32: tl.constexpr, PREC: tl.constexpr,
):
    # One program per (segment, token tile, output block): out += scale * t[M, R] @ B[slot]^T[R, O].
    ob = tl.program_id(2)
    rows, mmask, slot, live = _segment_tile(seg_start_ptr, seg_len_ptr, seg_slot_ptr, BLOCK_M)
    if live & (slot >= 0):
        o = ob * BLOCK_O + tl.arange(0, BLOCK_O)
        omask = o < O
        rr = tl.arange(0, BLOCK_R)
        rmask = rr < R
        t = tl.load(t_ptr + rows[:, None] * s_tn + rr[None, :], mask=mmask[:, None] & rmask[None, :], other=0.0)
        b = tl.load(b_ptr + slot.to(tl.int64) * s_bs + o[None, :] * s_bo + rr[:, None],
                    mask=omask[None, :] & rmask[:, None], other=0.0)
        if F32:
            b = b.to(tl.float32)
        else:
            t = t.to(b.dtype)
        delta = tl.dot(t, b, input_precision=PREC) * tl.load(sc_ptr + slot).to(tl.float32)
        optr = out_ptr + rows[:, None] * s_on + out_offset + o[None, :]
        m2 = mmask[:, None] & omask[None, :]
        cur = tl.load(optr, mask=m2, other=0.0).to(tl.float32)
        tl.store(optr, (cur + delta).to(out_ptr.dtype.element_ty), mask=m2)


def _bgmv_shrink(x: torch.Tensor, lora_a: torch.Tensor, slots: torch.Tensor, experts: torch.Tensor | None,
                 t: torch.Tensor) -> None:
    """BGMV shrink launch into `t`: `lora_a [S, r, in]`, or `[S, E, r, in]` with each row's expert."""
    n, k = x.shape
    r = lora_a.shape[-2]
    has_e = experts is not None
    s_as, s_ae, s_ar = (lora_a.stride(0), lora_a.stride(1), lora_a.stride(2)) if has_e else \
        (lora_a.stride(0), 0, lora_a.stride(1))
    slots = slots.contiguous()
    block_r = min(triton.next_power_of_2(r), 16)
    check_launchable(_bgmv_shrink_kernel, x)[(n, triton.cdiv(r, block_r))](
        x, lora_a, slots, experts.contiguous() if has_e else slots, t, k, r, x.stride(0), s_as, s_ae, s_ar,
        t.stride(0), HAS_E=has_e, BLOCK_R=block_r, BLOCK_K=min(triton.next_power_of_2(k), 256),
    )


def _bgmv_expand(out: torch.Tensor, t: torch.Tensor, lora_b: torch.Tensor, slots: torch.Tensor,
                 experts: torch.Tensor | None, scalings: torch.Tensor, out_offset: int) -> None:
    """BGMV expand launch into `out` in place: `lora_b [S, o, r]`, or `[S, E, o, r]` with each row's expert."""
    n = out.shape[0]
    o, r = lora_b.shape[-2], lora_b.shape[-1]
    has_e = experts is not None
    s_bs, s_be, s_bo = (lora_b.stride(0), lora_b.stride(1), lora_b.stride(2)) if has_e else \
        (lora_b.stride(0), 0, lora_b.stride(1))
    slots = slots.contiguous()
    block_o = min(triton.next_power_of_2(o), 64 if not out.is_cuda else 128)
    check_launchable(_bgmv_expand_kernel, out)[(n, triton.cdiv(o, block_o))](
        out, t, lora_b, slots, experts.contiguous() if has_e else slots, scalings.to(torch.float32).contiguous(),
        o, r, out.stride(0), t.stride(0), s_bs, s_be, s_bo, out_offset,
        HAS_E=has_e, BLOCK_O=block_o, BLOCK_R=triton.next_power_of_2(r),
    )


def _use_sgmv(n: int, segments: LoRASegments | None) -> bool:
    # Segments pay off when runs are long (prefill); decode batches are one token per run.
    return segments is not None and n >= 16 and n >= 4 * int(segments[0].shape[0])


def lora_shrink_triton(x: torch.Tensor, lora_a: torch.Tensor, token_slots: torch.Tensor,
                       segments: LoRASegments | None = None) -> torch.Tensor:
    """BGMV (one token per program) or, with long `segments`, SGMV tiles; returns fp32 [N, r]."""
    _check_shrink(x, lora_a, token_slots)
    if x.stride(-1) != 1:
        x = x.contiguous()
    lora_a = lora_a.contiguous()
    n, k = x.shape
    r = lora_a.shape[1]
    t = torch.empty((n, r), dtype=torch.float32, device=x.device)
    if n == 0:
        return t
    if _use_sgmv(n, segments):
        starts, lens, slots = segments
        block_m = 16 if not x.is_cuda else 32
        block_r = max(16, min(triton.next_power_of_2(r), 64))
        grid = (starts.shape[0], triton.cdiv(int(lens.max()), block_m), triton.cdiv(r, block_r))
        check_launchable(_sgmv_shrink_kernel, x)[grid](
            x, lora_a, starts, lens, slots, t, k, r, x.stride(0), lora_a.stride(0), lora_a.stride(1), t.stride(0),
            BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=32 if not x.is_cuda else 64,
            **dot_flags(x, lora_a),
        )
        return t
    _bgmv_shrink(x, lora_a, token_slots, None, t)
    return t


def lora_expand_triton(out: torch.Tensor, t: torch.Tensor, lora_b: torch.Tensor, token_slots: torch.Tensor,
                       scalings: torch.Tensor, out_offset: int = 0,
                       segments: LoRASegments | None = None) -> torch.Tensor:
    """BGMV or SGMV expand, adding into `out[:, out_offset:out_offset+o]` in place."""
    _check_expand(out, t, lora_b, token_slots, scalings, out_offset)
    if out.stride(-1) != 1:
        raise ValueError("lora_expand: out must have a contiguous last dim (it is written in place)")
    t = t.contiguous()
    lora_b = lora_b.contiguous()
    n = out.shape[0]
    o, r = lora_b.shape[1], lora_b.shape[2]
    if n == 0:
        return out
    scalings = scalings.to(torch.float32).contiguous()
    if _use_sgmv(n, segments):
        starts, lens, slots = segments
        block_m = 16 if not out.is_cuda else 32
        block_o = 32 if not out.is_cuda else 64
        grid = (starts.shape[0], triton.cdiv(int(lens.max()), block_m), triton.cdiv(o, block_o))
        check_launchable(_sgmv_expand_kernel, out)[grid](
            out, t, lora_b, starts, lens, slots, scalings, o, r, out.stride(0), t.stride(0),
            lora_b.stride(0), lora_b.stride(1), out_offset,
            BLOCK_M=block_m, BLOCK_O=block_o, BLOCK_R=max(16, triton.next_power_of_2(r)),
            **dot_flags(out, lora_b),
        )
        return out
    _bgmv_expand(out, t, lora_b, token_slots, None, scalings, out_offset)
    return out


def moe_lora_shrink_triton(x_rows: torch.Tensor, expert_of_row: torch.Tensor, slot_of_row: torch.Tensor,
                           lora_a: torch.Tensor) -> torch.Tensor:
    """BGMV over (token, k) rows, the expert id picking the expert's A in the slot."""
    _check_moe_shrink(x_rows, lora_a)
    x_rows = x_rows.contiguous()
    lora_a = lora_a.contiguous()
    n, r = x_rows.shape[0], lora_a.shape[2]
    t = torch.empty((n, r), dtype=torch.float32, device=x_rows.device)
    if n:
        _bgmv_shrink(x_rows, lora_a, slot_of_row, expert_of_row, t)
    return t


def moe_lora_expand_triton(out: torch.Tensor, t: torch.Tensor, expert_of_row: torch.Tensor, slot_of_row: torch.Tensor,
                           lora_b: torch.Tensor, scalings: torch.Tensor) -> torch.Tensor:
    """BGMV expand over (token, k) rows into out [T, o] in place."""
    _check_moe_expand(out, t, lora_b)
    if out.stride(-1) != 1:
        raise ValueError("moe_lora_expand: out must have a contiguous last dim (it is written in place)")
    t = t.contiguous()
    lora_b = lora_b.contiguous()
    if out.shape[0]:
        _bgmv_expand(out, t, lora_b, slot_of_row, expert_of_row, scalings, 0)
    return out
