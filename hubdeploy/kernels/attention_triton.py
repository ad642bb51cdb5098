"""Triton kernels of kernels/attention.py: the paged KV store, a decode kernel (one program per
(sequence, KV head, context split) covering the whole GQA group with an online softmax, and a
split-reduce for long contexts) and a prefill kernel (flash-attention tiles over q and over
paged K/V). Imported by attention's dispatchers only when Triton runs (kernels/dispatch.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from hubdeploy.kernels.attention import _check_attn, _check_store
from hubdeploy.kernels.dispatch import check_launchable, dot_flags

_LOG2E = 1.4426950408889634


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr,
    HKV, D, BS,
    s_kt, s_kh, s_vt, s_vh,
    s_cb, s_cs, s_ch,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        blk = slot // BS
        off = slot % BS
        h = tl.arange(0, BLOCK_H)
        d = tl.arange(0, BLOCK_D)
        m = (h[:, None] < HKV) & (d[None, :] < D)
        kk = tl.load(k_ptr + t * s_kt + h[:, None] * s_kh + d[None, :], mask=m)
        vv = tl.load(v_ptr + t * s_vt + h[:, None] * s_vh + d[None, :], mask=m)
        dst = blk * s_cb + off * s_cs + h[:, None] * s_ch + d[None, :]
        tl.store(kc_ptr + dst, kk.to(kc_ptr.dtype.element_ty), mask=m)
        tl.store(vc_ptr + dst, vv.to(vc_ptr.dtype.element_ty), mask=m)


def store_kv_triton(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    slot_mapping: torch.Tensor) -> None:
    """One program per token; copies all its KV heads (k/v may be strided views of a qkv GEMM)."""
    _check_store(k, v, k_cache, v_cache, slot_mapping)
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    if k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1:
        raise ValueError("store_kv: k_cache and v_cache must share strides with a contiguous last dim")
    n, hkv, d = k.shape
    if n == 0:
        return
    check_launchable(_store_kv_kernel, k)[(n,)](
        k, v, k_cache, v_cache, slot_mapping.contiguous(),
        hkv, d, k_cache.shape[1],
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        BLOCK_H=triton.next_power_of_2(hkv), BLOCK_D=triton.next_power_of_2(d),
    )


@triton.jit
def _load_kv_tile(kc_ptr, vc_ptr, bt_ptr, b, s_bt, tok, tmask, kvh, s_cb, s_cs, s_ch, dd, dmask,
                  BS: tl.constexpr, F32: tl.constexpr):
    """K and V [BLOCK_N, BLOCK_D] of tokens `tok` of sequence b, KV head kvh, through the block table."""
    blk = tl.load(bt_ptr + b * s_bt + tok // BS, mask=tmask, other=0).to(tl.int64)
    off = blk * s_cb + (tok % BS) * s_cs + kvh * s_ch
    kv_mask = tmask[:, None] & dmask[None, :]
    k = tl.load(kc_ptr + off[:, None] + dd[None, :], mask=kv_mask, other=0.0)
    v = tl.load(vc_ptr + off[:, None] + dd[None, :], mask=kv_mask, other=0.0)
    if F32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    return k, v


@triton.jit
def _online_softmax_step(q, k, v, visible, qk_scale, m_i, l_i, acc, PREC: tl.constexpr):
    """One K/V tile of flash attention (base-2 online softmax): updated (m_i, l_i, acc)."""
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return m_new, l_i, acc


@triton.jit
def _decode_kernel(
    q_ptr, kc_ptr, vc_ptr, bt_ptr, ctx_ptr, out_ptr, tmp_o_ptr, tmp_ml_ptr,
    sm_scale, window,
    s_qt, s_qh, s_ot, s_oh,
    s_cb, s_cs, s_ch, s_bt,
    GROUP: tl.constexpr, BS: tl.constexpr, D: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PART: tl.constexpr, SPLITS: tl.constexpr, HAS_WINDOW: tl.constexpr,
    F32: tl.constexpr, PREC: tl.constexpr,
):
    # One program: sequence b (its single query token is row b), KV head kvh, split sp.
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    sp = tl.program_id(2)
    ctx = tl.load(ctx_ptr + b)
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(ctx - window, 0)
    start = lo + sp * PART
    # The last split runs to the end of the context even past SPLITS * PART: a CUDA graph
    # captured with a smaller max_context_len stays correct (only less parallel).
    end = tl.where(sp == SPLITS - 1, ctx, tl.minimum(start + PART, ctx))

    g = tl.arange(0, BLOCK_G)
    dd = tl.arange(0, BLOCK_D)
    gmask = g < GROUP
    dmask = dd < D
    heads = kvh * GROUP + g
    q = tl.load(q_ptr + b * s_qt + heads[:, None] * s_qh + dd[None, :],
                mask=gmask[:, None] & dmask[None, :], other=0.0)
    if F32:
        q = q.to(tl.float32)
    qk_scale = sm_scale * 1.4426950408889634

    m_i = tl.full([BLOCK_G], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        tok = n0 + tl.arange(0, BLOCK_N)
        tmask = tok < end
        k, v = _load_kv_tile(kc_ptr, vc_ptr, bt_ptr, b, s_bt, tok, tmask, kvh, s_cb, s_cs, s_ch, dd, dmask, BS, F32)
        m_i, l_i, acc = _online_softmax_step(q, k, v, tmask[None, :], qk_scale, m_i, l_i, acc, PREC)

    omask = gmask[:, None] & dmask[None, :]
    if SPLITS == 1:
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + b * s_ot + heads[:, None] * s_oh + dd[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=omask)
    else:
        # partials: tmp_o [B, H, SPLITS, D] fp32 (normalised), tmp_ml [B, H, SPLITS, 2] (max, sum)
        nh = tl.num_programs(1) * GROUP
        row = (b * nh + heads) * SPLITS + sp
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(tmp_o_ptr + row[:, None] * D + dd[None, :], o, mask=omask)
        tl.store(tmp_ml_ptr + row * 2, m_i, mask=gmask)
        tl.store(tmp_ml_ptr + row * 2 + 1, l_i, mask=gmask)


@triton.jit
def _decode_reduce_kernel(
    tmp_o_ptr, tmp_ml_ptr, out_ptr, s_ot, s_oh,
    D: tl.constexpr, SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    nh = tl.num_programs(1)
    sidx = tl.arange(0, BLOCK_S)
    dd = tl.arange(0, BLOCK_D)
    smask = sidx < SPLITS
    row = (b * nh + h) * SPLITS + sidx
    m = tl.load(tmp_ml_ptr + row * 2, mask=smask, other=-1.0e30)
    l = tl.load(tmp_ml_ptr + row * 2 + 1, mask=smask, other=0.0)
    m_max = tl.max(m, axis=0)
    w = tl.exp2(m - m_max) * l
    o = tl.load(tmp_o_ptr + row[:, None] * D + dd[None, :], mask=smask[:, None] & (dd[None, :] < D), other=0.0)
    res = tl.sum(o * w[:, None], axis=0) / tl.sum(w, axis=0)
    tl.store(out_ptr + b * s_ot + h * s_oh + dd, res.to(out_ptr.dtype.element_ty), mask=dd < D)


@triton.jit
def _prefill_kernel(
    q_ptr, kc_ptr, vc_ptr, bt_ptr, ctx_ptr, cu_ptr, out_ptr,
    sm_scale, window,
    s_qt, s_qh, s_ot, s_oh,
    s_cb, s_cs, s_ch, s_bt,
    GROUP: tl.constexpr, BS: tl.constexpr, D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_WINDOW: tl.constexpr, F32: tl.constexpr, PREC: tl.constexpr,
):
    # One program: a tile of BLOCK_M new tokens of sequence b, query head h.
    mt = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    q0 = tl.load(cu_ptr + b)
    qlen = tl.load(cu_ptr + b + 1) - q0
    m0 = mt * BLOCK_M
    if m0 < qlen:
        ctx = tl.load(ctx_ptr + b)
        kvh = h // GROUP
        rows = m0 + tl.arange(0, BLOCK_M)
        rmask = rows < qlen
        qpos = ctx - qlen + rows  # absolute positions of these queries
        dd = tl.arange(0, BLOCK_D)
        dmask = dd < D
        q = tl.load(q_ptr + (q0 + rows)[:, None] * s_qt + h * s_qh + dd[None, :],
                    mask=rmask[:, None] & dmask[None, :], other=0.0)
        if F32:
            q = q.to(tl.float32)
        qk_scale = sm_scale * 1.4426950408889634
        hi = tl.minimum(ctx - qlen + m0 + BLOCK_M, ctx)  # one past the last visible key
        lo = 0
        if HAS_WINDOW:
            lo = tl.maximum(ctx - qlen + m0 - window + 1, 0)
            lo = (lo // BLOCK_N) * BLOCK_N
        m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for n0 in range(lo, hi, BLOCK_N):
            tok = n0 + tl.arange(0, BLOCK_N)
            tmask = tok < hi
            k, v = _load_kv_tile(kc_ptr, vc_ptr, bt_ptr, b, s_bt, tok, tmask, kvh, s_cb, s_cs, s_ch, dd, dmask,
                                 BS, F32)
            vis = tmask[None, :] & (tok[None, :] <= qpos[:, None])
            if HAS_WINDOW:
                vis = vis & (tok[None, :] > qpos[:, None] - window)
            m_i, l_i, acc = _online_softmax_step(q, k, v, vis, qk_scale, m_i, l_i, acc, PREC)
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + (q0 + rows)[:, None] * s_ot + h * s_oh + dd[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & dmask[None, :])


def _paged_strides(q: torch.Tensor, out: torch.Tensor, k_cache: torch.Tensor,
                   block_tables: torch.Tensor) -> tuple[int, ...]:
    """The stride arguments both attention kernels take (s_qt, s_qh, s_ot, s_oh, s_cb, s_cs, s_ch, s_bt)."""
    return (q.stride(0), q.stride(1), out.stride(0), out.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0))


def _window_args(sliding_window: int | None) -> tuple[int, bool]:
    if sliding_window is None:
        return 0, False
    if sliding_window <= 0:
        raise ValueError(f"paged_attention: sliding_window must be positive or None, got {sliding_window}")
    return int(sliding_window), True


def paged_attention_decode_triton(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, context_lens: torch.Tensor,
    block_tables: torch.Tensor, max_context_len: int, scale: float, sliding_window: int | None = None,
    partition_size: int | None = None,
) -> torch.Tensor:
    """Decode: one query token per sequence (q row b belongs to sequence b).

    Programs = (sequence, KV head, context split); each covers the GQA group with one dot.
    Long contexts with few (sequence, KV head) pairs are split into `partition_size` chunks
    (flash-decoding) and merged by a reduce kernel.
    """
    n, h, d = q.shape
    bsz, bs, hkv = context_lens.shape[0], k_cache.shape[1], k_cache.shape[2]
    if n != bsz:
        raise ValueError(f"paged_attention decode: {n} query rows for {bsz} sequences")
    group = h // hkv
    window, has_window = _window_args(sliding_window)
    span = min(max_context_len, window) if has_window else max_context_len
    block_n = 32 if d <= 128 else 16
    if partition_size is None:
        # Enough programs to fill a GPU (~132 SMs x 2) without splitting short contexts.
        want = max(1, 256 // max(1, bsz * hkv))
        partition_size = max(128, triton.cdiv(triton.cdiv(span, want), block_n) * block_n)
    partition_size = max(block_n, triton.cdiv(partition_size, block_n) * block_n)
    splits = max(1, triton.cdiv(max(span, 1), partition_size))
    out = torch.empty_like(q)
    if n == 0:
        return out
    if splits > 1:
        tmp_o = torch.empty((bsz, h, splits, d), dtype=torch.float32, device=q.device)
        tmp_ml = torch.empty((bsz, h, splits, 2), dtype=torch.float32, device=q.device)
    else:
        tmp_o = tmp_ml = out
    check_launchable(_decode_kernel, q)[(bsz, hkv, splits)](
        q, k_cache, v_cache, block_tables, context_lens, out, tmp_o, tmp_ml,
        float(scale), window, *_paged_strides(q, out, k_cache, block_tables),
        GROUP=group, BS=bs, D=d,
        BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n,
        BLOCK_D=triton.next_power_of_2(d), PART=partition_size, SPLITS=splits,
        HAS_WINDOW=has_window, **dot_flags(q, k_cache),
    )
    if splits > 1:
        check_launchable(_decode_reduce_kernel, q)[(bsz, h)](
            tmp_o, tmp_ml, out, out.stride(0), out.stride(1),
            D=d, SPLITS=splits, BLOCK_S=triton.next_power_of_2(splits), BLOCK_D=triton.next_power_of_2(d),
        )
    return out


def paged_attention_prefill_triton(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor, block_tables: torch.Tensor, max_seqlen_q: int, scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Prefill / chunked prefill / prefix-cached prefill: flash-attention tiles over paged K/V."""
    n, h, d = q.shape
    bsz, bs, hkv = context_lens.shape[0], k_cache.shape[1], k_cache.shape[2]
    window, has_window = _window_args(sliding_window)
    out = torch.empty_like(q)
    if n == 0 or bsz == 0:
        return out
    block_m = 16 if (not q.is_cuda or max_seqlen_q <= 16) else (32 if max_seqlen_q <= 64 else 64)
    block_n = 16 if not q.is_cuda else (64 if d <= 64 else 32)
    grid = (triton.cdiv(max(max_seqlen_q, 1), block_m), bsz, h)
    check_launchable(_prefill_kernel, q)[grid](
        q, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q, out,
        float(scale), window, *_paged_strides(q, out, k_cache, block_tables),
        GROUP=h // hkv, BS=bs, D=d, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_D=triton.next_power_of_2(d), HAS_WINDOW=has_window, **dot_flags(q, k_cache),
    )
    return out


def paged_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    block_tables: torch.Tensor,
    max_seqlen_q: int,
    max_context_len: int,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Decode kernel when every sequence brings one token, else the prefill kernel."""
    _check_attn(q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables)
    if k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1:
        raise ValueError("paged_attention: k_cache and v_cache must share strides with a contiguous last dim")
    if q.stride(-1) != 1:
        q = q.contiguous()
    block_tables = block_tables.contiguous()
    context_lens = context_lens.contiguous()
    if max_seqlen_q == 1 and q.shape[0] == context_lens.shape[0]:
        return paged_attention_decode_triton(
            q, k_cache, v_cache, context_lens, block_tables, max_context_len, scale, sliding_window
        )
    return paged_attention_prefill_triton(
        q, k_cache, v_cache, cu_seqlens_q.contiguous(), context_lens, block_tables, max_seqlen_q, scale,
        sliding_window,
    )
