"""The AWQ tile step that both W4A16 Triton kernels share: the dense GEMM/GEMV in
kernels/awq.py and the fused-MoE grouped GEMM in kernels/fused_moe.py.

A module of its own because it imports triton at once: kernels/awq.py and kernels/fused_moe.py
import it only when they build their kernels, so the CPU engine never needs triton. Kernels
call it through a module global (Triton's interpreter re-executes a kernel's source in its
module's globals and drops closures).
"""
from __future__ import annotations

import triton
import triton.language as tl


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
