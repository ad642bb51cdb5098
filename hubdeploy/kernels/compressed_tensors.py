"""compressed-tensors `pack-quantized` W4A16 tensors -> our AWQ kernel layout (`AWQPacked`).

llm-compressor writes, per quantized linear with weight `w [out, in]` and group size `g`
(compressed-tensors' `pack_to_int32`, 4 bits):
- `weight_packed` int32 `[out, in/8]`: nibble `j` (bits 4j..4j+3) of word `(n, c)` holds input
  channel `8c + j`, stored unsigned as `q + 8` for the signed integer `q` in -8..7;
- `weight_scale` `[out, in/g]` in the model's dtype;
- `weight_zero_point` (asymmetric only) int32 `[out/8, in/g]`: the signed zero points `zp`
  (-8..7) packed the same way but along the *output* dimension (`packed_dim=0`), also `+ 8`
  (compressed-tensors before 0.10 stored them unpacked: int8 `[out, in/g]`, read too);
- `weight_shape` int `[2]` = `(out, in)`;
- `w[n, k] = (q[n, k] - zp[n, k // g]) * s[n, k // g]` (symmetric: `zp = 0`).

Adding 8 to both sides, `w = ((q + 8) - (zp + 8)) * s`: the stored nibbles are unsigned 4-bit
integers with zero point `zp + 8` (8 when symmetric), which is exactly `AWQPacked` — whose
`qweight` is `[out, in/8]` in the same natural nibble order, so `weight_packed` is used as is,
and whose `qzeros` `[in/g, out/8]` is `weight_zero_point` transposed. Only the scales are
transposed. Lossless: every kernel (CPU reference, CPU int4, Triton) serves the result
unchanged and computes the same `(q - z) * s` as the library's own dequantization.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from hubdeploy.kernels.awq import AWQPacked, concat_out, pack_int4_natural, stack_packed
from hubdeploy.kernels.awq_format import PACK_FACTOR
from hubdeploy.kernels.fused_moe import AWQMoEWeights

# 0x88888888 as a signed int32: eight zero points of 8 (the symmetric case)
SYMMETRIC_ZERO_WORD = -2004318072


def ct_repack(
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    group_size: int,
    weight_zero_point: torch.Tensor | None = None,
    weight_shape: torch.Tensor | Sequence[int] | None = None,
) -> AWQPacked:
    """One linear's compressed-tensors tensors -> `AWQPacked` (no zero point: symmetric).

    Raises `ValueError` naming the tensor whose dtype or shape disagrees with the others.
    """
    if weight_packed.dtype != torch.int32 or weight_packed.dim() != 2:
        raise ValueError(f"weight_packed must be a 2-D int32 tensor, got {weight_packed.dtype} {tuple(weight_packed.shape)}")
    out_f, in_f = weight_packed.shape[0], weight_packed.shape[1] * PACK_FACTOR
    if weight_shape is not None:
        shape = tuple(int(v) for v in (weight_shape.tolist() if isinstance(weight_shape, torch.Tensor) else weight_shape))
        if shape != (out_f, in_f):
            raise ValueError(
                f"weight_shape {list(shape)} disagrees with weight_packed {tuple(weight_packed.shape)} "
                f"(expected [{out_f}, {in_f}]: in_features must be a multiple of 8)"
            )
    if group_size <= 0 or group_size % PACK_FACTOR or in_f % group_size:
        raise ValueError(f"group_size {group_size} must be a multiple of 8 dividing in_features {in_f}")
    if out_f % PACK_FACTOR:
        raise ValueError(f"out_features {out_f} is not a multiple of 8; the kernels pack 8 zero points per int32")
    groups = in_f // group_size
    if weight_scale.shape != (out_f, groups) or not weight_scale.is_floating_point():
        raise ValueError(
            f"weight_scale has shape {tuple(weight_scale.shape)} ({weight_scale.dtype}), expected a float "
            f"[{out_f}, {groups}] for group_size {group_size}"
        )
    if weight_zero_point is None:
        qzeros = torch.full((groups, out_f // PACK_FACTOR), SYMMETRIC_ZERO_WORD, dtype=torch.int32,
                            device=weight_packed.device)
    elif weight_zero_point.dtype == torch.int8 and weight_zero_point.shape == (out_f, groups):  # before 0.10
        zp = weight_zero_point.to(torch.int32)
        if zp.numel() and (int(zp.min()) < -8 or int(zp.max()) > 7):
            raise ValueError("weight_zero_point (int8, unpacked) holds values outside the int4 range -8..7")
        qzeros = pack_int4_natural((zp + 8).t().contiguous())
    else:
        if weight_zero_point.dtype != torch.int32 or weight_zero_point.shape != (out_f // PACK_FACTOR, groups):
            raise ValueError(
                f"weight_zero_point has shape {tuple(weight_zero_point.shape)} ({weight_zero_point.dtype}), "
                f"expected int32 [{out_f // PACK_FACTOR}, {groups}] (packed along the output dimension) "
                f"or int8 [{out_f}, {groups}] (unpacked, compressed-tensors before 0.10)"
            )
        qzeros = weight_zero_point.t().contiguous()
    return AWQPacked(weight_packed.contiguous(), qzeros, weight_scale.t().contiguous(), in_f, out_f, group_size)


def ct_repack_tensors(tensors: Mapping[str, torch.Tensor], group_size: int) -> AWQPacked:
    """`ct_repack` on a module's tensors by their checkpoint leaf names."""
    return ct_repack(tensors["weight_packed"], tensors["weight_scale"], group_size,
                     tensors.get("weight_zero_point"), tensors.get("weight_shape"))


def moe_from_packed(w1: Sequence[AWQPacked], w3: Sequence[AWQPacked], w2: Sequence[AWQPacked]) -> AWQMoEWeights:
    """Per-expert gate (w1), up (w3) and down (w2) linears -> the stacked fused-MoE weights
    (w1 | w3 concatenated along out so gate+up is one GEMM), as `awq_moe_repack` builds them."""
    if not (len(w1) == len(w3) == len(w2)) or not w1:
        raise ValueError(f"moe_from_packed needs the same non-zero number of w1/w3/w2 experts, got {len(w1)}/{len(w3)}/{len(w2)}")
    return AWQMoEWeights(stack_packed([concat_out(a, b) for a, b in zip(w1, w3)]), stack_packed(list(w2)))


__all__ = ["SYMMETRIC_ZERO_WORD", "ct_repack", "ct_repack_tensors", "moe_from_packed"]
