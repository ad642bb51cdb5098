"""Triton side of the W4A16 AWQ kernels: the tile step shared with the fused MoE kernels
(kernels/fused_moe_triton.py), the dense GEMM/GEMV kernel and its launcher. Imported only
when Triton runs (kernels/dispatch.py)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from hubdeploy.kernels.awq import AWQPacked, _check_x, awq_config
from hubdeploy.kernels.dispatch import check_launchable, interpreting

@triton.jit
def awq_tile_dot(a, w, s, zw, shifts, z_shift, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, COMPUTE_F32: tl.constexpr):
    """One K tile inside one group: `a [BLOCK_M, BLOCK_K] @ W.T` for the packed words
    `w [BLOCK_N, BLOCK_K // 8]` (nibble j of a word = input channel 8c + j), scales
    `s [BLOCK_N]` (fp32) and zero words `zw [BLOCK_N]` (nibble at `z_shift`), computed as
    `s · (a @ q.T − z · Σa)`: the raw 0..15 nibbles go through the dot, the zero point does not."""
    q = tl.reshape((w[:, :, None] >> shifts[None, None, :]) & 0xF, (BLOCK_N, BLOCK_K))
    if BLOCK_M < 16:  # GEMV: tl.dot needs 16 rows; broadcast-multiply-reduce on CUDA cores
        d = tl.sum(a.to(tl.float32)[:, None, :] * q.to(tl.float32)[None, :, :], axis=2)
    elif COMPUTE_F32:
        a = a.to(tl.float32)
        d = tl.dot(a, tl.trans(q.to(tl.float32)), input_precision="ieee")
    else:
        d = tl.dot(a, tl.trans(q.to(a.dtype)))
    suma = tl.sum(a.to(tl.float32), axis=1)
    z = ((zw >> z_shift) & 0xF).to(tl.float32)
    return s[None, :] * (d - z[None, :] * suma[:, None])


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
        acc += awq_tile_dot(a, w, s, zw, shifts, z_shift, BLOCK_M, BLOCK_N, BLOCK_K, COMPUTE_F32)
    c = c_ptr + pid_k * stride_cs + offs_m[:, None] * stride_cm + offs_n[None, :]
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


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
    grid = (triton.cdiv(N, cfg["BLOCK_N"]), triton.cdiv(M, cfg["BLOCK_M"]), split)
    compute_f32 = interpreting() or x.dtype == torch.float32
    check_launchable(awq_gemm_kernel, x)[grid](
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
