"""Triton side of fused MoE: the grouped GEMM over expert-sorted slots (any M), the direct
decode GEMM (M ≤ DIRECT_MAX_TOKENS: no slot sort) and their launchers, and
`fused_moe_triton`, which strings them together with an optional `MoEHook` between the two
GEMMs. Imported only when Triton runs (kernels/dispatch.py)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from hubdeploy.kernels.awq import AWQPacked
from hubdeploy.kernels.awq_triton import awq_tile_dot
from hubdeploy.kernels.dispatch import check_launchable, interpreting, num_sms
from hubdeploy.kernels.norm_rope_act_triton import silu_and_mul_triton
from hubdeploy.kernels.fused_moe import (
    DIRECT_MAX_TOKENS,
    AWQMoEWeights,
    MoEHook,
    Weights,
    _check,
    moe_align_block_size,
    moe_config,
    moe_direct_config,
)


@triton.jit
def _expert_rows_times_w(
    a_rows, row_mask, b_ptr, qz_ptr, s_ptr, e, offs_n, n_mask, t0, t1, K,
    stride_be, stride_bn, stride_bk, stride_ze, stride_zg, stride_se, stride_sg,
    IS_AWQ: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, COMPUTE_F32: tl.constexpr, LOOP_STAGES: tl.constexpr,
):
    """fp32 `[BLOCK_M, BLOCK_N]` = the rows at `a_rows` (masked) times expert e's weight tiles
    t0..t1 along K (AWQ: dequantized in the tile step; dense: fp16/bf16/fp32 rows of `w[e]`)."""
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    e64 = e.to(tl.int64)
    b_base = b_ptr + e64 * stride_be
    if IS_AWQ:
        offs_kw = tl.arange(0, BLOCK_K // 8)
        shifts = tl.arange(0, 8) * 4
        z_shift = (offs_n % 8) * 4
        w_rows = b_base + offs_n[:, None] * stride_bn
        qz_base = qz_ptr + e64 * stride_ze
        s_base = s_ptr + e64 * stride_se
        for t in tl.range(t0, t1, num_stages=LOOP_STAGES):
            k0 = t * BLOCK_K
            a = tl.load(a_rows + (k0 + offs_k)[None, :], mask=row_mask[:, None], other=0.0)
            w = tl.load(w_rows + (k0 // 8 + offs_kw)[None, :], mask=n_mask[:, None], other=0)
            g = k0 // GROUP
            s = tl.load(s_base + g * stride_sg + offs_n, mask=n_mask, other=0.0).to(tl.float32)
            zw = tl.load(qz_base + g * stride_zg + offs_n // 8, mask=n_mask, other=0)
            acc += awq_tile_dot(a, w, s, zw, shifts, z_shift, BLOCK_M, BLOCK_N, BLOCK_K, COMPUTE_F32)
    else:
        for t in tl.range(t0, t1, num_stages=LOOP_STAGES):
            k = t * BLOCK_K + offs_k
            k_mask = k < K
            a = tl.load(a_rows + k[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            b = tl.load(b_base + offs_n[:, None] * stride_bn + k[None, :] * stride_bk,
                        mask=n_mask[:, None] & k_mask[None, :], other=0.0)
            if BLOCK_M < 16:
                acc += tl.sum(a.to(tl.float32)[:, None, :] * b.to(tl.float32)[None, :, :], axis=2)
            elif COMPUTE_F32:
                acc += tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)), input_precision="ieee")
            else:
                acc += tl.dot(a, tl.trans(b.to(a.dtype)))
    return acc


@triton.jit
def _store_slots(acc, c_ptr, pid_k, stride_cs, stride_cm, slots, slot_mask, offs_n, n_mask, tw_ptr,
                 MUL_WEIGHT: tl.constexpr):
    """Write `acc` (· each slot's routing weight) to the slots' rows of split `pid_k`."""
    if MUL_WEIGHT:
        tw = tl.load(tw_ptr + slots, mask=slot_mask, other=0.0).to(tl.float32)
        acc = acc * tw[:, None]
    c = c_ptr + pid_k * stride_cs + slots.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=slot_mask[:, None] & n_mask[None, :])


@triton.jit
def moe_gemm_kernel(
    a_ptr, b_ptr, qz_ptr, s_ptr, c_ptr, tw_ptr, sorted_ptr, eids_ptr, ntp_ptr,
    N, K, num_valid,
    stride_am, stride_be, stride_bn, stride_bk, stride_ze, stride_zg, stride_se, stride_sg,
    stride_cs, stride_cm,
    TILES_PER_SPLIT,
    TOP_K: tl.constexpr, MUL_WEIGHT: tl.constexpr, IS_AWQ: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    COMPUTE_F32: tl.constexpr, LOOP_STAGES: tl.constexpr,
):
    # grid: (cdiv(N, BLOCK_N), num_blocks, SPLIT_K); c is [SPLIT_K, num_valid, N]
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    ntp = tl.load(ntp_ptr)
    if pid_m * BLOCK_M >= ntp:
        return
    e = tl.load(eids_ptr + pid_m)
    offs_tok = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    t_mask = offs_tok < num_valid
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    t0 = pid_k * TILES_PER_SPLIT
    t1 = tl.minimum(t0 + TILES_PER_SPLIT, tl.cdiv(K, BLOCK_K))
    acc = _expert_rows_times_w(
        a_ptr + (offs_tok // TOP_K)[:, None] * stride_am, t_mask, b_ptr, qz_ptr, s_ptr, e, offs_n, n_mask,
        t0, t1, K, stride_be, stride_bn, stride_bk, stride_ze, stride_zg, stride_se, stride_sg,
        IS_AWQ, GROUP, BLOCK_M, BLOCK_N, BLOCK_K, COMPUTE_F32, LOOP_STAGES)
    _store_slots(acc, c_ptr, pid_k, stride_cs, stride_cm, offs_tok, t_mask, offs_n, n_mask, tw_ptr, MUL_WEIGHT)


@triton.jit
def moe_direct_kernel(
    a_ptr, b_ptr, qz_ptr, s_ptr, c_ptr, tw_ptr, ids_ptr,
    M, N, K,
    stride_am, stride_be, stride_bn, stride_bk, stride_ze, stride_zg, stride_se, stride_sg,
    stride_cs, stride_cm,
    TILES_PER_SPLIT,
    TOP_K: tl.constexpr, K_PAD: tl.constexpr, A_PER_SLOT: tl.constexpr, MUL_WEIGHT: tl.constexpr,
    IS_AWQ: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    COMPUTE_F32: tl.constexpr, LOOP_STAGES: tl.constexpr,
):
    # grid: (cdiv(N, BLOCK_N), E, SPLIT_K); all M (<= BLOCK_M) tokens in one tile; c is
    # [SPLIT_K, M * TOP_K, N] by slot (token m's j-th choice = slot m * TOP_K + j)
    pid_n = tl.program_id(0)
    e = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = tl.arange(0, BLOCK_M)
    offs_j = tl.arange(0, K_PAD)
    ids = tl.load(ids_ptr + offs_m[:, None] * TOP_K + offs_j[None, :],
                  mask=(offs_m[:, None] < M) & (offs_j[None, :] < TOP_K), other=-1)
    match = (ids == e).to(tl.int32)
    hit = tl.sum(match, axis=1) > 0  # tokens routed to expert e (top-k ids are distinct)
    if tl.sum(hit.to(tl.int32), axis=0) == 0:
        return  # nobody chose this expert: its weights are never read
    slots = offs_m * TOP_K + tl.argmax(match, axis=1)
    rows = slots if A_PER_SLOT else offs_m
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    t0 = pid_k * TILES_PER_SPLIT
    t1 = tl.minimum(t0 + TILES_PER_SPLIT, tl.cdiv(K, BLOCK_K))
    acc = _expert_rows_times_w(
        a_ptr + rows[:, None] * stride_am, hit, b_ptr, qz_ptr, s_ptr, e, offs_n, n_mask,
        t0, t1, K, stride_be, stride_bn, stride_bk, stride_ze, stride_zg, stride_se, stride_sg,
        IS_AWQ, GROUP, BLOCK_M, BLOCK_N, BLOCK_K, COMPUTE_F32, LOOP_STAGES)
    _store_slots(acc, c_ptr, pid_k, stride_cs, stride_cm, slots, hit, offs_n, n_mask, tw_ptr, MUL_WEIGHT)


def direct_gemm(
    a: torch.Tensor, w: torch.Tensor | AWQPacked, M: int, N: int, K: int, topk_ids: torch.Tensor,
    a_per_slot: bool, topk_weights: torch.Tensor | None, cfg: dict[str, int], out_dtype: torch.dtype,
) -> torch.Tensor:
    """`c[s, m·k + j] = a[row] @ w[topk_ids[m, j]].T (· weight)` for M ≤ BLOCK_M tokens, with no
    slot sort. `a` rows are tokens (w13) or slots (`a_per_slot`, w2). Returns the split-K partial
    sums `[SPLIT_K, M·k, N]` (in `out_dtype`, fp32 when SPLIT_K > 1): the caller reduces them
    together with whatever else it sums (the k choices of w2)."""
    dev = a.device
    k = topk_ids.shape[1]
    is_awq = isinstance(w, AWQPacked)
    E = (w.qweight if is_awq else w).shape[0]
    bk, bm = cfg["BLOCK_K"], cfg["BLOCK_M"]
    if M > bm:
        raise ValueError(f"direct_gemm: {M} tokens do not fit BLOCK_M {bm}")
    if is_awq and (w.group_size % bk or bk % 8):
        raise ValueError(f"BLOCK_K {bk} must divide the AWQ group size {w.group_size}")
    tiles = -(-K // bk)
    n_tiles = -(-N // cfg["BLOCK_N"])
    split = cfg["SPLIT_K"]
    if split <= 0:  # auto: ~4 waves of the programs that do work (the experts chosen), >= 4 tiles each
        used = max(1, min(E, M * k))
        split = max(1, min(tiles // 4 or 1, (4 * num_sms(dev)) // max(1, n_tiles * used)))
    per = -(-tiles // split)
    split = -(-tiles // per)
    c = torch.empty(split, M * k, N, device=dev, dtype=out_dtype if split == 1 else torch.float32)
    if is_awq:
        b, qz, s = w.qweight, w.qzeros, w.scales
        strides_b, group = (b.stride(0), b.stride(1), 1), w.group_size
        zs = (qz.stride(0), qz.stride(1), s.stride(0), s.stride(1))
    else:
        b, qz, s = w, w, w
        strides_b, group = (w.stride(0), w.stride(1), w.stride(2)), 1
        zs = (0, 0, 0, 0)
    ids = topk_ids if topk_ids.is_contiguous() else topk_ids.contiguous()
    tw = topk_weights if topk_weights is not None else a
    check_launchable(moe_direct_kernel, a)[(n_tiles, E, split)](
        a, b, qz, s, c, tw, ids,
        M, N, K,
        a.stride(0), *strides_b, *zs, c.stride(0), c.stride(1),
        per,
        TOP_K=k, K_PAD=max(2, 1 << (k - 1).bit_length()), A_PER_SLOT=a_per_slot,
        MUL_WEIGHT=topk_weights is not None, IS_AWQ=is_awq, GROUP=group,
        BLOCK_M=bm, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=bk,
        COMPUTE_F32=interpreting() or a.dtype == torch.float32, LOOP_STAGES=cfg.get("LOOP_STAGES", 1),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return c


def _fused_moe_direct(x: torch.Tensor, weights: Weights, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                      overrides: dict[str, int], hook: MoEHook | None = None) -> torch.Tensor:
    """The decode path: w13 GEMM, SiLU·up, w2 GEMM (· routing weight), one sum over K splits and k."""
    M, k = topk_ids.shape
    H, I, E = weights.hidden_size, weights.intermediate_size, weights.num_experts
    awq = isinstance(weights, AWQMoEWeights)
    g13 = weights.w13.group_size if awq else None
    g2 = weights.w2.group_size if awq else None
    cfg1 = {**moe_direct_config(M, E, 2 * I, H, g13, x.device), **overrides}
    cfg2 = {**moe_direct_config(M, E, H, I, g2, x.device), **overrides}
    h = direct_gemm(x, weights.w13, M, 2 * I, H, topk_ids, False, None, cfg1, x.dtype)
    h = h[0] if h.shape[0] == 1 else h.sum(0).to(x.dtype)
    if hook is not None:
        hook.add_w13(h, x.repeat_interleave(k, 0), None)
    act = silu_and_mul_triton(h)
    tw = topk_weights.reshape(-1).to(torch.float32).contiguous()
    y = direct_gemm(act, weights.w2, M, H, I, topk_ids, True, tw, cfg2, torch.float32)
    if hook is not None:
        y = y.sum(0)
        hook.add_w2(y, act, None, tw)
    return y.view(-1, M, k, H).sum((0, 2)).to(x.dtype)


def grouped_gemm(
    a: torch.Tensor, w: torch.Tensor | AWQPacked, out_rows: int, N: int, K: int, top_k: int,
    sorted_ids: torch.Tensor, expert_ids: torch.Tensor, ntp: torch.Tensor,
    topk_weights: torch.Tensor | None, cfg: dict[str, int], out_dtype: torch.dtype,
) -> torch.Tensor:
    """One grouped GEMM over the sorted slots: `out[slot] = a[slot // top_k] @ w[e].T (· weight)`.

    Launcher shared by `fused_moe_triton` and serving/lora (which adds LoRA terms between the
    two GEMMs); keep its signature stable. Returns `[out_rows, N]` in `out_dtype`.
    """
    dev = a.device
    is_awq = isinstance(w, AWQPacked)
    bk = cfg["BLOCK_K"]
    if is_awq and (w.group_size % bk or bk % 8):
        raise ValueError(f"BLOCK_K {bk} must divide the AWQ group size {w.group_size}")
    tiles = -(-K // bk)
    num_blocks = expert_ids.numel()
    n_tiles = -(-N // cfg["BLOCK_N"])
    split = cfg["SPLIT_K"]
    if split <= 0:  # auto: enough programs for ~2 waves over the SMs, given the used blocks
        used_blocks = max(1, min(num_blocks, out_rows))
        split = max(1, min(tiles // 4 or 1, (2 * num_sms(dev)) // max(1, n_tiles * used_blocks)))
    per = -(-tiles // split)
    split = -(-tiles // per)
    if split == 1:
        c = torch.empty(out_rows, N, device=dev, dtype=out_dtype)
    else:
        c = torch.empty(split, out_rows, N, device=dev, dtype=torch.float32)
    if is_awq:
        b, qz, s = w.qweight, w.qzeros, w.scales
        stride_be, stride_bn, stride_bk, group = b.stride(0), b.stride(1), 1, w.group_size
        zs = (qz.stride(0), qz.stride(1), s.stride(0), s.stride(1))
    else:
        b, qz, s = w, w, w
        stride_be, stride_bn, stride_bk, group = w.stride(0), w.stride(1), w.stride(2), 1
        zs = (0, 0, 0, 0)
    tw = topk_weights if topk_weights is not None else a
    grid = (n_tiles, num_blocks, split)
    check_launchable(moe_gemm_kernel, a)[grid](
        a, b, qz, s, c, tw, sorted_ids, expert_ids, ntp,
        N, K, out_rows,
        a.stride(0), stride_be, stride_bn, stride_bk, *zs, (out_rows * N if split > 1 else 0), N,
        per,
        TOP_K=top_k, MUL_WEIGHT=topk_weights is not None, IS_AWQ=is_awq, GROUP=group,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=bk,
        COMPUTE_F32=interpreting() or a.dtype == torch.float32, LOOP_STAGES=cfg["num_stages"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return c if split == 1 else c.sum(0).to(out_dtype)


def fused_moe_triton(
    x: torch.Tensor, weights: Weights, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
    hook: MoEHook | None = None, **overrides: int,
) -> torch.Tensor:
    """Triton path: align, grouped GEMM w13, SiLU·up, grouped GEMM w2 (· routing weight), sum k;
    up to `DIRECT_MAX_TOKENS` tokens the same GEMMs without the align (`DIRECT=False` forces the sort)."""
    _check(x, weights, topk_weights, topk_ids)
    M, k = topk_ids.shape
    H, I, E = weights.hidden_size, weights.intermediate_size, weights.num_experts
    if M == 0:
        return torch.empty_like(x)
    if x.stride(-1) != 1:
        x = x.contiguous()
    direct = overrides.pop("DIRECT", M <= DIRECT_MAX_TOKENS)
    if direct:
        return _fused_moe_direct(x, weights, topk_weights, topk_ids, overrides, hook)
    awq = isinstance(weights, AWQMoEWeights)
    g13 = weights.w13.group_size if awq else None
    g2 = weights.w2.group_size if awq else None
    cfg1 = moe_config(M, k, E, 2 * I, H, g13, x.device)
    cfg1.update(overrides)
    cfg2 = moe_config(M, k, E, H, I, g2, x.device)
    cfg2.update(overrides)
    if cfg1["BLOCK_M"] != cfg2["BLOCK_M"]:
        raise ValueError("both grouped GEMMs share one slot alignment; use the same BLOCK_M")
    sorted_ids, expert_ids, ntp = moe_align_block_size(topk_ids, cfg1["BLOCK_M"], E)
    h = grouped_gemm(x, weights.w13, M * k, 2 * I, H, k, sorted_ids, expert_ids, ntp, None, cfg1, x.dtype)
    if hook is not None:
        hook.add_w13(h, x.repeat_interleave(k, 0), None)
    act = silu_and_mul_triton(h)
    tw = topk_weights.reshape(-1).to(torch.float32).contiguous()
    y = grouped_gemm(act, weights.w2, M * k, H, I, 1, sorted_ids, expert_ids, ntp, tw, cfg2, torch.float32)
    if hook is not None:
        hook.add_w2(y, act, None, tw)
    return y.view(M, k, H).sum(1).to(x.dtype)
